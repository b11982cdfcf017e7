"""Schemathesis against the server's own OpenAPI schema on the tiny model (issue 7 item 4).

Every operation gets `EXAMPLES` generated cases (fixed seed, derandomized: the same cases on every
run; at least 500 in all), positive and negative. Checked: no 5xx, and every response matches the
schema (status codes and bodies). Auth is off here: tests/server/test_security.py covers the keys.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from server.app import create_app
from server.settings import Settings
from testkit.tiny import make_tiny

EXAMPLES = 100
MIN_CASES = 500
# Small limits keep every generated request cheap on the tiny model.
LIMITS = dict(max_tokens_limit=4, default_max_tokens=4, max_n=2, max_choices=2,
              max_compare_variants=2, max_prompt_tokens=256, max_body_bytes=65536,
              access_log=False)


@pytest.fixture(scope="module")
def api_schema(tiny_lm, tiny_pack):
    app = create_app(Settings(**LIMITS), lm=tiny_lm, packs=[tiny_pack])
    app.state.steer.extraction_model = lambda: make_tiny("qwen2")  # extraction jobs' model
    with TestClient(app):  # the lifespan: model installed, engine started
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def _fuzz(op, mode, seen: dict[str, int]) -> None:
    label = f"{op.method.upper()} {op.path} ({mode.value})"
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        seen[label] = seen.get(label, 0) + 1
        case.call_and_validate(checks=checks)

    try:
        run()
    except Unsatisfiable:  # negative data for an operation without parameters or body
        assert mode == GenerationMode.NEGATIVE, label


def test_api_fuzz(api_schema):
    seen: dict[str, int] = {}
    for result in api_schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(result.ok(), mode, seen)
    total = sum(seen.values())
    print(f"schemathesis: {total} cases over {len(seen)} operation/mode pairs")
    assert total >= MIN_CASES, seen
