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
from server.api.extract_jobs import router as extract_router
from server.api.pack_admin import PACK_UPLOAD_PATH
from server.api.pack_admin import router as pack_admin_router
from server.api.playground import router as playground_router
from server.api.readout import router as readout_router
from server.api.routes import router
from server.api.validation import resolve_steering
from server.engine import build_engine
from server.errors import APIError
from server.lifecycle import InflightMiddleware, drain
from server.observability.accesslog import AccessLogMiddleware, JsonFormatter, access_log
from server.observability.metrics import Metrics
from server.packs import concept_names, load_extra_packs, shipped_concept_packs
from server.presets import load_presets
from server.security.audit import AuditMiddleware
from server.security.auth import AuthMiddleware, load_keys
from server.security.frontdoor import FrontDoorMiddleware, allowed_methods, uvicorn_limits
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
    state.pinned_packs = frozenset(state.packs)  # the shipped packs: not replaceable at run time
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
    engine = build_engine(state)  # native or vLLM (server/engine/select.py)
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
    """The model and its packs, from the caches. What is not cached yet — the dequantized or
    int8 model, the refusal pack, the shipped concept packs — is made first in a child process
    (`_prepare_caches`), so a first start ends at the footprint of a cached one: the
    full-precision model that extraction needs, its activations and the conversion's peak go
    away with the child instead of staying in this process's heap."""
    from steering.extraction.store import ensure_pack, pack_cached
    from steering.models.loading import model_cached

    prepared = False
    if not model_cached(settings.model, settings.device, settings.dtype, settings.precision):
        _in_child(settings)
        prepared = True
    lm = steering.load_model(settings.model, settings.device, settings.dtype,
                             precision=settings.precision)
    if not prepared and not _packs_cached(lm, settings):
        _in_child(settings)
    if not pack_cached(lm, settings.pack):
        raise RuntimeError("the steering pack was not extracted (the preparation step's log "
                           "says why)")
    pack = ensure_pack(lm, settings.pack, mode=settings.pack_mode)
    return lm, [pack, *shipped_concept_packs(lm, settings.concept_packs, extract=False)]


def _packs_cached(lm: LoadedModel, settings: Settings) -> bool:
    from steering.extraction.store import concept_pack_cached, pack_cached

    return pack_cached(lm, settings.pack) and all(
        concept_pack_cached(lm, n) for n in concept_names(settings.concept_packs))


def _in_child(settings: Settings) -> None:
    """Run `_prepare_caches` in a fresh (spawned) process and wait for it."""
    import multiprocessing

    log.info("first start: converting / extracting what is not cached yet in a child process")
    child = multiprocessing.get_context("spawn").Process(
        target=_prepare_caches, args=(settings.model_dump(),), name="steer-prepare", daemon=True)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"preparing the model's caches failed (exit code {child.exitcode}; "
                           "the log above says why)")


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the server that started it dies, however it
    dies (a SIGKILL included), so a stopped first start leaves no extraction running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / glibc: multiprocessing's atexit still ends it
        pass


def _prepare_caches(settings_fields: dict) -> None:
    """In the child: load the model (dequantizing / converting it into the cache), extract the
    refusal pack — at full precision when a quantized model serves it (the precision gate in
    docs/precision.md measures the quantized model with that pack) — and the shipped concept
    packs, into the cache. Then the process exits and its memory with it."""
    from steering.extraction.store import ensure_pack, pack_cached

    _die_with_parent()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings_fields.get("log_level", "info").upper(),
                            format="%(asctime)s %(levelname)s %(name)s (prepare): %(message)s")
    settings = Settings(**settings_fields)
    lm = steering.load_model(settings.model, settings.device, settings.dtype,
                             precision=settings.precision)
    if lm.precision in ("int8", "int4") and settings.pack is None and not pack_cached(lm):
        log.info("extracting the steering pack at full precision before serving %s",
                 lm.precision)
        full = steering.load_model(settings.model, settings.device,
                                   precision="fp32" if lm.device.type == "cpu" else "bf16")
        ensure_pack(full, None, mode=settings.pack_mode)
        del full
    ensure_pack(lm, settings.pack, mode=settings.pack_mode)
    shipped_concept_packs(lm, settings.concept_packs)


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
    app.include_router(readout_router)  # /v1/steering/inspect, /v1/activations
    app.include_router(extract_router)  # /v1/steering/packs/extract (jobs)
    keys = load_keys(settings)
    if keys.configured and not len(keys):
        log.warning("authentication is on but the keys source holds no keys: every route but "
                    "the open ones answers 401")
    open_paths, open_prefixes, closed = _route_access(settings)
    # Outermost first: request id and access log → audit (sees 401s) → auth (before the body
    # is read) → body limits and JSON checks → in-flight tracking (drain) → the app.
    app.add_middleware(InflightMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       streamed={PACK_UPLOAD_PATH: settings.max_pack_bytes})
    app.add_middleware(AuthMiddleware, enabled=keys.configured, keys=keys,
                       open_paths=open_paths, open_prefixes=open_prefixes, closed_paths=closed)
    app.add_middleware(AuditMiddleware, path=settings.audit_log,
                       max_field_chars=settings.log_field_chars, salt=settings.audit_salt)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, enabled=settings.access_log,
                       max_field_chars=settings.log_field_chars)
    app.add_middleware(FrontDoorMiddleware, methods=allowed_methods(settings),
                       max_head_bytes=settings.max_header_bytes)  # outermost: the front door
    return app


DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _route_access(settings: Settings) -> tuple[frozenset[str], tuple[str, ...], frozenset[str]]:
    """The routes open without a key, open prefixes, and the routes turned off (404)."""
    open_paths: set[str] = {"/healthz", "/health", "/readyz"}
    prefixes: list[str] = []
    closed: set[str] = set()
    metrics_mode = "off" if settings.metrics_port else settings.metrics  # on its own port
    for mode, paths in ((settings.docs, DOCS_PATHS), (metrics_mode, {"/metrics"}),
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


def serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    """/metrics on its own port (`STEER_METRICS_PORT`), in a daemon thread: prometheus-client's
    own HTTP server over this app's registry. The API port then answers 404 there, and a
    network policy can admit the scraper to this port only."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, port)


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
                            access_log=False, log_level=settings.log_level.lower(),
                            **uvicorn_limits(settings))
    if settings.metrics_port:
        serve_metrics(app.state.steer.metrics, settings.host, settings.metrics_port)
    _DrainingServer(config, app.state.steer).run()
    state: ServerState = app.state.steer
    if state.load_error:
        raise RuntimeError(f"the server stopped because loading failed: {state.load_error}")
