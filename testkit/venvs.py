"""Separate virtual environments for outside programs whose pins clash with ours (guidellm,
lm-evaluation-harness): created on first use under the cache root, one per requirement set,
and reused after that. Only the package index is needed (pip's own configuration)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path


def cache_root() -> Path:
    """Where the model cache lives (`STEERING_CACHE`, else ~/.cache/steering): the venvs go
    beside it, so a fresh checkout on the same machine reuses them."""
    return Path(os.environ.get("STEERING_CACHE", Path.home() / ".cache" / "steering"))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout stays the caller's (a path, a table)


def ensure_venv(name: str, requirements: list[str], log=_say) -> tuple[Path, float | None]:
    """(the venv's bin folder, seconds its install took now or None when it was there already).
    The folder is `<cache root>/venvs/<name>-<hash of the requirements>`; an interrupted install
    leaves no stamp and is redone."""
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    root = cache_root() / "venvs" / f"{name}-{digest}"
    stamp = root / ".installed"
    if stamp.is_file():
        return root / "bin", None
    log(f"installing {' '.join(requirements)} into {root} (first use; minutes)...")
    t0 = time.monotonic()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(root)], check=True)
    done = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           *requirements], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if not x.startswith("WARNING: Location")]
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n"
                           + "\n".join(lines[-30:]))
    seconds = time.monotonic() - t0
    stamp.write_text(f"{seconds:.0f} s\n")
    log(f"installed in {seconds:.0f} s")
    return root / "bin", seconds
