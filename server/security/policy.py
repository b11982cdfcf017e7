"""Per-key steering policy: which methods, packs and presets a key may use, how hard, how often.

A policy is checked against the *resolved* steering (after a preset is expanded and the body's
`steering` merged in), so a preset cannot lend a key a method it may not use. It speaks in the
direction of effect: a request that *lowers* refusal needs an explicit grant (`lower_refusal:
true`); without it a key may only keep or raise refusal. Per method, which strengths do what
(each method's record in `steering.catalog` states it; this table is its reading):

    method      raises refusal    lowers refusal          without the grant
    none        —                 —                       allowed
    actadd      strength > 0      strength < 0            strength ≥ 0
    ace         strength > 1      strength < 1 (0: none)  strength ≥ 1
    ablate      —                 any strength            refused
    inlp_null   —                 any strength            refused
    inlp_flip   —                 any strength            refused
    inlp_reflect harmless prompts harmful prompts         refused

(ACE, Marshall et al. 2024 eq. 3: h' = h − r̂r̂ᵀ(h − μ⁻) + α·‖r‖·r̂, so α = 0 sets the refusal
coordinate to the harmless mean's and α = 1 to the harmful one's; ActAdd: h' = h + α·r.) On top of that a key may set
signed per-method bounds, `strength: {actadd: {min: 0, max: 2}}`, and `max_strength` bounds
|strength| for every method. A steering object that carries its own vector (`vector`,
`steering.interventions.raw`) can do anything a pack's vector does and more, so it needs a grant
of its own, `raw_vectors: true` (the method, strength and refusal-lowering rules still apply;
the `packs` list does not, the vector being no pack).

    enforce(state, request, [applied], prompt=..., tokens=...)   # 403 / 429, or the caller's key

With authentication off (`STEER_AUTH` unset, local use) there is no key and no policy. Rate limits
are token buckets that may go into debt: a request larger than the bucket is admitted on a full
bucket and the bucket goes negative, so the average over time never exceeds the rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from server.context import request_context
from server.errors import APIError, ErrorCode
from steering.catalog import REGISTRY
from steering.interventions.schema import Applied, AppliedSteering

DEFAULT_METHODS = ("none", "actadd", "ace")
# The refusal-lowering methods and strengths come from each method's record
# (steering.catalog: `lowers`, `raises`).
LOWERING_METHODS = tuple(m.name for m in REGISTRY.values()
                         if m.lowers is not None and m.lowers.everything)


def lowers_refusal(method: str, strength: float) -> bool:
    """Whether steering with `method` at `strength` pushes the model away from refusing."""
    return method in REGISTRY and REGISTRY[method].lowers_refusal(strength)


def _safe_floor(method: str) -> float | None:
    """The least strength a key without the grant may use (None: no floor or never)."""
    bounds = REGISTRY[method].strength_without_grant if method in REGISTRY else None
    return bounds[0] if bounds else None


def effect(method: str) -> dict:
    """The method's direction of effect and the strengths a key without the grant may use."""
    m = REGISTRY[method]
    bounds = m.strength_without_grant
    return {"raises_refusal": m.raises.describe() if m.raises else None,
            "lowers_refusal": m.lowers.describe() if m.lowers else None,
            "requires_grant": bounds is None,
            "strength_without_grant": None if bounds is None else
            {"min": bounds[0], "max": bounds[1]}}


class PolicyError(ValueError):
    """A keys file whose policy cannot be used (`server.security.keysfile` validates it)."""


@dataclass(frozen=True)
class Policy:
    methods: frozenset[str] | None = frozenset(DEFAULT_METHODS)  # None: every method
    packs: frozenset[str] | None = None  # None: every loaded pack
    presets: frozenset[str] | None = None  # None: every preset
    max_strength: float | None = None  # largest |strength|
    max_k: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None  # prompt + max_tokens × n, charged at admission
    max_concurrent: int | None = None  # requests of the key in flight at once
    lower_refusal: bool = False  # the explicit grant to lower refusal
    raw_vectors: bool = False  # the grant to send a steering object's own vector (any effect)
    strength: tuple[tuple[str, float | None, float | None], ...] = ()  # signed (method, lo, hi)

    def bounds(self, method: str) -> tuple[float | None, float | None]:
        for m, lo, hi in self.strength:
            if m == method:
                return lo, hi
        return None, None


def _forbidden(key_id: str, rule: str, message: str) -> APIError:
    return APIError(403, f"key {key_id!r} is not allowed this request by policy rule "
                         f"'{rule}': {message}", type="permission_error",
                    param="steering", code=ErrorCode(f"policy_{rule}"))


def check(key_id: str, policy: Policy, applied: AppliedSteering) -> None:
    """403 naming the first rule `applied` breaks."""
    if applied.vector is not None and not policy.raw_vectors:
        raise _forbidden(key_id, "raw_vectors", "a steering object with its own vector can "
                         "raise or lower refusal at any strength; it needs the explicit "
                         "'raw_vectors' grant")
    if policy.methods is not None and applied.method not in policy.methods:
        raise _forbidden(key_id, "methods", f"method {applied.method!r} is not allowed "
                         f"(allowed: {', '.join(sorted(policy.methods)) or 'none'})")
    if applied.preset is not None and policy.presets is not None \
            and applied.preset not in policy.presets:
        raise _forbidden(key_id, "presets", f"preset {applied.preset!r} is not allowed "
                         f"(allowed: {', '.join(sorted(policy.presets)) or 'none'})")
    when_pack = (applied.when or {}).get("pack")
    own = applied.vector is not None and when_pack == applied.pack  # a raw vector's own axis
    if when_pack is not None and policy.packs is not None and when_pack not in policy.packs \
            and not own:
        raise _forbidden(key_id, "packs", f"condition pack {when_pack!r} is not allowed "
                         f"(allowed: {', '.join(sorted(policy.packs)) or 'none'})")
    if applied.method == "none":
        return
    if not policy.lower_refusal and lowers_refusal(applied.method, applied.strength):
        lo = _safe_floor(applied.method)
        allowed = "never" if lo is None else f"only at strength ≥ {lo:g}"
        raise _forbidden(key_id, "lower_refusal", f"{applied.method} at strength "
                         f"{applied.strength:g} lowers refusal, which needs the explicit "
                         f"'lower_refusal' grant (without it: {allowed})")
    lo, hi = policy.bounds(applied.method)
    if (lo is not None and applied.strength < lo) or (hi is not None and applied.strength > hi):
        raise _forbidden(key_id, "strength", f"{applied.method} strength {applied.strength:g} "
                         f"is outside [{'-∞' if lo is None else f'{lo:g}'}, "
                         f"{'∞' if hi is None else f'{hi:g}'}]")
    if policy.packs is not None and applied.vector is None and applied.pack not in policy.packs:
        raise _forbidden(key_id, "packs", f"pack {applied.pack!r} is not allowed "
                         f"(allowed: {', '.join(sorted(policy.packs)) or 'none'})")
    if policy.max_strength is not None and abs(applied.strength) > policy.max_strength:
        raise _forbidden(key_id, "max_strength", f"|strength| {abs(applied.strength):g} "
                         f"exceeds {policy.max_strength:g}")
    if policy.max_k is not None and applied.k is not None and applied.k > policy.max_k:
        raise _forbidden(key_id, "max_k", f"k {applied.k} exceeds {policy.max_k}")


def check_monitors(key_id: str, policy: Policy, packs: Sequence[str]) -> None:
    """Monitors read the stream and change no token, so they need no grant; a key whose policy
    lists `packs` may read only those packs' axes (a probe of the caller's own is no pack)."""
    if policy.packs is None:
        return
    for pack in packs:
        if pack not in policy.packs:
            raise APIError(403, f"key {key_id!r} is not allowed this request by policy rule "
                                f"'packs': monitor pack {pack!r} is not allowed (allowed: "
                                f"{', '.join(sorted(policy.packs)) or 'none'})",
                           type="permission_error", param="monitor",
                           code=ErrorCode.POLICY_PACKS)


def summed(parts: Sequence[AppliedSteering]) -> list[tuple[int, AppliedSteering]]:
    """A steering list's objects of one method that edit the same layer of the same pack, added
    up: (layer, one object at the summed strength) wherever two or more meet. Repeating an
    object must not reach a strength no single object may have (`[actadd 2] × 4` is `actadd 8`).
    The sum is exact for actadd (additions) and an upper bound for ace and the projections
    (repeats of those do not add up), and it ignores token windows (conservative)."""
    sums: dict[tuple[str, str | None, int], list[AppliedSteering]] = {}
    for a in parts:
        if a.method != "none":
            for layer in a.layers or []:
                sums.setdefault((a.method, a.pack, layer), []).append(a)
    return [(layer, AppliedSteering(method=method, pack=pack, layers=[layer],
                                    strength=sum(a.strength for a in group),
                                    k=max((a.k for a in group if a.k is not None), default=None),
                                    preset=group[0].preset))
            for (method, pack, layer), group in sums.items() if len(group) > 1]


def check_list(key_id: str, policy: Policy, parts: Sequence[AppliedSteering]) -> None:
    """`check` on every object of a steering list, then on what its repeats add up to."""
    for part in parts:
        check(key_id, policy, part)
    for layer, total in summed(parts):
        try:
            check(key_id, policy, total)
        except APIError as exc:
            exc.message = (f"{exc.message} (the steering list's {total.method} objects at "
                           f"layer {layer} add up to strength {total.strength:g})")
            raise


# ---- rate limits ----------------------------------------------------------------------------------


@dataclass
class _Bucket:
    """Level ≤ rate (the capacity); it refills at `rate` per minute and may go negative."""

    rate: float  # per minute; also the capacity
    level: float
    stamp: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate / 60.0)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` may be admitted (0: now). A cost above capacity is admitted on a
        full bucket and then charged in full (debt), so spending averages at most `rate`."""
        need = min(cost, self.rate) - self.level
        return 0.0 if need <= 0 else need * 60.0 / self.rate if self.rate > 0 else math.inf

    def charge(self, cost: float) -> None:
        self.level -= cost


class RateLimiter:
    """In-memory token buckets per key: requests per minute and tokens per minute."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._inflight: dict[str, int] = {}

    def acquire(self, key_id: str, limit: int | None) -> bool:
        """Take one of the key's `limit` in-flight slots (429 when none is free); False when
        there is no limit (nothing to release)."""
        if limit is None:
            return False
        with self._lock:
            held = self._inflight.get(key_id, 0)
            if held >= limit:
                raise APIError(429, f"key {key_id!r} already has {held} requests in flight "
                                    f"(its limit is {limit}); retry when one has finished",
                               type="rate_limit_error", code=ErrorCode.RATE_LIMIT_CONCURRENT,
                               headers={"Retry-After": "1"})
            self._inflight[key_id] = held + 1
        return True

    def release(self, key_id: str) -> None:
        with self._lock:
            held = self._inflight.get(key_id, 0) - 1
            if held > 0:
                self._inflight[key_id] = held
            else:
                self._inflight.pop(key_id, None)

    def inflight(self, key_id: str) -> int:
        with self._lock:
            return self._inflight.get(key_id, 0)

    def _bucket(self, key_id: str, kind: str, rate: float, now: float) -> _Bucket:
        b = self._buckets.get((key_id, kind))
        if b is None or b.rate != rate:
            b = self._buckets[(key_id, kind)] = _Bucket(rate, rate, now)
        b.refill(now)
        return b

    def take(self, key_id: str, policy: Policy, tokens: int) -> None:
        """Charge one request and `tokens`, or raise 429 with Retry-After (charging nothing)."""
        limits = [("requests", policy.requests_per_minute, 1.0),
                  ("tokens", policy.tokens_per_minute, float(tokens))]
        now = time.monotonic()
        with self._lock:
            buckets = [(kind, self._bucket(key_id, kind, rate, now), cost)
                       for kind, rate, cost in limits if rate is not None]
            for kind, b, cost in buckets:
                wait = b.wait_s(cost)
                if wait > 0:
                    retry = 3600 if math.isinf(wait) else max(1, math.ceil(wait))
                    raise APIError(429, f"rate limit reached for key {key_id!r}: "
                                        f"{b.rate:g} {kind} per minute; retry in {retry} s",
                                   type="rate_limit_error",
                                   code=ErrorCode(f"rate_limit_{kind}"),
                                   headers={"Retry-After": str(retry)})
            for _, b, cost in buckets:
                b.charge(cost)

    def adjust(self, key_id: str, policy: Policy, tokens: float) -> None:
        """Charge `tokens` more (a refund when negative) to the key's token bucket, without a
        check: the difference between what admission estimated and what the request costs."""
        if policy.tokens_per_minute is None or not tokens:
            return
        with self._lock:
            b = self._bucket(key_id, "tokens", policy.tokens_per_minute, time.monotonic())
            b.level = min(b.rate, b.level - tokens)

    def refund(self, key_id: str, policy: Policy, tokens: float) -> None:
        """Give back one request and `tokens` charged by `take` (capped at each bucket's rate)."""
        now = time.monotonic()
        with self._lock:
            for kind, rate, cost in (("requests", policy.requests_per_minute, 1.0),
                                     ("tokens", policy.tokens_per_minute, float(tokens))):
                if rate is not None:
                    b = self._bucket(key_id, kind, rate, now)
                    b.level = min(b.rate, b.level + cost)


# ---- the hook ----------------------------------------------------------------------------------


@dataclass
class Admission:
    """A request admitted by `enforce`: what was charged, so the cost can be settled once it is
    known (`settle`: the prompt's tokens, after tokenization)."""

    state: object
    key: object | None  # server.security.auth.ApiKey
    estimate: int
    refunded: bool = False

    def settle(self, tokens: int) -> None:
        """The request costs `tokens`: charge (or refund) the difference from the estimate."""
        if self.key is not None and tokens != self.estimate:
            _limiter(self.state).adjust(self.key.id, self.key.policy, tokens - self.estimate)
            self.estimate = tokens

    def refund(self) -> None:
        """Give the whole charge back (the request and its tokens): the engine refused the
        request (queue full, shutting down), so it never ran and a client that retries it is
        charged once. Policy refusals are not refunded (`enforce`)."""
        if self.key is not None and not self.refunded:
            _limiter(self.state).refund(self.key.id, self.key.policy, self.estimate)
            self.refunded = True


def enforce(state, request: Request, variants: Sequence[Applied],
            *, prompt: str | Iterable[str] | None = None, tokens: int = 0, endpoint: str | None
            = None, monitors: Sequence[str] = ()) -> Admission:
    """Admit a request: note each entry for the audit log, charge the caller's rate limits (429)
    and check its key against every checked steering of the request (403). `variants` holds one
    entry per steered run (a request, or each compare variant), each one object or a list whose
    every object is checked; `monitors` the packs the request's monitors read (the key's pack
    list, `check_monitors`; reading needs no grant); `tokens` is the admission's estimate of the request's cost (settle
    it with `Admission.settle`). Called before any tensor is built or any prompt tokenized: a
    refused request costs the server nothing more, and it is charged (a key cannot repeat
    refused requests for free). A key with `max_concurrent` holds one in-flight slot from here
    until its response has been sent (the request context's finalizers)."""
    from server.security import (
        audit,  # local: audit imports nothing from here, keeps the graph flat
    )

    key = request_context(request).api_key
    key_id = key.id if key is not None else None
    notes = [audit.note(request, a, prompt=prompt, tokens=tokens, key_id=key_id,
                        endpoint=endpoint) for a in variants]
    if key is None:
        audit.admission(request, notes)
        return Admission(state, None, tokens)
    limiter = _limiter(state)
    try:
        if limiter.acquire(key.id, key.policy.max_concurrent):  # released once answered
            request_context(request).finalizers.append(lambda: limiter.release(key.id))
        limiter.take(key.id, key.policy, tokens)
        for a in variants:
            check_list(key.id, key.policy, a if isinstance(a, list) else [a])
        check_monitors(key.id, key.policy, monitors)
    except APIError as exc:
        for n in notes:
            n["denied"] = exc.code
        audit.admission(request, notes, denied=exc)
        raise
    audit.admission(request, notes)
    admission = request_context(request).admission = Admission(state, key, tokens)
    return admission


def refund(request: Request) -> None:
    """Undo the admission's charge for a request the engine then refused (queue full, shutting
    down); its audit lines then show nothing charged."""
    ctx = request_context(request)
    if ctx.admission is not None:
        ctx.admission.refund()
    for entry in ctx.audit:
        entry["tokens_charged"] = 0


def _limiter(state) -> RateLimiter:
    if getattr(state, "rate_limiter", None) is None:
        state.rate_limiter = RateLimiter()
    return state.rate_limiter
