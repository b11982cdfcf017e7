"""The engine thread's intra-op thread count, chosen by measuring decode steps.

A parallel region (an fbgemm matmul, attention, a large elementwise op) ends at a barrier that
waits for every worker thread. On cores shared with other processes a worker is often
descheduled, and the whole step waits for it: on this project's 2-core machine at load ≈ 20,
one int8 decode step (B = 1) took a median 4.1 s with 2 threads and 0.52 s with 1 (docs/engine.md).
On idle cores 2 threads win. So the engine measures, as a bandit with two arms would:

    every `period` decode steps:  `window` steps at each candidate count (1 and the maximum)
    then, until the next probe:   the candidate whose median step time was smaller

At int8 the count changed no result in the check made (the embedded model, prefill + 6 decode
steps, B = 1, 1 vs 2 threads: bit-identical; fbgemm's integer GEMM is exact). fp32 GEMMs (MKL)
may block a batch's rows differently at another thread count, and a tiny-model test comparing
two rows' logprobs to the last bit failed once with the tuner switching counts. So the engine
uses it only when asked (`Engine(tune_threads=True)`); the server asks at int8 unless told
otherwise (`STEER_TUNE_THREADS` / `steer serve --[no-]tune-threads`, server/engine/select.py).
Beside a running `steer eval` it kept the server 2.2-3.4x faster than without; on idle cores it
is neutral (bench/tune_threads.py, docs/engine.md).
"""

from __future__ import annotations

import statistics

import torch


class ThreadTuner:
    def __init__(self, max_threads: int | None = None, window: int = 4, period: int = 128):
        self.max_threads = max_threads or torch.get_num_threads()
        self.candidates = sorted({1, self.max_threads})
        self.window, self.period = window, period
        self.current = self.max_threads
        self._times: dict[int, list[float]] = {}
        self._probe: list[int] = []  # counts still to try, one window each
        self._left = 0  # steps until the next probe
        self._start_probe()

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def threads(self) -> int:
        """The count the next step runs with (set by `apply`)."""
        return self._probe[0] if self._probe else self.current

    def apply(self) -> None:
        if self.active and torch.get_num_threads() != self.threads():
            torch.set_num_threads(self.threads())

    def record(self, seconds: float) -> None:
        """One decode step's wall time, run at `threads()`."""
        if not self.active:
            return
        if self._probe:
            n = self._probe[0]
            self._times.setdefault(n, []).append(seconds)
            if len(self._times[n]) >= self.window:
                self._probe.pop(0)
                if not self._probe:
                    self.current = min(self._times, key=lambda k: statistics.median(self._times[k]))
                    self._left = self.period
            return
        self._left -= 1
        if self._left <= 0:
            self._start_probe()

    def _start_probe(self) -> None:
        self._times = {}
        self._probe = list(self.candidates) if self.active else []
