"""Running untrusted generated code: a subprocess of its own, with limits.

Each program runs in a fresh Python interpreter (`-I`: isolated mode, no user site, no
PYTHON* variables, the script's folder not on the path) in a throwaway directory that is deleted
afterwards, with

- a wall-clock limit (the process group is killed when it passes) and a CPU-time limit;
- an address-space limit (RLIMIT_AS), a file-size limit (RLIMIT_FSIZE), no core dumps, a limit on
  open files;
- no network: the process runs in a network namespace of its own (`unshare -n`: no interface but
  a downed loopback) where the kernel allows it, otherwise under a prelude that replaces
  `socket.socket` and `socket.create_connection` with functions that raise (weaker: a program
  can still undo it; the result says which isolation was used);
- an environment of PATH and HOME only, stdin from /dev/null, output captured and cut.

This is the containment HumanEval's authors ask for (Chen et al. 2021, §2.3: run untrusted
model code in a sandbox), with the limits of one Linux process; it is not a security boundary
against a determined attacker (use a container or VM for that).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NO_SOCKETS = """\
import socket as _s
def _blocked(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _blocked
_s.create_connection = _blocked
_s.socketpair = _blocked
del _s, _blocked
"""


@dataclass(frozen=True)
class Execution:
    status: str  # "passed", "failed", "timed out"
    returncode: int | None
    output: str  # stdout + stderr, cut to `max_output` characters
    isolation: str  # "netns" or "socket-guard"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Can this process start a child in a new network namespace (`unshare -n`)?"""
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(memory_mb: int, cpu_seconds: int, file_mb: int):
    def apply() -> None:
        os.setsid()  # its own process group: a timeout kills everything it started
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * mb, memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * mb, file_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    return apply


def run_sandboxed(program: str, timeout: float = 10.0, memory_mb: int = 1024,
                  file_mb: int = 16, max_output: int = 4000) -> Execution:
    """Run `program` (Python source) under the limits above; passed = exit status 0."""
    netns = network_namespace_available()
    isolation = "netns" if netns else "socket-guard"
    source = program if netns else NO_SOCKETS + program
    with tempfile.TemporaryDirectory(prefix="steer-sandbox-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w") as f:
            f.write(source)
        command = [sys.executable, "-I", path]
        if netns:
            command = ["unshare", "-n", "--", *command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work}
        proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_limits(memory_mb, int(timeout) + 1, file_mb))
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            status = "timed out"
    text = out.decode("utf-8", "replace")[-max_output:]
    return Execution(status, proc.returncode, text, isolation)
