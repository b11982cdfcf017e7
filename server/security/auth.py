"""API keys (Bearer) for `/v1/*`, stored as SHA-256 hashes, each with a steering policy.

Off by default (local use); any keys source turns it on — `STEER_KEYS_FILE`, `STEER_KEYS` (even
empty) or `STEER_AUTH=1` — and an empty store then answers 401 to every caller. Keys come from
`STEER_KEYS_FILE` (YAML or JSON) or the same document inline in `STEER_KEYS`, validated by the
pydantic models of `server.security.keysfile`:

    default:                     # every key's policy unless the key overrides a field
      methods: [none, actadd, ace]
    keys:
      - id: alice
        sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
        methods: "*"             # every method, including ablate / inlp_null / inlp_flip
        max_strength: 2
        max_k: 4
        requests_per_minute: 60
        tokens_per_minute: 20000
        lower_refusal: true      # the explicit grant to lower refusal
        admin: true              # may see internals: pack metadata, why a pack was refused
        pack_admin: true         # may upload / delete packs (needs lower_refusal: true)
      - id: bob
        sha256: …

Make a hash with `echo KEY | steer hash-key` or
`python -c "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY`.
A missing or unknown key gets 401 with `WWW-Authenticate: Bearer`. Deny by default: every route
needs a key except an explicit list of open routes (`/healthz` and its alias `/health`, `/readyz`, and `/metrics`, the
docs and the playground where the settings leave them open), matched on the path the router
routes — the request path less the ASGI `root_path`, so a `--root-path` or a mount in another app
changes nothing. Routes turned off in the settings answer 404 to everyone. Authentication runs
before the body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

from server.context import request_context
from server.errors import APIError, ErrorCode
from server.security.audit import route_path
from server.security.keysfile import build
from server.security.policy import Policy, PolicyError

ALWAYS_OPEN = frozenset({"/healthz", "/health", "/readyz"})  # /health: /healthz's vLLM name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    policy: Policy
    admin: bool = False  # sees internals (pack metadata, refused packs' reasons); no extra steering
    pack_admin: bool = False  # may upload / delete packs (the keys file requires lower_refusal)


def may_see_internals(key: ApiKey | None) -> bool:
    """Whether a caller may see server internals. On a route that needs a key, `None` means
    authentication is off: the caller is the operator on a local server."""
    return key is None or key.admin


class KeyStore:
    """Keys by hash. `configured`: a keys source is set, so authentication is on even when the
    store is empty (every caller then gets 401)."""

    def __init__(self, keys: list[ApiKey], configured: bool | None = None):
        self._by_hash = {k.sha256: k for k in keys}
        self.configured = bool(keys) if configured is None else configured

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, key: str) -> ApiKey | None:
        digest = hash_key(key)
        found = self._by_hash.get(digest)
        if found is not None and hmac.compare_digest(found.sha256, digest):
            return found
        return None


def parse_keys(data: object, source: str = "keys", configured: bool = True) -> KeyStore:
    """A key store from a parsed keys document (`server.security.keysfile` validates it)."""
    return KeyStore([ApiKey(r.id, r.sha256, r.policy, r.admin, r.pack_admin)
                     for r in build(data, source)], configured=configured)


def keys_configured(settings) -> bool:
    """Whether authentication is on: `STEER_AUTH`, or any keys source set (a keys file, or
    `STEER_KEYS` even when empty). An empty key store then refuses every caller (401): a keys
    file emptied by mistake never opens the server."""
    return bool(settings.auth) or settings.keys_file is not None or settings.keys is not None


def load_keys(settings) -> KeyStore:
    """The configured keys (file, then inline); an empty store when none are configured, which
    is `configured` (authentication on) whenever a source is set (`keys_configured`)."""
    text, source = None, "STEER_KEYS"
    if settings.keys_file:
        p = Path(settings.keys_file)
        if not p.is_file():
            raise PolicyError(f"keys file {p} does not exist")
        text, source = p.read_text(), str(p)
    elif settings.keys:
        text = settings.keys
    configured = keys_configured(settings)
    if text is None or not text.strip():
        return KeyStore([], configured=configured)
    try:
        data = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{source} cannot be parsed ({exc})") from None
    return parse_keys(data, source, configured=configured)


def _unauthorized(message: str, code: ErrorCode) -> APIError:
    return APIError(401, message, code=code,
                    headers={"WWW-Authenticate": 'Bearer realm="steer"'})


class AuthMiddleware:
    """Checks `Authorization: Bearer KEY` on every route but the open ones and puts the key in
    the request context (`server.context`). `open_paths` are exact routes; `open_prefixes` end in '/'."""

    def __init__(self, app: ASGIApp, enabled: bool, keys: KeyStore,
                 open_paths: frozenset[str] = ALWAYS_OPEN,
                 open_prefixes: tuple[str, ...] = (),
                 closed_paths: frozenset[str] = frozenset()):
        self.app = app
        self.enabled = enabled
        self.keys = keys
        self.open_paths = frozenset(open_paths) | ALWAYS_OPEN
        self.open_prefixes = tuple(open_prefixes)
        self.closed_paths = frozenset(closed_paths)

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or any(path.startswith(p) for p in self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in self.closed_paths:
            await APIError(404, f"no route {scope['method']} {path[:200]}",
                           code=ErrorCode.NOT_FOUND).response()(scope, receive, send)
            return
        if not self.enabled or self.is_open(path):
            await self.app(scope, receive, send)
            return
        header = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"authorization":
                header = v.decode("latin-1")
                break
        if not header:
            err = _unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                                ErrorCode.MISSING_API_KEY)
        else:
            scheme, _, token = header.strip().partition(" ")
            key = self.keys.lookup(token.strip()) if scheme.lower() == "bearer" else None
            if key is not None:
                request_context(scope).api_key = key
                await self.app(scope, receive, send)
                return
            err = _unauthorized("invalid API key" if scheme.lower() == "bearer" else
                                "the Authorization header must be 'Bearer <key>'",
                                ErrorCode.INVALID_API_KEY)
        request_context(scope).note_error(err.code, None)
        await err.response()(scope, receive, send)


if __name__ == "__main__":  # `python -m server.security.auth` reads a key on stdin, prints its hash
    import sys

    print(hash_key(sys.stdin.readline().strip()))
