"""Start and stop a real `steer serve` process on a free loopback port (benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True,
               interval_s: float = 0.2, path: str = "/readyz") -> None:
    """Poll `url + path` until it answers 200; RuntimeError when `alive()` turns false or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise RuntimeError(f"the server at {url} stopped before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} was not ready in {timeout_s:.0f} s")
        time.sleep(interval_s)


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None, log_path: str | None = None,
                 port: int | None = None, python: str | None = None):
        """`python`: the interpreter whose `steer` script runs the server (default: this one's;
        e.g. the main virtualenv's while a bench runs under vLLM's)."""
        self.port = port or free_port()  # a given port: e.g. a restart in a stopped one's place
        self.url = f"http://127.0.0.1:{self.port}"
        steer = Path(python or sys.executable).with_name("steer")
        cmd = [str(steer), "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        self._log = open(log_path or os.devnull, "wb")
        # This checkout's code first: the `steer` script imports the installed package, which
        # in a second worktree (or any checkout but the installed one) is another copy.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": path, **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 1800) -> None:
        try:
            wait_ready(self.url, timeout_s, alive=lambda: self.proc.poll() is None, interval_s=1.0)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (exit code {self.proc.returncode}):\n{self.log_tail()}") \
                from None

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None:
            return "(no log kept)"
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def served_model(self) -> str:
        """The base model id the server answers to (first entry of /v1/models)."""
        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def thread_niceness(self) -> dict[int, int]:
        """Each thread's niceness (Linux /proc), by thread id; the main thread's id is the pid."""
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = int(fields[16])  # field 19 of stat: nice
        return out

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RssSampler:
    """A server process's VmRSS sampled every `every_s` seconds in a background thread, while
    the `with` block runs: `samples` [(monotonic time, kB)] and `peak_kb`."""

    def __init__(self, server: ServerProcess, every_s: float = 0.2):
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, int]] = []
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            kb = self.server.rss_kb()
            self.samples.append((time.monotonic(), kb))
            self.peak_kb = max(self.peak_kb, kb)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_script(name: str):
    """The module scripts/<name>.py (the scripts folder is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples (at `url`/metrics) whose labels include
    `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
