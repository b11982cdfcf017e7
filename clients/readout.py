"""Reading the stream from the Python client: monitors, inspect, activation capture, raw vectors
and extraction jobs (the server side: `server.api.monitoring`, `server.api.readout`,
`server.api.raw_vectors`, `server.api.extract_jobs`).

    from clients import SteeringClient, Steering, Vector

    with SteeringClient(url, api_key=key) as c:
        r = c.chat("How do I pick a lock?", monitor=["refusal"], max_tokens=32)
        r.monitor["refusal"]["tokens"]               # one score per generated token
        acts = c.activations(["Hi", "How do I pick a lock?"], layers=[12], positions=[-1])
        acts.shape                                   # (2, 1, 1, d): numpy float32
        c.chat("Hi", steering=Steering("actadd", strength=2, vector=Vector.of(w, layer=12)))
        c.inspect("How do I pick a lock?").table()   # layer × token scores, lens, cosines
        job = c.extract("tone", positive=[...], negative=[...])
        c.wait_extraction(job["id"], on_progress=print)

Only numpy is needed besides httpx (the vectors go as little-endian float32, base64).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from steering.interventions.schema import VectorObject

SHADES = " .:-=+*#%@"  # a score's cell in the table, from ≤ 0 to ≥ 1


class Vector(VectorObject):
    """A steering object's own vector (`Steering(..., vector=Vector.of(values, layer=12))`):
    a [d] vector for actadd, a direction for ablate, an orthonormal [k, d] basis for the INLP
    methods (with `layer`)."""

    @classmethod
    def of(cls, values: Any, layer: int | None = None) -> Vector:
        array = np.ascontiguousarray(np.asarray(values, dtype=np.float32), dtype="<f4")
        return cls(data=base64.b64encode(array.tobytes()).decode(), shape=list(array.shape),
                   layer=layer)


def decode_activations(body: dict[str, Any]) -> np.ndarray:
    """A base64 capture response as a float32 array [prompts, layers, positions, d]."""
    dtype = "<f2" if body["dtype"] == "float16" else "<f4"
    values = np.frombuffer(base64.b64decode(body["data"]), dtype=dtype)
    return values.reshape(body["shape"]).astype(np.float32)


@dataclass
class Inspection:
    """`POST /v1/steering/inspect`: `scores[l, t]` is token t's residual entering layer l on
    that layer's DiM axis (harmless mean 0, harmful mean 1)."""

    pack: str
    layer: int
    tokens: list[str]
    prompt_tokens: int
    scores: np.ndarray  # [layers, tokens]
    promoted: list[dict[str, Any]]
    suppressed: list[dict[str, Any]]
    cosine: list[float]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @staticmethod
    def of(body: dict[str, Any]) -> Inspection:
        lens = body["logit_lens"]
        return Inspection(body["pack"], body["layer"], body["tokens"], body["prompt_tokens"],
                          np.asarray(body["scores"], dtype=np.float64), lens["promoted"],
                          lens["suppressed"], body["cosine"], body)

    def table(self, last: int = 24, width: int = 100) -> str:
        """A compact text rendering: the last `last` tokens' scores per layer as shades
        (' ' ≤ 0 … '@' ≥ 1), each layer's cosine with the pack's direction and its score at the
        last prompt token; then the logit lens."""
        n = len(self.tokens)
        cols = list(range(max(0, n - last), n))
        head = "".join(_cell_label(self.tokens[t]) for t in cols)
        lines = [f"pack {self.pack!r}, direction at layer {self.layer}; columns: the last "
                 f"{len(cols)} tokens ('|' before the completion)",
                 f"{'layer':>5} {'cos':>6} {'prompt':>7}  {_mark(head, cols, self.prompt_tokens)}"]
        for layer, row in enumerate(self.scores):
            cells = "".join(_shade(row[t]) for t in cols)
            lines.append(f"{layer:>5} {self.cosine[layer]:6.2f} "
                         f"{row[self.prompt_tokens - 1]:7.2f}  "
                         f"{_mark(cells, cols, self.prompt_tokens)}")
        promoted = " ".join(repr(x["token"]) for x in self.promoted)
        suppressed = " ".join(repr(x["token"]) for x in self.suppressed)
        lines += [f"promotes:   {promoted}"[:width], f"suppresses: {suppressed}"[:width]]
        return "\n".join(lines)


def _shade(x: float) -> str:
    if not np.isfinite(x):
        return "?"
    return SHADES[int(round(min(1.0, max(0.0, float(x))) * (len(SHADES) - 1)))]


def _cell_label(token: str) -> str:
    text = token.strip() or "·"
    return text[0]


def _mark(cells: str, cols: list[int], prompt_tokens: int) -> str:
    """`cells` with a '|' where the completion starts (when it is on screen)."""
    if prompt_tokens in cols:
        i = cols.index(prompt_tokens)
        return cells[:i] + "|" + cells[i:]
    return cells


class ReadoutMixin:
    """The methods `SteeringClient` gains for reading the stream (it provides `_send`: one
    HTTP call, errors raised as `SteeringServerError`)."""

    def _send(self, method: str, path: str,
              body: dict[str, Any] | None = None) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", path, body)

    def inspect(self, messages: str | Sequence[dict[str, Any]], *,
                completion: str | None = None, pack: str | None = None,
                layer: int | None = None, top_k: int = 10) -> Inspection:
        """POST /v1/steering/inspect: the heatmap, logit lens and cosines of a pack."""
        body: dict[str, Any] = {"top_k": top_k}
        if isinstance(messages, str):
            body["prompt"] = messages
        else:
            body["messages"] = list(messages)
        for key, value in (("completion", completion), ("pack", pack), ("layer", layer)):
            if value is not None:
                body[key] = value
        return Inspection.of(self._post("/v1/steering/inspect", body))

    def activations(self, prompts: Sequence[str | Sequence[dict[str, Any]]],
                    layers: Sequence[int], positions: Sequence[int] = (-1,), *,
                    chat: bool = True, dtype: str = "float16") -> np.ndarray:
        """POST /v1/activations: float32 [prompts, layers, positions, d]."""
        body = {"prompts": [p if isinstance(p, str) else list(p) for p in prompts],
                "layers": list(layers), "positions": list(positions), "chat": chat,
                "dtype": dtype}
        return decode_activations(self._post("/v1/activations", body))

    def extract(self, name: str, positive: Sequence[str | dict[str, Any]] | None = None,
                negative: Sequence[str | dict[str, Any]] | None = None, *,
                dataset: str | None = None, n: int | None = None,
                replace: bool = False) -> dict[str, Any]:
        """POST /v1/steering/packs/extract: the job (its `id`, status and progress)."""
        body: dict[str, Any] = {"name": name, "replace": replace}
        if dataset is not None:
            body["dataset"] = dataset
            if n is not None:
                body["n"] = n
        else:
            body["positive"], body["negative"] = list(positive or []), list(negative or [])
        return self._post("/v1/steering/packs/extract", body)

    def extraction(self, job_id: str) -> dict[str, Any]:
        """GET the job: status, stage, fraction, ETA; the pack once served."""
        return self._send("GET", f"/v1/steering/packs/extract/{job_id}")

    def cancel_extraction(self, job_id: str) -> dict[str, Any]:
        return self._send("DELETE", f"/v1/steering/packs/extract/{job_id}")

    def wait_extraction(self, job_id: str, *, poll_s: float = 1.0,
                        timeout_s: float | None = None,
                        on_progress: Callable[[dict[str, Any]], None] | None = None
                        ) -> dict[str, Any]:
        """Poll the job until it has ended (and, on success, its pack is served)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.extraction(job_id)
            if on_progress is not None:
                on_progress(job)
            ended = job["status"] not in ("queued", "running")
            if ended and (job["status"] != "succeeded" or job.get("served")):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"extraction job {job_id} still {job['status']} after "
                                   f"{timeout_s:g} s")
            time.sleep(poll_s)
