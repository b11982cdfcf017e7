"""`steer chat` and `steer compare`: terminal front ends that talk HTTP to a running server
through the Python client (clients/steering_client.py).

    steer chat --url http://127.0.0.1:8000 --method inlp_flip --k 2
    echo "How do I pick a lock?" | steer chat --preset no-refusal
    steer compare --variant none --variant no-refusal --variant actadd:1.5 "How do I pick a lock?"
    steer compare -v none -v ablate+actadd:4 -v actadd:4,generation,above=0.5 "Hello"
    steer chat --steer ablate,below=0.4,generation

The variant syntax (`steering.catalog.VARIANT_SYNTAX`): a preset name, an object
`METHOD[:STRENGTH[:K]][,option…]` (options: prompt|generation|all, window=S-E, above=T, below=T,
when-pack=…, when-layer=…, pack=…, layers=a/b), or objects joined by `+` (a list).
"""

from __future__ import annotations

import shutil
import sys
import textwrap

from steering.catalog import APPLY_TO, METHODS  # torch-free


def _client(args):
    from clients import SteeringClient

    return SteeringClient(args.url, api_key=args.api_key, model=args.model)


def _number(text: str, kind, what: str, variant: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r} in variant {variant!r}") from None


def _option(out: dict, option: str, variant: str) -> None:
    key, eq, value = option.partition("=")
    if not eq:
        if key not in APPLY_TO:
            raise ValueError(f"unknown option {option!r} in variant {variant!r} (positions: "
                             f"{', '.join(APPLY_TO)}; or key=value)")
        out["apply_to"] = key
    elif key == "window":
        start, dash, end = value.partition("-")
        if not dash:
            raise ValueError(f"window needs START-END or START- in variant {variant!r}")
        out["generation_window"] = [_number(start, int, "window start", variant),
                                    _number(end, int, "window end", variant) if end else None]
    elif key in ("above", "below"):
        out.setdefault("when", {})[key] = _number(value, float, key, variant)
    elif key in ("when-pack", "when-layer"):
        out.setdefault("when", {})[key[5:]] = (value if key == "when-pack"
                                               else _number(value, int, key, variant))
    elif key == "pack":
        out["pack"] = value
    elif key == "layers":
        out["layers"] = [_number(x, int, "layers", variant) for x in value.split("/")]
    else:
        raise ValueError(f"unknown option {key!r} in variant {variant!r}")


def _element(text: str, variant: str) -> str | dict:
    """One steering object of the variant syntax (or a bare preset name)."""
    head, *options = text.split(",")
    name, *rest = head.split(":")
    if name in METHODS:
        out: dict = {"method": name}
        if len(rest) >= 1 and rest[0]:
            out["strength"] = _number(rest[0], float, "strength", variant)
        if len(rest) >= 2 and rest[1]:
            out["k"] = _number(rest[1], int, "k", variant)
    elif rest:
        raise ValueError(f"unknown method {name!r} in variant {variant!r}")
    elif not options:
        return name  # a preset name
    else:
        out = {"preset": name}
    for option in options:
        _option(out, option, variant)
    if "when" in out and not {"above", "below"} & set(out["when"]):
        raise ValueError(f"a condition needs above=T or below=T in variant {variant!r}")
    return out


def parse_variant(text: str) -> str | dict:
    """The variant syntax (catalog.VARIANT_SYNTAX) → what POST /v1/steering/compare takes: a
    preset name, a steering object, or {'steering': [objects]} for a list. Objects carry the
    text as their `label`."""
    parts = [_element(p, text) for p in text.split("+")]
    if len(parts) == 1:
        only = parts[0]
        return only if isinstance(only, str) else {**only, "label": text}
    if any(isinstance(p, str) or "preset" in p for p in parts):
        raise ValueError(f"a list holds steering objects, not presets: {text!r}")
    return {"steering": parts, "label": text}


def chat_steering(text: str) -> tuple[str | None, dict | list[dict] | None]:
    """`steer chat --steer TEXT` → (preset, steering object or list)."""
    parsed = parse_variant(text)
    if isinstance(parsed, str):
        return parsed, None
    parsed = {k: v for k, v in parsed.items() if k != "label"}
    if "steering" in parsed:
        return None, parsed["steering"]
    return parsed.pop("preset", None), parsed


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


# ---- chat -----------------------------------------------------------------------------------------


def cmd_chat(args) -> int:
    from clients import Steering, SteeringServerError

    steering = None
    if args.steer:
        try:
            args.preset, steering = chat_steering(args.steer)
        except ValueError as exc:
            print(f"steer chat: {exc}", file=sys.stderr)
            return 2
    elif args.method or args.strength is not None or args.k is not None or args.layers:
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


def describe(s: dict) -> str:
    """One applied steering object in a few words (method, strength, targeting, condition)."""
    if s["method"] == "none" and not s.get("condition"):
        return "unsteered"
    out = f"{s['method']} {s['strength']:g}" + (f" k={s['k']}" if s.get("k") else "")
    window = s.get("generation_window")
    if window:
        out += f" tokens {window[0]}-{'' if window[1] is None else window[1]}"
    elif s.get("apply_to") not in (None, "all"):
        out += f" {s['apply_to']}"
    cond = s.get("condition")
    if cond:
        when = s.get("when") or {}
        side = f">{when['above']:g}" if when.get("above") is not None else (
            f"<{when['below']:g}" if when.get("below") is not None else "")
        out += f" if {side}: score {cond['score']:.2f} {'on' if cond['applied'] else 'off'}"
    return out


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
        parts = v.steering if isinstance(v.steering, list) else [v.steering]
        name = v.label or parts[0].get("preset") or " + ".join(p["method"] for p in parts)
        detail = " + ".join(describe(p) for p in parts)
        score = "n/a" if v.refusal_score is None else f"{v.refusal_score:.2f}"
        mark = "REFUSAL" if v.is_refusal else "answered"
        columns.append(([f"[{v.index}] {name}", detail,
                         f"{mark} · score {score} · {v.completion_tokens} tok · {v.time_s:.2f}s"],
                        v.completion))
    width = args.width or shutil.get_terminal_size((160, 24)).columns
    print(render_table(columns, width))
    print(f"seed {result.seed} · {result.prompt_tokens} prompt tokens · {result.time_s:.2f} s")
    return 0
