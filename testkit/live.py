"""Serve an app with uvicorn in a background thread on a free loopback port (for tests that need a
real HTTP server: the browser test, the client tests)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from testkit.server import free_port, wait_ready


@contextmanager
def serve_in_thread(app, ready_path: str = "/readyz", timeout_s: float = 60) -> Iterator[str]:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"test-server-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s, alive=thread.is_alive, interval_s=0.1, path=ready_path)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def app_client(lm, pack, **settings) -> Iterator:
    """An in-process TestClient of the server over `lm` with `pack`, errors as responses."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(**settings), lm=lm, packs=[pack])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@contextmanager
def app_url(lm, pack, **settings) -> Iterator[str]:
    """The server over `lm` with `pack` on a loopback port (no access log): its base URL."""
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(access_log=False, **settings), lm=lm, packs=[pack])
    with serve_in_thread(app) as url:
        yield url


@asynccontextmanager
async def asgi_client(app, after_start=None, **client_kwargs) -> AsyncIterator:
    """An httpx client over `app` in-process, with its lifespan run; `after_start()` is called
    once start-up is done (to patch what start-up itself must not see)."""
    import httpx

    async with app.router.lifespan_context(app):
        if after_start is not None:
            after_start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60,
                                     **client_kwargs) as client:
            yield client


def post_greedy(client, path: str, body: dict, max_tokens: int):
    """POST `body` to the in-process app's `path`, filling in the tiny model, its chat (unless a
    `prompt` is given), `max_tokens` and greedy decoding where the body leaves them out."""
    from testkit.tiny import HELLO, MODEL

    body.setdefault("model", MODEL)
    if "prompt" not in body:
        body.setdefault("messages", HELLO)
    body.setdefault("max_tokens", max_tokens)
    body.setdefault("temperature", 0)
    return client.post(path, json=body)
