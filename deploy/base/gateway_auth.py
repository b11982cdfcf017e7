"""LiteLLM custom auth for the steering gateway: per-client keys with a model allow-list, no
database. Loaded by LiteLLM from `general_settings.custom_auth: gateway_auth.user_api_key_auth`
(this file sits next to litellm.yaml; docker compose mounts this same file).

- `GATEWAY_CLIENT_KEYS`: `{clients: [{id, sha256, models: [route, ...]}]}` (YAML or JSON; the
  SHA-256 of each client key, never the key; `scripts/gateway_keys.py` writes it). A client may
  call only the routes (`model` names) it lists: 403 for any other, before LiteLLM routes the
  request — so a client without the refusal-lowering routes cannot reach the route keys that
  carry the server's `lower_refusal` grant.
- `LITELLM_MASTER_KEY`: the gateway admin's key, allowed everything.
- Placeholder keys (`sk-change-me-…`, what deploy/base ships) in the master key, the route keys
  (`GATEWAY_ROUTE_KEY_*`) or the client keys' source make the module refuse to load, so the
  gateway does not start until real keys are set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

import yaml
from fastapi import Request
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth
from litellm.proxy.common_utils.http_parsing_utils import _read_request_body

PLACEHOLDER = "change-me"


def _load_clients() -> dict[str, dict]:
    text = os.environ.get("GATEWAY_CLIENT_KEYS", "").strip()
    doc = (json.loads(text) if text.startswith("{\"") else yaml.safe_load(text)) if text else {}
    clients = {}
    for entry in (doc or {}).get("clients", []):
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise RuntimeError(f"GATEWAY_CLIENT_KEYS: client {entry.get('id')!r} needs the 64 "
                               "hex digits of its key's SHA-256")
        clients[digest] = {"id": str(entry["id"]), "models": [str(m) for m in entry["models"]]}
    return clients


def _refuse_placeholders() -> None:
    names = ["LITELLM_MASTER_KEY", *(k for k in os.environ if k.startswith("GATEWAY_ROUTE_KEY_"))]
    bad = sorted(n for n in names if PLACEHOLDER in os.environ.get(n, ""))
    if not os.environ.get("LITELLM_MASTER_KEY"):
        bad.append("LITELLM_MASTER_KEY (unset)")
    if bad:
        raise RuntimeError("the gateway will not start with placeholder or missing keys: "
                           f"{', '.join(bad)}; run scripts/gateway_keys.py and deploy its "
                           "env files (docs/deploy.md)")


_refuse_placeholders()
MASTER = os.environ["LITELLM_MASTER_KEY"]
CLIENTS = _load_clients()


def _denied(status: int, message: str) -> ProxyException:
    return ProxyException(message=message, type="auth_error", param="model" if status == 403
                          else "api_key", code=status)


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    key = api_key.removeprefix("Bearer ").strip()
    if key and hmac.compare_digest(key.encode(), MASTER.encode()):
        return UserAPIKeyAuth(api_key=key, user_role=LitellmUserRoles.PROXY_ADMIN,
                              key_alias="master")
    client = CLIENTS.get(hashlib.sha256(key.encode()).hexdigest()) if key else None
    if client is None:
        raise _denied(401, "invalid gateway key")
    model = None
    if request.method == "POST":
        body = await _read_request_body(request)  # LiteLLM's reader: parsed once, cached
        model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model not in client["models"]:
        raise _denied(403, f"gateway key {client['id']!r} may not call model {str(model)[:80]!r}")
    return UserAPIKeyAuth(api_key=hashlib.sha256(key.encode()).hexdigest(),
                          key_alias=client["id"], user_id=client["id"],
                          models=client["models"])
