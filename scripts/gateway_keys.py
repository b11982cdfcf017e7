"""Make the keys of the shipped deployment: one server key per gateway route, the gateway's own.

    python scripts/gateway_keys.py docker/.secrets          # compose: env files it reads
    python scripts/gateway_keys.py my-overlay/secrets       # Kubernetes: for a secretGenerator
    python scripts/gateway_keys.py --secret-yaml deploy/base/secret.yaml   # the placeholders

Reads the gateway's routes (`docker/litellm.yaml`: each model name and the variable its
`api_key` comes from) and the presets they select (built-in + `docker/presets.yaml`), and writes
three env files into DIR (mode 0600):

| file | for | holds |
|---|---|---|
| `server.env` | the steering server | `STEER_KEYS`: one key per route (SHA-256 only), id `gateway-<preset>` (`gateway-base` for the unsteered route), allowed only that route's preset and its methods; `lower_refusal: true` only on routes whose preset lowers refusal (the server's own policy decides: `server.security.policy.lowers_refusal`) |
| `gateway.env` | the LiteLLM gateway | `LITELLM_MASTER_KEY`; each route's server key (`GATEWAY_ROUTE_KEY_<PRESET>`); `GATEWAY_CLIENT_KEYS`: the client keys' SHA-256 and the routes each may call (`gateway_auth.py` enforces the allow-list) |
| `clients.env` | you, to hand out | the client keys in clear: `standard` (every route that does not lower refusal) and `granted` (every route) |

Values are YAML flow documents without quotes, so compose `env_file` and kustomize
`secretGenerator` read them alike. Run it again to rotate every key at once.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.presets import SEPARATOR, load_presets  # noqa: E402
from server.security.auth import hash_key  # noqa: E402
from server.security.policy import DEFAULT_METHODS, lowers_refusal  # noqa: E402
from steering.catalog import REGISTRY  # noqa: E402

LITELLM = ROOT / "docker" / "litellm.yaml"
PRESETS = ROOT / "docker" / "presets.yaml"
PLACEHOLDER = "sk-change-me-"
ENV_PREFIX = "os.environ/"


@dataclass(frozen=True)
class Route:
    model_name: str
    preset: str | None
    env: str  # the variable its server key comes from
    methods: tuple[str, ...]
    lowers: bool

    @property
    def key_id(self) -> str:
        return f"gateway-{self.preset or 'base'}"


def env_name(preset: str | None) -> str:
    return "GATEWAY_ROUTE_KEY_" + (preset or "base").upper().replace("-", "_").replace(".", "_")


def _lowers(part, calibrated: bool) -> bool:
    """Whether one preset object lowers refusal. A calibrated strength is the pack's and unknown
    here: it counts as lowering only when the method lowers at every strength (otherwise the
    route key gets no grant, and the server refuses it if the pack's value lowers: fail closed)."""
    method = REGISTRY.get(part.method)
    if part.method == "none" or method is None:
        return False
    if calibrated:
        return bool(method.lowers is not None and method.lowers.everything)
    return lowers_refusal(part.method, 1.0 if part.strength is None else float(part.strength))


def routes(litellm: Path = LITELLM, presets_file: Path = PRESETS) -> list[Route]:
    presets = load_presets(presets_file)
    config = yaml.safe_load(litellm.read_text())
    out = []
    for entry in config["model_list"]:
        name = entry["model_name"]
        ref = str(entry["litellm_params"].get("api_key", ""))
        if not ref.startswith(ENV_PREFIX):
            raise SystemExit(f"{litellm}: route {name} must take its api_key from "
                             f"{ENV_PREFIX}{env_name(None)}-style variables")
        preset = name.rpartition(SEPARATOR)[2] if SEPARATOR in name else None
        if preset is None:
            methods, lowers = tuple(DEFAULT_METHODS), False
        else:
            p = presets[preset]
            methods = tuple(sorted({"none", *(part.method for part in p.parts)}))
            lowers = any(_lowers(part, p.is_calibrated(i)) for i, part in enumerate(p.parts))
        out.append(Route(name, preset, ref.removeprefix(ENV_PREFIX), methods, lowers))
    return out


def _flow(data) -> str:
    """A one-line YAML flow document with no quotes (env files keep it verbatim)."""
    text = yaml.safe_dump(data, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    if any(ch in text for ch in "'\"#\n"):
        raise ValueError(f"cannot write {text!r} without quotes")
    return text


def _key(placeholder: bool, name: str) -> str:
    return f"{PLACEHOLDER}{name}" if placeholder else "sk-" + secrets.token_urlsafe(32)


def generate(placeholder: bool = False, litellm: Path = LITELLM,
             presets_file: Path = PRESETS) -> dict[str, dict[str, str]]:
    """{file name: {variable: value}} of the three env files."""
    rs = routes(litellm, presets_file)
    route_keys = {r.env: _key(placeholder, r.key_id) for r in rs}
    server_doc = {"keys": []}
    for r in rs:
        entry = {"id": r.key_id, "sha256": hash_key(route_keys[r.env]), "methods": list(r.methods),
                 "presets": [r.preset] if r.preset else [], "lower_refusal": r.lowers}
        server_doc["keys"].append(entry)
    clients = {"standard": [r.model_name for r in rs if not r.lowers],
               "granted": [r.model_name for r in rs]}
    client_keys = {c: _key(placeholder, f"client-{c}") for c in clients}
    client_doc = {"clients": [{"id": c, "sha256": hash_key(client_keys[c]), "models": models}
                              for c, models in clients.items()]}
    return {
        "server.env": {"STEER_KEYS": _flow(server_doc)},
        "gateway.env": {"LITELLM_MASTER_KEY": _key(placeholder, "master"), **route_keys,
                        "GATEWAY_CLIENT_KEYS": _flow(client_doc)},
        "clients.env": {f"CLIENT_KEY_{c.upper()}": k for c, k in client_keys.items()},
    }


def write(folder: Path, files: dict[str, dict[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in files.items():
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in values.items())


SECRET_HEADER = """\
# Keys. PLACEHOLDERS ("sk-change-me-…"), consistent with each other so the layout can be checked,
# and refused by the gateway at start (deploy/base/gateway_auth.py): nothing runs until you replace
# them. Written by `python scripts/gateway_keys.py --secret-yaml deploy/base/secret.yaml`
# (tests/deploy/test_deploy.py checks it is current). In your overlay, generate real ones and
# replace both Secrets from the git-ignored env files:
#
#   python scripts/gateway_keys.py my-overlay/secrets
#   # kustomization.yaml of my-overlay:
#   secretGenerator:
#     - {name: steering-api-keys, behavior: replace, envs: [secrets/gateway.env]}
#     - {name: steering-server-keys, behavior: replace, envs: [secrets/server.env]}
#
# or let your secret store (External Secrets, Sealed Secrets, Vault) create them. See
# docs/deploy.md, "Keys".
"""
SECRETS = (
    ("steering-api-keys", "gateway.env",
     "the gateway's (LiteLLM) master key, each route's server key (GATEWAY_ROUTE_KEY_<PRESET>,\n"
     "# sent to the server as that route's Bearer key) and the client keys' SHA-256 with the routes\n"
     "# each may call (GATEWAY_CLIENT_KEYS, read by gateway_auth.py)."),
    ("steering-server-keys", "server.env",
     "the server's keys file (STEER_KEYS): one key per gateway route, SHA-256 only,\n"
     "# each allowed its route's preset; only the refusal-lowering routes have lower_refusal."),
)


def placeholder_secret_yaml() -> str:
    """deploy/base/secret.yaml: the two Secrets, with placeholder keys."""
    files = generate(placeholder=True)
    parts = []
    for name, source, about in SECRETS:
        data = "".join(f"  {k}: '{v}'\n" for k, v in files[source].items())
        parts.append(f"# {name}: {about}\napiVersion: v1\nkind: Secret\nmetadata:\n"
                     f"  name: {name}\n  labels:\n    app.kubernetes.io/part-of: steering\n"
                     f"type: Opaque\nstringData:\n{data}")
    return SECRET_HEADER + "---\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?",
                        help="folder for server.env, gateway.env, clients.env")
    parser.add_argument("--placeholder", action="store_true",
                        help="deterministic 'sk-change-me-…' keys (the gateway refuses them)")
    parser.add_argument("--secret-yaml", type=Path, help="write the placeholder Secrets "
                        "(deploy/base/secret.yaml) here instead")
    args = parser.parse_args(argv)
    if args.secret_yaml:
        args.secret_yaml.write_text(placeholder_secret_yaml())
        print(f"wrote {args.secret_yaml}")
        return
    if args.out is None:
        parser.error("name the output folder")
    write(args.out, generate(args.placeholder))
    print(f"wrote {args.out}/server.env, gateway.env, clients.env (keep them out of git)")


if __name__ == "__main__":
    main()
