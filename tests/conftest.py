"""Shared fixtures: tiny random models built from configs (no download), and the real model."""

from __future__ import annotations

import os
from contextlib import contextmanager

# Under pytest-xdist (`make test` runs the fast set on every core) each worker gets its share of
# the cores: torch's default of one thread per core in every worker oversubscribes the machine
# (OpenMP threads spin), which slowed a 2-worker run several times over. Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import pytest  # noqa: E402

from testkit.tiny import make_tiny  # noqa: E402, F401 (tests import it from here too)


@pytest.fixture(scope="session")
def tiny_lm():
    return make_tiny("qwen2")


@pytest.fixture(scope="session")
def tiny_pack(tiny_lm):
    from steering.extraction.extract import ExtractConfig, extract_pack
    from steering.extraction.inlp import InlpConfig

    config = ExtractConfig(n_train=24, n_train_harmless=None, n_val_harmless=6, n_val_harmful=6, layer_stride=1,
                           min_layer_fraction=0.0, calibrate_strengths=(1.0, 2.0),
                           inlp=InlpConfig(max_directions=4, chance_margin=0.0, p_value=1.0))
    return extract_pack(tiny_lm, config=config, name="refusal")


@pytest.fixture(scope="session")
def outside_clients(request):
    """Tests of outside programs (marker `clients`) run only when asked for — `make
    test-clients` or `pytest -m clients` — as their first run installs lm-eval / guidellm into
    their own venvs (minutes; docs/clients.md)."""
    expr = request.config.option.markexpr or ""
    if "clients" not in expr or "not clients" in expr:
        pytest.skip("installs lm-eval / guidellm on first use: `make test-clients`, "
                    "or pytest -m clients")


def real_model_enabled() -> bool:
    return os.environ.get("STEERING_SKIP_REAL", "") not in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def real_lm():
    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    from steering import load_model

    return load_model("embedded", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_pack(real_lm):
    from steering.extraction.store import ensure_pack

    return ensure_pack(real_lm)


@contextmanager
def serve_real(env: dict[str, str]):
    """A real `steer serve` process on the embedded model with `env`, on a free loopback port."""
    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    from testkit.server import ServerProcess

    with ServerProcess(env=env) as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="session")
def real_server():
    """The real server at fp32 (the figures the real tests assert were measured at fp32), one
    for the whole run: the modules that use it only read (no pack changes, no policy), so one
    start serves them all."""
    with serve_real({"STEER_DEVICE": "cpu", "STEER_DTYPE": "float32"}) as proc:
        yield proc
