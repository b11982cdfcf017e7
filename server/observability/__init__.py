"""Observability: Prometheus metrics and the structured JSON access log.

May import: nothing else from the server.
"""
