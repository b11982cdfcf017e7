"""Shared fixtures of the server tests on the tiny model."""

from __future__ import annotations

import pytest

from testkit.live import app_client


@pytest.fixture(scope="module")
def client(request, tiny_lm, tiny_pack):
    """The in-process app on the tiny model, with the test module's `LIMITS` settings (a module
    that needs another app defines its own `client`)."""
    with app_client(tiny_lm, tiny_pack, **getattr(request.module, "LIMITS", {})) as c:
        yield c
