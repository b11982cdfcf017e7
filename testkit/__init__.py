"""Helpers shared by tests/ and bench/: tiny random models, real server processes, readiness waits.

Not part of the installed package; imported from the repository root.
"""
