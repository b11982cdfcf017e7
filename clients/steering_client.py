"""A small typed client for the steering server: chat (plain and streamed), compare, models.

(Why one ~440-line module: the blocking and the async client mirror each other method for
method over shared request builders and result parsers; kept side by side so they cannot drift.)

    from clients import Steering, SteeringClient

    with SteeringClient("http://127.0.0.1:8000") as c:
        print(c.chat("How do I pick a lock?", steering=Steering("actadd", strength=2)).text)
        for delta in c.stream_chat("Hello", preset="no-refusal"):
            print(delta, end="", flush=True)
        for v in c.compare("How do I pick a lock?", ["none", Steering("ablate"), "no-refusal"]):
            print(v.index, v.is_refusal, v.completion)
        # a list (applied in order), generation-only, conditional on the prompt's refusal score
        both = [Steering("ablate"), Steering("actadd", strength=4, apply_to="generation",
                                             when=Condition(above=0.5))]
        print(c.chat("Hello", steering=both).steering)
        for event in c.stream_compare("Hello", ["none", both]):  # variants side by side
            print(event.index, event.type, event.text)

`AsyncSteeringClient` has the same methods as coroutines (`stream_chat` and `stream_compare` are
async iterators).
Only `httpx` and `httpx-sse` (which parses the event stream) are needed. A preset is chosen with `preset=` (the request's model becomes
`<model>+<preset>`); a `Steering` object overrides the preset field by field, as on the server.
Errors come back as `SteeringServerError` with the server's OpenAI-style `message`/`param`/`code`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from clients.readout import ReadoutMixin
from steering.interventions.schema import ConditionObject, SteeringObject

Messages = str | Sequence[dict[str, Any]]


class Condition(ConditionObject):
    """`when`: apply the steering only if the prompt's score on a pack's DiM axis (harmless mean
    0, harmful mean 1) is above or below a threshold. Give exactly one of `above`, `below`.
    (The server's own schema, `steering.interventions.schema`.)"""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Steering(SteeringObject):
    """The `steering` object of a request (the server's own schema, so a typo fails here);
    fields left unset take the server's defaults: `Steering("actadd", strength=2)`.

    `apply_to`: "all", "prompt" or "generation"; `generation_window`: [start, end) of generated
    tokens (end may be None); `when`: a `Condition` (or a dict). A request may carry a list."""

    def __init__(self, method: str | None = None, /, **fields: Any):
        fields = {k: v for k, v in fields.items() if v is not None}  # None: the server's default
        if method is not None:
            fields["method"] = method
        super().__init__(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method,
                **self.model_dump(exclude_unset=True, exclude_none=True, exclude={"method"})}


SteeringLike = Steering | dict[str, Any] | Sequence[Steering | dict[str, Any]]
Variant = str | SteeringLike


class SteeringServerError(RuntimeError):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(f"{status}: {message}" + (f" (param {param})" if param else ""))
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    steering: dict[str, Any] | list[dict[str, Any]]  # as applied (a list for a list)
    usage: dict[str, int]
    model: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    monitor: dict[str, Any] | None = None  # with `monitor=[...]`: per monitor tokens, mean, max


@dataclass
class VariantResult:
    index: int
    completion: str
    is_refusal: bool
    refusal_score: float | None
    refusal_score_exact: bool
    completion_tokens: int
    time_s: float
    steering: dict[str, Any] | list[dict[str, Any]]
    finish_reason: str | None = None
    label: str | None = None
    model: str | None = None
    ttft_s: float | None = None


@dataclass
class CompareResult:
    model: str
    seed: int
    prompt_tokens: int
    time_s: float
    variants: list[VariantResult]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def __iter__(self) -> Iterator[VariantResult]:
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)


@dataclass
class CompareEvent:
    """One event of a streamed compare: `type` is "start" (the variants, in `raw`), "delta"
    (new `text` of variant `index`), "variant" (variant `index` finished: `result`) or "done"
    (all finished: `compare`)."""

    type: str
    index: int | None = None
    text: str = ""
    result: VariantResult | None = None
    compare: CompareResult | None = None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


# ---- request building and parsing (shared by both clients) --------------------------------------


def _messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _one(steering: Steering | dict[str, Any]) -> dict[str, Any]:
    return steering.to_dict() if isinstance(steering, Steering) else dict(steering)


def _steering(steering: SteeringLike | None) -> dict[str, Any] | list[dict[str, Any]] | None:
    if steering is None:
        return None
    if isinstance(steering, Steering | dict):
        return _one(steering)
    return [_one(s) for s in steering]


def _sampling(max_tokens, temperature, top_p, seed) -> dict[str, Any]:
    out = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    return {k: v for k, v in out.items() if v is not None}


def _chat_body(model: str | None, messages: Messages, steering, preset: str | None,
               stream: bool, sampling: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    name = model
    if preset:
        name = f"{model}+{preset}" if model else None
    body: dict[str, Any] = {"messages": _messages(messages), **sampling, **extra}
    if name:
        body["model"] = name
    elif preset:  # model unknown yet: the caller resolves it first
        raise ValueError("a preset needs the model name")
    s = _steering(steering)
    if s is not None:
        body["steering"] = s
    if stream:
        body["stream"] = True
    return body


def _variant(v: Variant) -> str | dict[str, Any] | list[dict[str, Any]]:
    return v if isinstance(v, str) else _steering(v)


def _compare_body(model: str | None, messages: Messages, variants: Sequence[Variant],
                  sampling: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": _messages(messages),
                            "variants": [_variant(v) for v in variants], **sampling, **extra}
    if model:
        body["model"] = model
    return body


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        raise SteeringServerError(r.status_code, err.get("message", r.text), err.get("param"),
                                  err.get("code"))
    except (ValueError, KeyError, TypeError):
        raise SteeringServerError(r.status_code, r.text or r.reason_phrase) from None


def _chat_result(data: dict[str, Any]) -> ChatResult:
    choice = data["choices"][0]
    return ChatResult(text=choice["message"]["content"] or "",
                      finish_reason=choice.get("finish_reason"), steering=data.get("steering", {}),
                      usage=data.get("usage", {}), model=data.get("model", ""), raw=data,
                      monitor=choice.get("monitor"))


def _variant_result(item: dict[str, Any]) -> VariantResult:
    names = VariantResult.__dataclass_fields__
    return VariantResult(**{k: v for k, v in item.items() if k in names})


def _compare_result(data: dict[str, Any]) -> CompareResult:
    variants = [_variant_result(item) for item in data["variants"]]
    return CompareResult(model=data["model"], seed=data["seed"],
                         prompt_tokens=data["prompt_tokens"], time_s=data["time_s"],
                         variants=variants, raw=data)


def _sse_data(event: ServerSentEvent) -> tuple[bool, dict[str, Any] | None]:
    """(done, JSON payload) of one server-sent event (parsed by httpx-sse); errors raise."""
    if not event.data:
        return False, None
    if event.data.strip() == "[DONE]":
        return True, None
    data = json.loads(event.data)
    if "error" in data:
        err = data["error"]
        raise SteeringServerError(500, err.get("message", "stream failed"), err.get("param"),
                                  err.get("code"))
    return False, data


def _compare_event(data: dict[str, Any]) -> CompareEvent:
    kind = data.get("type", "")
    if kind == "variant":
        return CompareEvent(kind, data.get("index"), result=_variant_result(data["result"]),
                            raw=data)
    if kind == "done":
        return CompareEvent(kind, compare=_compare_result(data["compare"]), raw=data)
    return CompareEvent(kind, data.get("index"), text=data.get("text") or "", raw=data)


def _chat_delta(data: dict[str, Any]) -> str | None:
    """The text delta of one chat-stream chunk (None for a usage-only chunk)."""
    choices = data.get("choices") or []
    if not choices:
        return None
    return (choices[0].get("delta") or {}).get("content") or None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ---- the clients --------------------------------------------------------------------------------


class SteeringClient(ReadoutMixin):
    """Synchronous client. `model` defaults to the server's first model (GET /v1/models).
    Reading the stream (inspect, activations, extraction jobs): `clients.readout`; monitors:
    `chat(..., monitor=["refusal"])` (`ChatResult.monitor`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0,
                 http: httpx.Client | None = None):
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout,
                                          headers=_headers(api_key))

    def __enter__(self) -> SteeringClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._http.post(path, json=body)
        _raise_for(r)
        return r.json()

    def _send(self, method: str, path: str,
              body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self._http.request(method, path, json=body)
        _raise_for(r)
        return r.json()

    def models(self) -> list[dict[str, Any]]:
        """The served model and its presets (`<model>+<preset>` ids)."""
        r = self._http.get("/v1/models")
        _raise_for(r)
        return r.json()["data"]

    def model(self) -> str:
        if self._model is None:
            self._model = self.models()[0]["id"]
        return self._model

    def presets(self) -> list[str]:
        return [m["id"].split("+", 1)[1] for m in self.models() if "+" in m["id"]]

    def chat(self, messages: Messages, *, steering: SteeringLike | None = None,
             preset: str | None = None, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, **extra: Any) -> ChatResult:
        body = _chat_body(self.model(), messages, steering, preset, False,
                          _sampling(max_tokens, temperature, top_p, seed), extra)
        return _chat_result(self._post("/v1/chat/completions", body))

    def stream_chat(self, messages: Messages, *, steering: SteeringLike | None = None,
                    preset: str | None = None, max_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None,
                    seed: int | None = None, **extra: Any) -> Iterator[str]:
        """Yields the completion's text deltas as they are generated."""
        body = _chat_body(self.model(), messages, steering, preset, True,
                          _sampling(max_tokens, temperature, top_p, seed), extra)
        for data in self._sse_events("/v1/chat/completions", body):
            if delta := _chat_delta(data):
                yield delta

    def compare(self, messages: Messages, variants: Sequence[Variant], *,
                max_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None,
                **extra: Any) -> CompareResult:
        """POST /v1/steering/compare: each variant is a preset name, a `Steering` or a dict."""
        body = _compare_body(self._model, messages, variants,
                             _sampling(max_tokens, temperature, top_p, seed), extra)
        return _compare_result(self._post("/v1/steering/compare", body))

    def stream_compare(self, messages: Messages, variants: Sequence[Variant], *,
                       max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, seed: int | None = None,
                       **extra: Any) -> Iterator[CompareEvent]:
        """The compare as one server-sent-event stream: every variant's deltas as they are
        generated (tagged by index), each variant's result, then the whole comparison."""
        body = _compare_body(self._model, messages, variants,
                             _sampling(max_tokens, temperature, top_p, seed),
                             {**extra, "stream": True})
        for data in self._sse_events("/v1/steering/compare", body):
            yield _compare_event(data)

    def _sse_events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` and yield each server-sent event's JSON payload until [DONE]."""
        with connect_sse(self._http, "POST", path, json=body) as source:
            r = source.response
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for event in source.iter_sse():
                done, data = _sse_data(event)
                if done:
                    return
                if data is not None:
                    yield data


class AsyncSteeringClient:
    """The same API as `SteeringClient`, with coroutines (and an async `stream_chat`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0,
                 http: httpx.AsyncClient | None = None):
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                               headers=_headers(api_key))

    async def __aenter__(self) -> AsyncSteeringClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self._http.post(path, json=body)
        _raise_for(r)
        return r.json()

    async def models(self) -> list[dict[str, Any]]:
        r = await self._http.get("/v1/models")
        _raise_for(r)
        return r.json()["data"]

    async def model(self) -> str:
        if self._model is None:
            self._model = (await self.models())[0]["id"]
        return self._model

    async def presets(self) -> list[str]:
        return [m["id"].split("+", 1)[1] for m in await self.models() if "+" in m["id"]]

    async def chat(self, messages: Messages, *, steering: SteeringLike | None = None,
                   preset: str | None = None, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None,
                   seed: int | None = None, **extra: Any) -> ChatResult:
        body = _chat_body(await self.model(), messages, steering, preset, False,
                          _sampling(max_tokens, temperature, top_p, seed), extra)
        return _chat_result(await self._post("/v1/chat/completions", body))

    async def stream_chat(self, messages: Messages, *, steering: SteeringLike | None = None,
                          preset: str | None = None, max_tokens: int | None = None,
                          temperature: float | None = None, top_p: float | None = None,
                          seed: int | None = None, **extra: Any) -> AsyncIterator[str]:
        body = _chat_body(await self.model(), messages, steering, preset, True,
                          _sampling(max_tokens, temperature, top_p, seed), extra)
        async for data in self._sse_events("/v1/chat/completions", body):
            if delta := _chat_delta(data):
                yield delta

    async def compare(self, messages: Messages, variants: Sequence[Variant], *,
                      max_tokens: int | None = None, temperature: float | None = None,
                      top_p: float | None = None, seed: int | None = None,
                      **extra: Any) -> CompareResult:
        body = _compare_body(self._model, messages, variants,
                             _sampling(max_tokens, temperature, top_p, seed), extra)
        return _compare_result(await self._post("/v1/steering/compare", body))

    async def stream_compare(self, messages: Messages, variants: Sequence[Variant], *,
                             max_tokens: int | None = None, temperature: float | None = None,
                             top_p: float | None = None, seed: int | None = None,
                             **extra: Any) -> AsyncIterator[CompareEvent]:
        body = _compare_body(self._model, messages, variants,
                             _sampling(max_tokens, temperature, top_p, seed),
                             {**extra, "stream": True})
        async for data in self._sse_events("/v1/steering/compare", body):
            yield _compare_event(data)

    async def _sse_events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with aconnect_sse(self._http, "POST", path, json=body) as source:
            r = source.response
            if r.status_code >= 400:
                await r.aread()
                _raise_for(r)
            async for event in source.aiter_sse():
                done, data = _sse_data(event)
                if done:
                    return
                if data is not None:
                    yield data
