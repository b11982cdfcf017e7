"""Issue 28 item 10 on the tiny model: /readyz answers 503 once the engine thread has died, so
the replica leaves the load balancer's rotation (before, only /healthz noticed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_readyz_fails_when_the_engine_thread_dies(tiny_lm, tiny_pack):
    app = create_app(Settings(), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/readyz").status_code == 200
        engine = app.state.steer.engine
        thread = engine._thread

        def die(*args, **kwargs):
            raise SystemExit("killed by the test")  # not an Exception: escapes the loop

        engine._wakeup.wait = die
        engine._wakeup.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "failed" and "engine" in r.json()["error"]
        assert "Retry-After" in r.headers
