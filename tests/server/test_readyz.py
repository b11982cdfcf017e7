"""Issue 28 item 10 on the tiny model: /readyz answers 503 once the engine thread has died, so
the replica leaves the load balancer's rotation (before, only /healthz noticed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("probe", ["/readyz", "/healthz"])
def test_probes_fail_when_the_engine_thread_dies(probe, tiny_lm, tiny_pack):
    app = create_app(Settings(), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get(probe).status_code == 200
        engine = app.state.steer.engine
        thread = engine._thread

        def die(*args, **kwargs):
            raise SystemExit("killed by the test")  # not an Exception: escapes the loop

        engine._wakeup.wait = die
        engine._wakeup.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        r = c.get(probe)
        assert r.status_code == 503, r.text
        if probe == "/readyz":
            assert r.json()["status"] == "failed" and "engine" in r.json()["error"]
            assert "Retry-After" in r.headers
