"""Every request limit in one place: `validate(state, body)` → a `ValidRequest`.

One step, as TGI's `validation.rs` is: every generating endpoint (chat and text completions,
compare) hands its parsed body to `validate`, which checks it against the limits the settings
declare (`server.settings`: each one a `STEER_*` variable and a `steer serve` flag, with one help
text) and against the loaded model and packs, and produces what the rest of the path reads. Every
refusal is a 4xx naming the field (`param`) with one `server.errors.ErrorCode`. (One file past
400 lines on purpose: every request limit in one place, issue 26.)

A request passes, in order:

| step | where | what | cost |
|---|---|---|---|
| schema | `server.api.protocol` | types, field combinations, a hard ceiling on every list (`at_most`, `server.settings.CEILING_*`) | linear in the body; no list is validated item by item past its ceiling |
| validate | here | the settings' limits (n, choices, messages, stop sequences, logprobs, max_tokens, variants), names, the model or preset, each steering object checked against its pack without a tensor (`check_spec`; an object with its own vector: its size from the text's length first, then its values, `server.api.raw_vectors`), the monitors against the packs (`server.api.monitoring`) | small, on the event loop |
| admission | `server.security.policy.enforce` | the key's policy on the checked steering; rate limits charged with `ValidRequest.estimate` | constant |
| tokenize, build | `server.api.prepare` | chat template and tokens (the tokenizer thread), steering tensors (a worker thread) | off the event loop |
| budget | here: `check_token_ids`, `check_budget` | token ids in the vocabulary; prompt tokens and max_tokens within the context | linear in the prompt |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from server.api.monitoring import resolve_monitors
from server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompareRequest,
    CompareVariant,
    CompletionRequest,
    SteeringParams,
    SteeringValue,
)
from server.api.raw_vectors import check_raw
from server.api.resolve import Checked, Part, Resolved, merge, resolve_model
from server.errors import APIError, ErrorCode, bad_request, not_found
from server.security.hardening import check_name
from server.security.policy import summed
from server.state import ServerState
from steering.interventions.methods import SteeringError, check_spec
from steering.interventions.monitors import MonitorSet
from steering.interventions.schema import AppliedSteering

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
COMPARE = "/v1/steering/compare"
ROLE_MAP = {"developer": "system"}
CHARS_PER_TOKEN = 4  # admission's estimate of a text prompt's tokens (settled once tokenized)


@dataclass
class Prompt:
    """One prompt as the request gives it, before tokenization: chat turns, text or token ids."""

    param: str  # the field its errors name
    turns: list[dict[str, Any]] | None = None
    text: str | None = None
    ids: list[int] | None = None

    @property
    def audit_text(self) -> str:
        """What the audit log hashes (never logs)."""
        if self.turns is not None:
            return "\x00".join(t["content"] for t in self.turns)
        return self.text if self.text is not None else str(self.ids)

    @property
    def chars(self) -> int:
        """Characters of text (a chat: all its messages' contents)."""
        if self.turns is not None:
            return sum(len(t["content"]) for t in self.turns)
        return len(self.text or "")

    def estimate(self) -> int:
        """Its tokens as admission guesses them (ids: exact; text: a token per
        `CHARS_PER_TOKEN` characters)."""
        if self.ids is not None:
            return len(self.ids)
        return -(-self.chars // CHARS_PER_TOKEN)


@dataclass
class ValidRequest:
    """A request that passed `validate`: what preparation, admission and the engine read."""

    kind: Literal["chat", "completion"]
    endpoint: str
    body: ChatCompletionRequest | CompletionRequest  # a compare's: the chat every variant runs
    prompts: list[Prompt]
    steering: list[Checked]  # one per run: the request's, or each compare variant's
    labels: list[str | None]  # compare: each variant's label
    max_tokens: int | None  # as asked (None: the default, cut to the context)
    max_tokens_param: str
    default_max_tokens: int
    estimate: int  # the tokens admission charges before tokenizing (settled after)
    monitors: MonitorSet = ()  # axes scored at every generated token (server.api.monitoring)

    @property
    def monitor_packs(self) -> list[str]:
        """The packs the monitors read (what the key's pack list judges)."""
        return [m.pack for m in self.monitors if m.position is not None]

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.body.n

    @property
    def prompt_texts(self) -> list[str]:
        return [p.audit_text for p in self.prompts]


# ---- the entry point ------------------------------------------------------------------------------


def validate(state: ServerState,
             body: ChatCompletionRequest | CompletionRequest | CompareRequest) -> ValidRequest:
    """Check `body` against the settings, the model and the packs; build nothing."""
    if isinstance(body, CompareRequest):
        return _compare(state, body)
    _check_sampling(state, body)
    if isinstance(body, ChatCompletionRequest):
        _check_top_logprobs(state, body.top_logprobs, "top_logprobs")
        requested, param = body.requested_max_tokens()
        prompts = [Prompt("messages", turns=chat_turns(body.messages))]
        kind, endpoint, default = "chat", CHAT, state.settings.default_max_tokens
    else:
        _check_top_logprobs(state, body.logprobs, "logprobs")
        requested, param = body.max_tokens, "max_tokens"
        prompts = _text_prompts(body)
        kind, endpoint = "completion", COMPLETIONS
        default = state.settings.default_completion_max_tokens
    _check_choices(state, len(prompts), body.n)
    _check_prompt_sizes(state, prompts)
    check_max_tokens(state, requested, param)
    steering = [check_steering(state, body.model, body.steering, names=True)]
    monitors = resolve_monitors(state, body.monitor)
    return ValidRequest(kind, endpoint, body, prompts, steering, [None], requested, param,
                        default, _estimate(state, prompts, body.n, requested, default), monitors)


# ---- the pieces -----------------------------------------------------------------------------------


def _check_sampling(state: ServerState, req: ChatCompletionRequest | CompletionRequest) -> None:
    """n, stop sequences and message counts within the settings' limits."""
    s = state.settings
    if req.n > s.max_n:
        raise bad_request(f"n must be at most {s.max_n}, got {req.n}", "n", ErrorCode.N_TOO_LARGE)
    stops = req.stop_list()
    if len(stops) > s.max_stop:
        raise bad_request(f"at most {s.max_stop} stop sequences are allowed, got {len(stops)}",
                          "stop", ErrorCode.TOO_MANY_STOP)
    for i, stop in enumerate(stops):
        if len(stop) > s.max_stop_chars:
            raise bad_request(f"stop sequences may be at most {s.max_stop_chars} characters, "
                              f"stop[{i}] has {len(stop)}", "stop", ErrorCode.STOP_TOO_LONG)
    messages = getattr(req, "messages", None)
    if messages is not None and len(messages) > s.max_messages:
        raise bad_request(f"at most {s.max_messages} messages are allowed, got "
                          f"{len(messages)}", "messages", ErrorCode.TOO_MANY_MESSAGES)


def _at_most(value: int | None, limit: int, param: str, code: ErrorCode) -> None:
    if value is not None and value > limit:
        raise bad_request(f"{param} must be at most {limit}, got {value}", param, code)


def _check_top_logprobs(state: ServerState, top: int | None, param: str) -> None:
    _at_most(top, state.settings.max_top_logprobs, param, ErrorCode.TOP_LOGPROBS_TOO_LARGE)


def _check_choices(state: ServerState, prompts: int, n: int) -> None:
    limit = state.settings.max_choices
    if prompts > limit:
        raise bad_request(f"at most {limit} prompts are allowed, got {prompts}", "prompt",
                          ErrorCode.TOO_MANY_PROMPTS)
    if prompts * n > limit:
        raise bad_request(f"a request may ask for at most {limit} choices (prompts × n), got "
                          f"{prompts * n}", "n", ErrorCode.TOO_MANY_CHOICES)


def check_max_tokens(state: ServerState, requested: int | None, param: str) -> None:
    _at_most(requested, state.settings.max_tokens_limit, param, ErrorCode.MAX_TOKENS_TOO_LARGE)


def message_text(i: int, message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"only text content parts are supported (got type "
                              f"{part.type!r})", f"messages[{i}].content[{j}]",
                              ErrorCode.UNSUPPORTED_CONTENT)
        texts.append(part.text)
    return "".join(texts)


def chat_turns(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it (text content; an assistant turn's tool
    calls and a tool turn's call id where given)."""
    turns = []
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": ROLE_MAP.get(m.role, m.role),
                                "content": message_text(i, m)}
        if m.tool_calls:
            turn["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def _text_prompts(req: CompletionRequest) -> list[Prompt]:
    prompts = req.prompts()
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt", ErrorCode.EMPTY_PROMPT)
    out = []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        out.append(Prompt(param, text=p) if isinstance(p, str) else Prompt(param, ids=list(p)))
    return out


def _check_prompt_sizes(state: ServerState, prompts: list[Prompt]) -> None:
    """Each prompt within the character limit before it is tokenized (tokenizing a long text
    costs seconds), and token-id prompts within the token limit."""
    s = state.settings
    chars = s.max_prompt_chars or 8 * state.lm.context_length
    for p in prompts:
        if p.ids is not None:
            if s.max_prompt_tokens is not None and len(p.ids) > s.max_prompt_tokens:
                raise bad_request(f"the prompt has {len(p.ids)} tokens; this server accepts "
                                  f"at most {s.max_prompt_tokens}", p.param,
                                  ErrorCode.PROMPT_TOO_LONG)
            continue
        n = p.chars
        if n > chars:
            raise bad_request(f"the prompt has {n} characters; this server accepts at most "
                              f"{chars} (setting max_prompt_chars)", p.param,
                              ErrorCode.PROMPT_TOO_LONG)


def _estimate(state: ServerState, prompts: list[Prompt], n: int, requested: int | None,
              default: int) -> int:
    """What admission charges before tokenizing: every prompt's estimated tokens and every
    choice's whole budget (max_tokens as asked, or the default cut to the context)."""
    budget = requested if requested is not None else min(default, state.lm.context_length - 1)
    return sum(p.estimate() for p in prompts) + len(prompts) * n * budget


def check_names(model: str | None, steering: SteeringValue | None) -> None:
    """The preset named in `model` and the packs named in `steering` (one object or a list) are
    plain names (no paths)."""
    parts = steering if isinstance(steering, list) else [steering]
    for i, part in enumerate(p for p in parts if p is not None):
        where = f"steering[{i}]" if isinstance(steering, list) else "steering"
        if part.pack is not None:
            check_name(part.pack, "pack", f"{where}.pack")
        if part.when is not None and part.when.pack is not None:
            check_name(part.when.pack, "pack", f"{where}.when.pack")
    if model and "+" in model:
        check_name(model.rpartition("+")[2], "preset", "model")


# ---- steering: checked against the settings and the packs, nothing built ---------------------------


def _at(param: str | None, where: str) -> str:
    """`steering.x` → `steering[1].x` for object 1 of a list (`where` is its name)."""
    param = param or "steering"
    if param == "steering" or param.startswith("steering."):
        return where + param[len("steering"):]
    return param


def _check_one(state: ServerState, params: SteeringParams, calibrated: bool,
               where: str) -> Part:
    """One steering object checked against the settings and the packs (no tensor built)."""
    settings = state.settings
    if calibrated:
        pack = state.packs.get(params.pack or state.default_pack or "")
        strength = pack.calibrated_strength(params.method) if pack is not None else None
        if strength is not None:
            params = params.model_copy(update={"strength": strength})
    lo, hi = settings.strength_min, settings.strength_max  # the operator's range; the library
    if params.method != "none" and not lo <= params.strength <= hi:  # checks the rest
        raise bad_request(f"{where}.strength must be between {lo:g} and {hi:g}, "
                          f"got {params.strength:g}", f"{where}.strength",
                          ErrorCode.STRENGTH_OUT_OF_RANGE)
    if params.vector is not None:  # the object's own vector instead of a pack's
        try:
            return check_raw(state, params, where, settings.max_vector_norm)
        except SteeringError as exc:
            raw = (exc.param or "").startswith(f"{where}.vector")
            raise bad_request(str(exc), _at(exc.param, where), ErrorCode.INVALID_VECTOR if raw
                              else ErrorCode.INVALID_STEERING) from None
    pack_name = params.pack or state.default_pack
    for name, field in ((params.pack, "pack"),
                        (params.when.pack if params.when else None, "when.pack")):
        if name is not None and name not in state.packs:
            known = ", ".join(sorted(state.packs)) or "none loaded"
            raise not_found(f"unknown steering pack {name!r}; loaded packs: {known}",
                            f"{where}.{field}", ErrorCode.PACK_NOT_FOUND)
    pack = state.packs.get(pack_name) if pack_name is not None else None
    if pack is not None and (why := pack.unsupported(params.method)):
        raise bad_request(why, f"{where}.method", ErrorCode.METHOD_NOT_IN_PACK)
    when_pack = state.packs.get(params.when.pack) if params.when and params.when.pack else None
    try:
        spec = check_spec(params.to_spec(pack_name), pack, when_pack)
    except SteeringError as exc:
        raise bad_request(str(exc), _at(exc.param, where), ErrorCode.INVALID_STEERING) from None
    return Part(spec, pack, when_pack)


def check_steering(state: ServerState, model: str | None, body: SteeringValue | None,
                   names: bool = False) -> Checked:
    """The request's model and steering, checked: presets expanded, every object validated
    against the settings and its pack, defaults resolved. No tensor is built (`Checked.build`
    does that, off the event loop), so the policy judges a request before it costs anything.
    With `names`, the preset and pack names are checked to be plain names first."""
    if names:
        check_names(model, body)
    model_id, preset = resolve_model(state, model)
    merged = merge(preset, body)
    listed = isinstance(body, list) or (body is None and preset is not None
                                        and isinstance(preset.steering, list))
    parts = [_check_one(state, params, calibrated, f"steering[{i}]" if listed else "steering")
             for i, (params, calibrated) in enumerate(merged)]
    name = preset.name if preset else None
    objects = [AppliedSteering(**p.applied(), preset=name) for p in parts]
    lo, hi = state.settings.strength_min, state.settings.strength_max
    for layer, total in summed(objects):  # repeats must stay in the range one object has
        if not lo <= total.strength <= hi:
            raise bad_request(f"the steering list's {total.method} objects at layer {layer} add "
                              f"up to strength {total.strength:g}; the sum must be between "
                              f"{lo:g} and {hi:g}", "steering", ErrorCode.STRENGTH_OUT_OF_RANGE)
    return Checked(model_id, preset, parts, listed, objects if listed else objects[0])


def resolve_steering(state: ServerState, model: str | None,
                     body: SteeringValue | None) -> Resolved:
    """`check_steering(...).build()`: checked and built at once (start-up, tests)."""
    return check_steering(state, model, body).build()


# ---- compare --------------------------------------------------------------------------------------


def _variant_param(i: int, param: str | None) -> str:
    base = f"variants[{i}]"
    if not param:
        return base
    if param.startswith("steering."):
        return f"{base}.{param[len('steering.'):]}"
    if param.startswith("steering["):  # an object of the variant's list
        return f"{base}.{param}"
    if param == "model":
        return f"{base}.preset"
    return f"{base} ({param})"


def for_variant(i: int, exc: APIError) -> APIError:
    """`exc` as variant `i`'s: its message starts with `variants[i]:` and its param names it."""
    return APIError(exc.status, f"variants[{i}]: {exc.message}", type=exc.type,
                    param=_variant_param(i, exc.param), code=exc.code, headers=exc.headers)


def _variant_model(state: ServerState, body: CompareRequest, preset: str | None) -> str | None:
    if preset is None:
        return body.model
    if "+" in preset:  # a full model id ("<served>+<preset>") is accepted too
        return preset
    return f"{body.model or state.served_name}+{preset}"


def _check_variant(state: ServerState, body: CompareRequest, i: int,
                   variant: str | CompareVariant) -> tuple[Checked, str | None]:
    """Variant `i`'s steering, checked (no tensor built), and its label."""
    if isinstance(variant, str):
        model, steering, label = _variant_model(state, body, variant), None, variant
    else:
        model, steering = _variant_model(state, body, variant.preset), variant.own_steering()
        label = variant.label
    try:
        return check_steering(state, model, steering, names=True), label
    except APIError as exc:
        raise for_variant(i, exc) from None


def _compare(state: ServerState, body: CompareRequest) -> ValidRequest:
    """A compare: one chat prompt, prepared once, and every variant's steering checked."""
    s = state.settings
    if len(body.variants) > s.max_compare_variants:
        raise bad_request(f"at most {s.max_compare_variants} variants are allowed, got "
                          f"{len(body.variants)}", "variants", ErrorCode.TOO_MANY_VARIANTS)
    chat = body.to_chat_request()
    _check_sampling(state, chat)
    prompts = [Prompt("messages", turns=chat_turns(chat.messages))]
    _check_prompt_sizes(state, prompts)
    check_max_tokens(state, chat.max_tokens, "max_tokens")
    checked, labels = zip(*(_check_variant(state, body, i, v)
                            for i, v in enumerate(body.variants)), strict=True)
    default = s.default_max_tokens
    each = _estimate(state, prompts, 1, chat.max_tokens, default)
    return ValidRequest("chat", COMPARE, chat, prompts, list(checked), list(labels),
                        chat.max_tokens, "max_tokens", default, each * len(checked))


# ---- the endpoints that read the stream (server.api.readout) ------------------------------------


def check_read_prompt(state: ServerState, param: str, messages: int | None = None,
                      tokens: int | None = None) -> None:
    """The message count and prompt token limits, for inspect and activation capture (their
    other bounds, on what they return, are `server.api.readout`'s)."""
    s = state.settings
    if messages is not None and messages > s.max_messages:
        raise bad_request(f"at most {s.max_messages} messages are allowed, got {messages}",
                          param, ErrorCode.TOO_MANY_MESSAGES)
    if tokens is not None and s.max_prompt_tokens is not None and tokens > s.max_prompt_tokens:
        raise bad_request(f"the prompt has {tokens} tokens; this server accepts at most "
                          f"{s.max_prompt_tokens}", param, ErrorCode.PROMPT_TOO_LONG)


# ---- after tokenization ---------------------------------------------------------------------------


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    """Token ids given by the request lie in the vocabulary (the tokenizer thread calls it)."""
    vocab = len(state.lm.tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0–{vocab - 1})",
                          param, ErrorCode.INVALID_TOKEN)


def check_budget(state: ServerState, valid: ValidRequest, prompt_len: int, param: str) -> int:
    """max_tokens for a prompt of `prompt_len` tokens: the request's, or the default cut to fit
    the context; 400 when the prompt is empty or too long, or prompt + max_tokens does not fit."""
    if prompt_len == 0:
        raise bad_request("prompt must not be empty", param, ErrorCode.EMPTY_PROMPT)
    limit = state.settings.max_prompt_tokens
    if limit is not None and prompt_len > limit:
        raise bad_request(f"the prompt has {prompt_len} tokens; this server accepts at most "
                          f"{limit}", param, ErrorCode.PROMPT_TOO_LONG)
    ctx = state.lm.context_length
    if prompt_len >= ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens, but the "
                          f"prompt has {prompt_len} tokens", param,
                          ErrorCode.CONTEXT_LENGTH_EXCEEDED)
    requested = valid.max_tokens
    if requested is None:
        return max(1, min(valid.default_max_tokens, ctx - prompt_len))
    if prompt_len + requested > ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens; the request "
                          f"asks for {prompt_len + requested} ({prompt_len} in the prompt, "
                          f"{requested} to generate)", valid.max_tokens_param,
                          ErrorCode.CONTEXT_LENGTH_EXCEEDED)
    return requested
