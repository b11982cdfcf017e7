"""Function calling through the model's own chat template (OpenAI `tools` / `tool_choice`).

The tools go to the chat template as the request gives them (Qwen2.5's template lists them in the
system turn and asks for each call as `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`,
the Hermes format); the answer is parsed back into `tool_calls`. `tool_choice`:

| value | what the server does |
|---|---|
| `"auto"` (default with tools) | the tools are in the prompt; the model decides |
| `"none"` | the tools are left out of the prompt; no parsing |
| `"required"` | the answer is started with `<tool_call>\\n{"name": "` (the prompt ends with it), so the model must call one |
| `{"type": "function", "function": {"name": N}}` | the answer is started with that call's name; generation stops after its `</tool_call>` |

`ToolCallParser` reads the generated text as it streams: text outside the tags is content, each
complete block whose JSON has a string `name` becomes a call (`arguments` re-serialized as a JSON
string, as OpenAI sends it). A last block the model ended without `</tool_call>` (finish `stop`:
its end-of-turn token, a stop string, or a named call's closing tag) is a call too when its JSON
parses — small models often end the turn right after the call's `}` (vLLM's Hermes parser accepts
the same unclosed last block). A block cut off by `max_tokens` or whose JSON does not parse stays
content, so nothing the model wrote is lost. The finish reason is `tool_calls` when the answer ended normally with at
least one call. With `parallel_tool_calls: false` only the first call is kept.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt and its answer."""

    tools: list[dict]  # as the template receives them ({"type": "function", "function": …})
    forced_prefix: str = ""  # appended to the prompt: the start of the answer
    stop: tuple[str, ...] = ()  # extra stop strings (a named call ends after its block)
    parallel: bool = True

    @property
    def parse(self) -> bool:
        return bool(self.tools)


def plan(tools: list[dict] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """The plan for validated `tools` / `tool_choice` (None: no tools in play)."""
    if not tools or tool_choice == "none":
        return None
    par = parallel is not False
    if tool_choice == "required":
        return ToolPlan(tools, f'{OPEN}\n{{"name": "', parallel=par)
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return ToolPlan(tools, f'{OPEN}\n{{"name": "{name}", "arguments": ', (CLOSE,), False)
    return ToolPlan(tools, parallel=par)


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as the template reads them: an assistant turn's `tool_calls` with their
    `arguments` parsed from JSON strings to objects (the template serializes them itself)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # left as the string the client sent
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def new_call(name: str, arguments: Any, index: int) -> dict:
    """One OpenAI tool call (the arguments as a JSON string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def _call_of(block: str) -> tuple[str, Any] | None:
    """(name, arguments) of one block's JSON, or None when it is not a call."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    return data["name"], data.get("arguments", data.get("parameters", {}))


@dataclass
class ToolCallParser:
    """Splits streamed text into content and tool calls (module docstring)."""

    parallel: bool = True
    calls: list[dict] = field(default_factory=list)
    _pending: str = ""  # text not yet decided: a possible tag start, or an open block
    _in_block: bool = False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content that is settled now, calls completed now)."""
        self._pending += text
        content, done = [], []
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                block, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._in_block = False
                call = _call_of(block.strip())
                if call is None:
                    content.append(OPEN + block + CLOSE)
                elif self.parallel or not self.calls:
                    self.calls.append(new_call(*call, index=len(self.calls)))
                    done.append(self.calls[-1])
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                content.append(self._pending[:start])
                self._pending = self._pending[start + len(OPEN):]
                self._in_block = True
                continue
            keep = _partial_tag(self._pending)
            content.append(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return "".join(content), done

    def finish(self, ended: bool = False) -> tuple[str, list[dict]]:
        """(the content still held back, a last call): a block left open is a call when the
        answer `ended` normally (finish `stop`) and the block's JSON is a call, else content."""
        done: list[dict] = []
        content = ""
        if self._in_block and ended and _call_of(self._pending.strip()) is not None:
            content, done = self.feed(CLOSE)
        rest = (OPEN if self._in_block else "") + self._pending
        self._pending, self._in_block = "", False
        return content + rest, done


def start(tools: ToolPlan) -> ToolCallParser:
    """A parser for one choice, fed the answer's forced start (not generated, not streamed)."""
    parser = ToolCallParser(tools.parallel)
    parser.feed(tools.forced_prefix)
    return parser


def finish_reason(parser: ToolCallParser, reason: str | None) -> str | None:
    """`tool_calls` when a normally ended answer called at least one tool."""
    return "tool_calls" if parser.calls and reason == "stop" else reason


def _partial_tag(text: str) -> int:
    """How many trailing characters of `text` could be the start of `<tool_call>`."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def parse_all(tools: ToolPlan, text: str, reason: str | None
              ) -> tuple[str | None, list[dict], str | None]:
    """A whole answer: (content, or None when it is only calls; the calls; finish reason)."""
    p = start(tools)
    content, _ = p.feed(text)
    rest, _ = p.finish(ended=reason == "stop")
    content += rest
    if p.calls and not content.strip():
        content = None
    return content, p.calls, finish_reason(p, reason)
