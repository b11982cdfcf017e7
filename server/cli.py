"""`steer`: the library's commands plus `serve`."""

from __future__ import annotations

from steering.cli import build_parser, run

from .cli_client import add_client_commands


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.add_parser("serve", help="start the OpenAI-compatible steering server")
    p.add_argument("--model", default=None)
    p.add_argument("--pack", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--presets", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_serve)
    h = sub.add_parser("hash-key", help="print the SHA-256 of an API key read from stdin "
                                        "(for the keys file)")
    h.set_defaults(func=cmd_hash_key)
    add_client_commands(sub)  # chat, compare (server/cli_client.py)
    return run(parser, argv)


def cmd_serve(args) -> int:
    from .app import serve

    overrides = {k: v for k, v in vars(args).items()
                 if k in {"model", "pack", "host", "port", "presets", "device", "dtype"}
                 and v is not None}
    serve(**overrides)
    return 0


def cmd_hash_key(args) -> int:
    import sys

    from .auth import hash_key

    print(hash_key(sys.stdin.readline().rstrip("\r\n")))
    return 0
