"""The FastAPI application and `steer serve`.

`create_app(settings, lm=None, packs=None)`: with a preloaded model (tests, notebooks) the engine
starts with the app; without one, the model and its default pack load in a background thread at
startup (extracting and caching the pack on first start), and `/readyz` answers 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

import steering
from server.api import errors
from server.api.compare import router as compare_router
from server.api.completions import router as completions_router
from server.api.pack_admin import router as pack_admin_router
from server.api.playground import router as playground_router
from server.api.routes import router
from server.api.validation import resolve_steering
from server.engine import Engine
from server.errors import APIError
from server.lifecycle import InflightMiddleware, drain
from server.observability.accesslog import AccessLogMiddleware, JsonFormatter, access_log
from server.observability.metrics import Metrics
from server.packs import load_extra_packs, shipped_concept_packs
from server.presets import load_presets
from server.security.audit import AuditMiddleware
from server.security.auth import AuthMiddleware, load_keys
from server.security.hardening import BodyLimitMiddleware
from server.settings import Settings
from server.state import ServerState
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack

log = logging.getLogger("server")


def _as_pack_dict(packs: Mapping[str, SteeringPack] | Iterable[SteeringPack] | SteeringPack | None
                  ) -> dict[str, SteeringPack]:
    if packs is None:
        return {}
    if isinstance(packs, SteeringPack):
        return {packs.name: packs}
    if isinstance(packs, Mapping):
        return dict(packs)
    return {p.name: p for p in packs}


def install_model(state: ServerState, lm: LoadedModel, packs) -> None:
    """Attach the model and packs, and keep only the presets that apply to them."""
    state.lm = lm
    state.packs = _as_pack_dict(packs)
    extra, state.failed_packs = load_extra_packs(state.settings, lm.model, set(state.packs))
    state.packs.update(extra)
    state.default_pack = ("refusal" if "refusal" in state.packs
                          else next(iter(state.packs), None))
    for name in list(state.presets):
        try:
            resolve_steering(state, f"{state.served_name}+{name}", None)
        except APIError as exc:
            log.warning("preset %r is not available with this model's packs: %s", name,
                        exc.message)
            del state.presets[name]


async def start_engine(state: ServerState) -> None:
    s = state.settings
    engine = Engine(state.lm, max_batch=s.max_batch, max_queue=s.max_queue,
                    request_timeout_s=s.request_timeout_s, prefix_cache=s.prefix_cache,
                    max_queue_per_tenant=s.max_queue_per_key or max(1, s.max_queue // 2))
    await engine.start()
    if state.lm.device.type == "cpu":
        yield_cores_to_the_engine(s.event_loop_nice)
    state.engine = engine
    state.metrics.bind_stats(lambda: {**engine.stats(), **engine.prefix_stats()})
    state.ready = True
    log.info("ready: serving %s with packs %s and presets %s", state.served_name,
             sorted(state.packs), sorted(state.presets))


def yield_cores_to_the_engine(nice: int) -> None:
    """Lower this (the event loop's) thread's CPU priority to `nice`, after the engine thread
    has started at the old one (threads inherit their creator's niceness; the engine's OpenMP
    workers are created by the engine thread). On a 2-core CPU a decode step is a chain of
    2-thread matmuls that each wait for both threads: an HTTP thread taking one core stalls
    the step. Measured (docs/engine.md): one stream 31–34 → 35–42 tokens/s at niceness 10,
    8 streams unchanged. Linux applies the niceness per thread; elsewhere nothing changes."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # not permitted here: serve at the old priority
        log.warning("could not lower the event loop thread's priority: %s", exc)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` in a daemon thread (an interrupted start must not wait for a model load)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(setter: Callable, value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            setter, value = future.set_exception, exc
        else:
            setter, value = future.set_result, result
        try:
            loop.call_soon_threadsafe(settle, setter, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="steer-load", daemon=True).start()
    return await future


def _load_model_and_pack(settings: Settings) -> tuple[LoadedModel, list[SteeringPack]]:
    from steering.extraction.store import default_pack_path, ensure_pack
    from steering.packs.format import pack_paths

    lm = steering.load_model(settings.model, settings.device, settings.dtype,
                             precision=settings.precision)
    if (lm.precision in ("int8", "int4") and settings.pack is None
            and not pack_paths(default_pack_path(lm))[0].is_file()):
        # The pack is extracted once at full precision, whatever precision serves it (the
        # precision gate in docs/precision.md measures the quantized model with that pack).
        log.info("extracting the steering pack at full precision before serving %s",
                 lm.precision)
        full = steering.load_model(settings.model, settings.device,
                                   precision="fp32" if lm.device.type == "cpu" else "bf16")
        ensure_pack(full, None, mode=settings.pack_mode)
        del full
    pack = ensure_pack(lm, settings.pack, mode=settings.pack_mode)
    return lm, [pack, *shipped_concept_packs(lm, settings.concept_packs)]


async def load_in_background(state: ServerState) -> None:
    try:
        lm, pack = await _in_thread(_load_model_and_pack, state.settings)
        install_model(state, lm, pack)
        await start_engine(state)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the details go to the log only; probes say "failed"
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("loading failed: %s", state.load_error)
        if state.settings.exit_on_load_error:
            os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None, lm: LoadedModel | None = None,
               packs: Mapping[str, SteeringPack] | Iterable[SteeringPack] | None = None
               ) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ServerState(settings=settings, metrics=metrics,
                        presets=load_presets(settings.presets, settings.default_presets))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if lm is not None:
            install_model(state, lm, packs)
            await start_engine(state)
        else:
            loader = asyncio.create_task(load_in_background(state))
        try:
            yield
        finally:
            state.draining = True
            if loader is not None and not loader.done():
                loader.cancel()
            if state.engine is not None:
                await state.engine.shutdown()
            state.close()

    docs_on = settings.docs != "off"
    app = FastAPI(title="steering server", version=steering.__version__,
                  description="OpenAI-compatible completions with steering knobs",
                  lifespan=lifespan, docs_url="/docs" if docs_on else None,
                  redoc_url="/redoc" if docs_on else None,
                  openapi_url="/openapi.json" if docs_on else None)
    app.state.steer = state
    errors.install(app)
    app.include_router(completions_router)  # /v1/chat/completions, /v1/completions
    app.include_router(compare_router)  # /v1/steering/compare
    app.include_router(router)  # models, steering discovery, probes, metrics
    app.include_router(playground_router)
    app.include_router(pack_admin_router)  # POST / DELETE /v1/steering/packs
    keys = load_keys(settings)
    if settings.auth and not len(keys):
        log.warning("authentication is on but no API keys are configured: every route but "
                    "the probes answers 401")
    open_paths, open_prefixes, closed = _route_access(settings)
    # Outermost first: request id and access log → audit (sees 401s) → auth (before the body
    # is read) → body limits and JSON checks → in-flight tracking (drain) → the app.
    app.add_middleware(InflightMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, enabled=settings.auth or len(keys) > 0, keys=keys,
                       open_paths=open_paths, open_prefixes=open_prefixes, closed_paths=closed)
    app.add_middleware(AuditMiddleware, path=settings.audit_log,
                       max_field_chars=settings.log_field_chars, salt=settings.audit_salt)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, enabled=settings.access_log,
                       max_field_chars=settings.log_field_chars)
    return app


DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _route_access(settings: Settings) -> tuple[frozenset[str], tuple[str, ...], frozenset[str]]:
    """The routes open without a key, open prefixes, and the routes turned off (404)."""
    open_paths: set[str] = {"/healthz", "/readyz"}
    prefixes: list[str] = []
    closed: set[str] = set()
    for mode, paths in ((settings.docs, DOCS_PATHS), (settings.metrics, {"/metrics"}),
                        (settings.playground, {"/playground", "/playground/"})):
        if mode == "open":
            open_paths |= paths
        elif mode == "off":
            closed |= paths
    if settings.playground == "open":
        prefixes.append("/playground/")
    return frozenset(open_paths), tuple(prefixes), frozenset(closed)


def find_middleware(app: FastAPI, cls: type):
    """The instance of middleware `cls` in the app's built stack (None before the first call)."""
    node = app.middleware_stack
    while node is not None:
        if isinstance(node, cls):
            return node
        node = getattr(node, "app", None)
    return None


class _DrainingServer:
    """uvicorn's server with a graceful first SIGTERM/SIGINT: readiness goes 503 and new
    completions get 503 at once, running requests finish, then uvicorn shuts down. A second
    signal stops at once."""

    def __new__(cls, config, state: ServerState):
        import uvicorn

        class Server(uvicorn.Server):
            draining_task: bool | None = None

            def handle_exit(self, sig, frame) -> None:
                if self.draining_task is not None or state.engine is None:
                    return super().handle_exit(sig, frame)
                log.info("signal %s: draining (readiness 503, finishing running requests)", sig)
                state.draining = True
                loop = asyncio.get_event_loop()
                self.draining_task = True  # type: ignore[assignment]
                loop.call_soon_threadsafe(loop.create_task, self._drain(sig, frame))

            async def _drain(self, sig, frame) -> None:
                s = state.settings
                timeout = s.drain_timeout_s or s.request_timeout_s
                app = self.config.loaded_app
                inflight = None
                while app is not None and inflight is None:  # uvicorn wraps the app
                    if isinstance(app, FastAPI):
                        inflight = find_middleware(app, InflightMiddleware)
                        break
                    app = getattr(app, "app", None)
                await drain(state, inflight, timeout)
                super().handle_exit(sig, frame)

        return Server(config)


def configure_access_log() -> None:
    if not any(getattr(h, "_steer", False) for h in access_log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        handler._steer = True  # type: ignore[attr-defined]
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


def serve(**overrides: Any) -> None:
    """Run the server with uvicorn (`steer serve`); settings from overrides, then `STEER_*`."""
    import uvicorn

    settings = Settings(**overrides)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_access_log()
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, log_level=settings.log_level.lower())
    _DrainingServer(config, app.state.steer).run()
    state: ServerState = app.state.steer
    if state.load_error:
        raise RuntimeError(f"the server stopped because loading failed: {state.load_error}")
