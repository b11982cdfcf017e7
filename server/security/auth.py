"""API keys (Bearer) for `/v1/*`, stored as SHA-256 hashes, each with a steering policy.

Off by default (local use); configuring keys (or `STEER_AUTH=1`) turns it on. Keys come from
`STEER_KEYS_FILE` (YAML or JSON) or the same document inline in `STEER_KEYS`:

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
        admin: true              # may see internals: pack metadata, why a pack was refused
      - id: bob
        sha256: …

Make a hash with `echo KEY | steer hash-key` or
`python -c "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY`.
A missing or unknown key gets 401 with `WWW-Authenticate: Bearer`. Deny by default: every route
needs a key except an explicit list of open routes (`/healthz`, `/readyz`, and `/metrics`, the
docs and the playground where the settings leave them open), matched on the path the router
routes — the request path less the ASGI `root_path`, so a `--root-path` or a mount in another app
changes nothing. Routes turned off in the settings answer 404 to everyone. Authentication runs
before the body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

from server.context import request_context
from server.errors import APIError, ErrorCode
from server.security.audit import route_path
from server.security.policy import Policy, PolicyError

ALWAYS_OPEN = frozenset({"/healthz", "/readyz"})
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    policy: Policy
    admin: bool = False  # sees internals (pack metadata, refused packs' reasons); no extra steering


def may_see_internals(key: ApiKey | None) -> bool:
    """Whether a caller may see server internals. On a route that needs a key, `None` means
    authentication is off: the caller is the operator on a local server."""
    return key is None or key.admin


class KeyStore:
    def __init__(self, keys: list[ApiKey]):
        self._by_hash = {k.sha256: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, key: str) -> ApiKey | None:
        digest = hash_key(key)
        found = self._by_hash.get(digest)
        if found is not None and hmac.compare_digest(found.sha256, digest):
            return found
        return None


def parse_keys(data: object, source: str = "keys") -> KeyStore:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with 'keys' (and optional 'default')")
    default = Policy.parse(data.get("default"), where=f"{source}: default")
    entries = data.get("keys") or []
    if not isinstance(entries, list):
        raise PolicyError(f"{source}: 'keys' must be a list")
    keys, ids, hashes = [], set(), set()
    for i, entry in enumerate(entries):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise PolicyError(f"{where}: expected a mapping")
        key_id, digest = str(entry.get("id", "")), str(entry.get("sha256", "")).lower()
        if not ID_RE.match(key_id):
            raise PolicyError(f"{where}: id must be 1–64 letters, digits, '.', '_', '@' or '-'")
        if not HEX64.match(digest):
            raise PolicyError(f"{where}: sha256 must be the 64 hex digits of the key's SHA-256 "
                              "(keys are never stored in clear)")
        if key_id in ids or digest in hashes:
            raise PolicyError(f"{where}: duplicate id or key")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise PolicyError(f"{where}.admin: expected true or false")
        ids.add(key_id)
        hashes.add(digest)
        keys.append(ApiKey(key_id, digest, Policy.parse(entry, default, where), admin))
    return KeyStore(keys)


def load_keys(settings) -> KeyStore:
    """The configured keys (file, then inline); an empty store when none are configured."""
    text, source = None, "STEER_KEYS"
    if settings.keys_file:
        p = Path(settings.keys_file)
        if not p.is_file():
            raise PolicyError(f"keys file {p} does not exist")
        text, source = p.read_text(), str(p)
    elif settings.keys:
        text = settings.keys
    if text is None:
        return KeyStore([])
    try:
        data = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{source} cannot be parsed ({exc})") from None
    return parse_keys(data, source)


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
