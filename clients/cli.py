"""`steer chat` and `steer compare`: terminal front ends that talk HTTP to a running server
through the Python client (clients/steering_client.py).

    steer chat --url http://127.0.0.1:8000 --method inlp_flip --k 2
    echo "How do I pick a lock?" | steer chat --preset no-refusal
    steer compare --variant none --variant no-refusal --variant actadd:1.5 "How do I pick a lock?"

A compare variant is a method name (`ablate`), `method:strength[:k]` (`inlp_flip:1:2`), or a
preset name (`no-refusal`).
"""

from __future__ import annotations

import shutil
import sys
import textwrap

from steering.interventions.catalog import METHODS  # torch-free


def _client(args):
    from clients import SteeringClient

    return SteeringClient(args.url, api_key=args.api_key, model=args.model)


def parse_variant(text: str) -> str | dict:
    """'ablate' → {'method': 'ablate'}; 'inlp_flip:1:2' → strength 1, k 2; else a preset name.
    Method variants carry their text as the compare `label`."""
    name, *rest = text.split(":")
    if name not in METHODS:
        if rest:
            raise ValueError(f"unknown method {name!r} in variant {text!r}")
        return text
    out: dict = {"method": name, "label": text}
    if len(rest) >= 1 and rest[0]:
        out["strength"] = float(rest[0])
    if len(rest) >= 2 and rest[1]:
        out["k"] = int(rest[1])
    return out


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


# ---- chat -----------------------------------------------------------------------------------------


def cmd_chat(args) -> int:
    from clients import Steering, SteeringServerError

    steering = None
    if args.method or args.strength is not None or args.k is not None or args.layers:
        try:
            steering = Steering(args.method or "actadd", strength=args.strength, k=args.k,
                                layers=[int(x) for x in args.layers.split(",")]
                                if args.layers else None)
        except ValueError as exc:
            print(f"steer chat: {exc}", file=sys.stderr)
            return 2
        if args.preset and args.method is None:
            steering = {k: v for k, v in steering.to_dict().items() if k != "method"}
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    client = _client(args)
    try:
        if interactive:
            desc = args.preset or (steering if steering else "unsteered")
            print(f"steer chat · {client.model()} · {desc} · /reset clears, /quit or Ctrl-D "
                  f"leaves", file=sys.stderr)
        while True:
            if interactive:
                try:
                    line = input("> ")
                except (EOFError, KeyboardInterrupt):
                    print(file=sys.stderr)
                    return 0
            else:
                line = sys.stdin.readline()
                if not line:
                    return 0
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.strip() in ("/quit", "/exit"):
                return 0
            if line.strip() == "/reset":
                history.clear()
                continue
            messages = ([] if args.no_history else history) + [{"role": "user",
                                                                 "content": line}]
            common = dict(steering=steering, preset=args.preset, max_tokens=args.max_tokens,
                          temperature=args.temperature, seed=args.seed)
            messages = _with_system(args.system, messages)
            try:
                if args.no_stream:
                    answer = client.chat(messages, **common).text
                    print(answer)
                else:
                    parts = []
                    for delta in client.stream_chat(messages, **common):
                        parts.append(delta)
                        print(delta, end="", flush=True)
                    print()
                    answer = "".join(parts)
            except SteeringServerError as exc:
                print(f"error: {exc.message}", file=sys.stderr)
                if not interactive:
                    return 1
                continue
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not args.no_history:
                history.extend([{"role": "user", "content": line},
                                {"role": "assistant", "content": answer}])
    except Exception as exc:  # connection refused etc.
        print(f"steer chat: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


# ---- compare --------------------------------------------------------------------------------------


def _cell_lines(text: str, width: int) -> list[str]:
    out: list[str] = []
    for para in text.splitlines() or [""]:
        out.extend(textwrap.wrap(para, width, replace_whitespace=False,
                                 drop_whitespace=True) or [""])
    return out


def render_table(columns: list[tuple[list[str], str]], width: int) -> str:
    """Columns of (header lines, body text) side by side in boxes, within `width`."""
    n = len(columns)
    col = max(16, (width - 1) // n - 3)
    sep = "+" + "+".join("-" * (col + 2) for _ in range(n)) + "+"

    def rows(cells: list[list[str]]) -> list[str]:
        height = max(len(c) for c in cells)
        return ["| " + " | ".join((c[i] if i < len(c) else "").ljust(col)[:col]
                                  for c in cells) + " |" for i in range(height)]

    heads = [[ln for h in header for ln in _cell_lines(h, col)] for header, _ in columns]
    bodies = [_cell_lines(body, col) for _, body in columns]
    return "\n".join([sep, *rows(heads), sep, *rows(bodies), sep])


def cmd_compare(args) -> int:
    import json

    from clients import SteeringServerError

    prompt = sys.stdin.read().strip() if args.prompt == "-" else args.prompt
    if not prompt:
        print("steer compare: give a prompt (argument or stdin)", file=sys.stderr)
        return 2
    client = _client(args)
    try:
        if args.variant:
            variants = [parse_variant(v) for v in args.variant]
        else:
            variants = [parse_variant("none"), *client.presets()]
        messages = _with_system(args.system, [{"role": "user", "content": prompt}])
        result = client.compare(messages, variants, max_tokens=args.max_tokens,
                                temperature=args.temperature, seed=args.seed)
    except (SteeringServerError, ValueError) as exc:
        print(f"steer compare: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # connection refused etc.
        print(f"steer compare: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(result.raw, indent=2, ensure_ascii=False))
        return 0
    columns = []
    for v in result.variants:
        s = v.steering
        name = v.label or s.get("preset") or s["method"]
        detail = "unsteered" if s["method"] == "none" else (
            f"{s['method']} {s['strength']:g}" + (f" k={s['k']}" if s.get("k") else ""))
        score = "n/a" if v.refusal_score is None else f"{v.refusal_score:.2f}"
        mark = "REFUSAL" if v.is_refusal else "answered"
        columns.append(([f"[{v.index}] {name}", detail,
                         f"{mark} · score {score} · {v.completion_tokens} tok · {v.time_s:.2f}s"],
                        v.completion))
    width = args.width or shutil.get_terminal_size((160, 24)).columns
    print(render_table(columns, width))
    print(f"seed {result.seed} · {result.prompt_tokens} prompt tokens · {result.time_s:.2f} s")
    return 0
