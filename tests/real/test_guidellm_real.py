"""guidellm end to end against the real server (issue 31, item 1): guidellm 0.8.1, unmodified, in
its own virtual environment (testkit/venvs.py; `torch==2.13.0` pinned beside it, the CPU build),
offline (the embedded model's tokenizer saved to a folder as its processor, synthetic data),
with the steering chosen by the model name alone.

What guidellm reports is checked against the server's own counters, so the test fails if
guidellm did not really drive the server: every request it counts as successful is one the
server answered 200 with the preset's method, and the output tokens it counts are the tokens the
server generated for that method. Run by `make test-clients` (not `make test`: the first run
installs guidellm, minutes)."""

from __future__ import annotations

import pytest

from testkit.server import metric

pytestmark = [pytest.mark.real, pytest.mark.clients]

N_REQUESTS = 3
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def guidellm_bin(outside_clients):
    from bench.guidellm import guidellm_venv

    bin_dir, _ = guidellm_venv()
    return bin_dir


def test_guidellm_drives_the_server_through_a_preset_name(real_server, guidellm_bin, tmp_path):
    from bench.guidellm import (
        read_benchmarks,
        save_tokenizer,
        scenario,
        start_guidellm,
        tokenizer_of,
        wait,
    )

    model = f"{real_server.served_model()}+ablate"
    processor = save_tokenizer(tokenizer_of(None), tmp_path / "tokenizer")
    spec = scenario(real_server.url, model, processor, prompt_tokens=24, tokens=OUTPUT_TOKENS,
                    profile={"kind": "concurrent", "streams": [1]}, seconds=600,
                    out=tmp_path / "report.json")
    spec["spec"]["constraints"].append({"kind": "max_requests", "count": N_REQUESTS})
    before = metric(real_server.url, "steer_requests_total", method="ablate", status="200")
    tokens_before = metric(real_server.url, "steer_generation_tokens_total", method="ablate")
    wait([start_guidellm(guidellm_bin, spec, tmp_path, "run")], tmp_path, ["run"])

    [row] = read_benchmarks(tmp_path / "report.json")
    assert row["requests"] == N_REQUESTS and not row["incomplete"], row
    assert row["output_tokens_mean"] == OUTPUT_TOKENS  # guidellm sent ignore_eos
    assert row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0 and row["tokens_per_s"] > 0
    served = metric(real_server.url, "steer_requests_total", method="ablate", status="200")
    assert served - before == N_REQUESTS
    generated = metric(real_server.url, "steer_generation_tokens_total", method="ablate")
    assert generated - tokens_before == N_REQUESTS * OUTPUT_TOKENS
    # guidellm's readiness probe: vLLM's /health, which the server answers as /healthz
    assert metric(real_server.url, "steer_http_requests_total", endpoint="/health",
                  status="200") >= 1
