"""Security: who may call, what they may ask for, and the record of what they did.

Lives here: API keys (auth), per-key policy and rate limits, request hardening (sizes, odd
values), the audit log. May import: `server.errors`, `server.context`, the steering schema; never the API or the engine.
"""
