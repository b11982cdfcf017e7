"""Server settings, declared once: command-line overrides > environment (`STEER_*`) > defaults.

Every field is an environment variable `STEER_<NAME>` and a `steer serve --<name>` flag with the
field's description as its help (`add_cli_options`, used by `server.cli`; torch-free). The request
limits here are read by one module, `server.api.validation`.
"""

from __future__ import annotations

import argparse
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steering.models import DTYPE_ALIASES, PRECISIONS

# Hard ceilings: the request schema refuses a list longer than these before validating its items
# (`server.api.protocol`), whatever the settings say; each setting below stays under its ceiling.
CEILING_MESSAGES = 4096  # chat messages
CEILING_CONTENT_PARTS = 4096  # content parts of one message
CEILING_STOP = 16  # stop sequences
CEILING_STOP_CHARS = 4096  # characters of one stop sequence
CEILING_VARIANTS = 64  # compare variants
CEILING_PROMPTS = 256  # prompts of one text completion (and choices of one request)
CEILING_PROMPT_IDS = 262_144  # token ids of one prompt
CEILING_EXAMPLES = 4096  # examples of one class of an extraction job
CEILING_MAPPING = 1024  # entries of a mapping the server refuses anyway (logit_bias)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEER_", extra="ignore")

    # What to serve.
    model: str = Field("embedded", description="'embedded', a model folder, a .gguf or a hub id")
    pack: str | None = Field(None, description="pack path (default: the model's cached pack, "
                                               "extracted on first start)")
    pack_mode: str = Field("fast", description="extraction mode when no pack exists yet")
    presets: str | None = Field(None, description="YAML/JSON file of named presets")
    default_presets: bool = Field(True, description="also offer the built-in presets")
    served_model_name: str | None = Field(None, description="model id clients use "
                                                            "(default: the model's short name)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 …")
    precision: str = Field("auto", description="auto (int8 on CPU, bf16 on CUDA), fp32, bf16, "
                                               "fp16, int8, int4 (steering.models.precision)",
                           json_schema_extra={"choices": list(PRECISIONS)})
    dtype: str = Field("auto", description="older spelling of a float precision; an explicit "
                                           "dtype wins over precision auto")

    # Where to listen.
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")

    # The front door (server/security/frontdoor.py): limits on connections, for `steer serve`.
    header_timeout_s: float = Field(10.0, gt=0, description="a request line and headers not "
                                    "complete this long after the connection (or the previous "
                                    "response) get 408 and the connection is closed")
    max_header_bytes: int = Field(16384, ge=1024, description="longest request head (400)")
    max_connections: int | None = Field(256, ge=1, description="open connections beyond "
                                        "which new requests get 503 (uvicorn limit_concurrency)")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed")
    allowed_methods: str = Field("GET,HEAD,POST,DELETE", description="HTTP methods served; "
                                 "others get 405 before anything else runs")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve /metrics on "
                                     "this port (same host) instead of the API port, where it "
                                     "is then off")

    # Request limits (4xx beyond them).
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(512, ge=1, description="chat max_tokens when none is given")
    default_completion_max_tokens: int = Field(16, ge=1, description="text-completion default "
                                                                     "(OpenAI's)")
    strength_min: float = Field(-8.0, description="least steering strength a request may ask")
    strength_max: float = Field(8.0, description="largest steering strength a request may ask")
    max_n: int = Field(8, ge=1, le=CEILING_PROMPTS, description="largest n (choices per "
                                                                "prompt)")
    max_choices: int = Field(16, ge=1, le=CEILING_PROMPTS, description="prompts × n of one "
                                                                       "request")
    max_stop: int = Field(4, ge=0, le=CEILING_STOP, description="most stop sequences")
    max_top_logprobs: int = Field(20, ge=0, description="largest top_logprobs (chat) or "
                                                        "logprobs (text completions)")

    # Engine.
    engine: Literal["auto", "native", "vllm"] = Field(
        "auto", description="auto (vLLM where it is installed and a CUDA device is present), "
                            "native, vllm (server/engine/select.py, docs/engine.md)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM engine: GPUs per model")
    vllm_enforce_eager: bool = Field(False, description="vLLM engine: no torch.compile / CUDA "
                                                        "graphs (faster start)")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM engine: pipeline stages "
                                                             "(nodes × tensor parallel = GPUs)")
    vllm_distributed_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM engine: mp (one machine) or ray (several machines, a running "
                          "Ray cluster); default: vLLM's choice")
    vllm_pack_dir: str | None = Field(None, description="vLLM engine: where the packs are "
                                                        "written for vLLM's workers (a path every "
                                                        "node mounts, across machines); default: "
                                                        "a local temporary folder")
    max_batch: int = Field(16, ge=1, description="generations decoded together")
    max_queue: int = Field(64, ge=1, description="generations waiting for a batch slot (429 "
                                                 "beyond)")
    max_queue_per_key: int | None = Field(None, ge=1, description="generations one API key may "
                                          "have waiting (429 beyond; default: half of "
                                          "max_queue); keys are served in fair-queueing order")
    request_timeout_s: float = Field(600.0, gt=0, description="a generation's time limit from "
                                                              "arrival (504 beyond)")
    drain_timeout_s: float | None = Field(None, gt=0, description="on SIGTERM, how long running "
                                          "requests may finish before the rest get 503 "
                                          "(default: request_timeout_s)")
    prefix_cache: int = Field(16, ge=0, description="chat-template openings kept per steering "
                              "of the prompt (0: off; docs/engine.md, server/engine/prefix.py)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429 / 503")
    event_loop_nice: int = Field(10, ge=0, le=19, description="on CPU, the HTTP event loop "
                                 "thread's niceness once the engine runs (0: leave it), so the "
                                 "decode step's matmul threads win the cores (docs/engine.md)")
    tune_threads: bool | None = Field(None, description="on CPU, let the native engine time "
                                      "decode steps at 1 thread and at all of them every 128 "
                                      "steps and keep the faster: 2-3x on cores shared with "
                                      "other work (bench/tune_threads.py). none: on at int8, "
                                      "whose results do not depend on the thread count; off at "
                                      "float precisions, where they can differ in the last bits "
                                      "(server/engine/threads.py)")

    # Input hardening (4xx beyond these; see server/security/hardening.py).
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body (413)")
    max_messages: int = Field(256, ge=1, le=CEILING_MESSAGES, description="most chat messages "
                                                                          "in one request")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt in tokens "
                                                                  "(default: the context)")
    max_prompt_chars: int | None = Field(None, ge=1, description="longest prompt in characters "
                                         "(all of a chat's messages), refused before it is "
                                         "tokenized (default: 8 × the context length)")
    max_stop_chars: int = Field(256, ge=1, le=CEILING_STOP_CHARS, description="longest stop "
                                "sequence in characters")
    max_compare_variants: int = Field(8, ge=1, le=CEILING_VARIANTS, description="most variants "
                                      "of one compare")

    # Security (server/security/: auth.py, policy.py, audit.py).
    auth: bool = Field(False, description="require API keys (Bearer) on /v1/*")
    keys_file: str | None = Field(None, description="YAML/JSON file of hashed API keys and "
                                                    "their policies")
    keys: str | None = Field(None, description="the same document inline (JSON/YAML), e.g. "
                                               "from the environment")
    audit_log: str | None = Field(None, description="also append audit lines to this file")
    audit_salt: str | None = Field(None, description="key of the audit lines' prompt hash "
                                   "(HMAC-SHA256; default: random per process, so hashes "
                                   "match only within one run)")
    docs: Literal["open", "key", "off"] = Field("open", description="/docs, /redoc and "
                                                "/openapi.json: open, behind a key, or off")
    metrics: Literal["open", "key", "off"] = Field("open", description="/metrics: open, behind "
                                                   "a key, or off")
    playground: Literal["open", "key", "off"] = Field("open", description="the /playground "
                                                      "page (its calls to /v1/* need a key)")
    log_field_chars: int = Field(256, ge=16, le=65536, description="longest string an access "
                                 "or audit line carries per field (longer ones are cut)")
    max_pack_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest pack upload "
                                "body (POST /v1/steering/packs, read in chunks; 413 beyond)")

    # Extra packs (server/packs.py): bad ones are logged, skipped and listed as failed.
    packs_dir: str | None = Field(None, description="folder of NAME.safetensors + NAME.json "
                                                    "packs to serve as well")
    extra_packs: str | None = Field(None, description="comma-separated pack paths to serve "
                                                      "as well")
    concept_packs: str = Field("casual", description="comma-separated shipped concept packs "
                               "to extract on first start and serve ('' for none)")

    # Reading the stream (issue 30: monitors, inspect, capture, raw vectors, extraction jobs).
    max_vector_norm: float = Field(1000.0, gt=0, description="largest norm of a raw steering "
                                   "vector (each row of a basis)")
    max_capture_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest "
                                   "activation capture one request may return")
    max_capture_prompts: int = Field(64, ge=1, le=CEILING_PROMPTS,
                                     description="most prompts of one capture")
    max_extract_prompts: int = Field(256, ge=8, le=CEILING_EXAMPLES, description="most prompts per class of one "
                                     "extraction job")
    max_extract_prompt_chars: int = Field(2000, ge=16, description="longest prompt (or "
                                          "completion) of an extraction job, in characters")
    max_extract_jobs: int = Field(1, ge=1, description="extraction jobs running at once")
    extract_share: float = Field(0.5, gt=0, le=1, description="share of the wall clock an "
                                 "extraction job's forwards may use (it sleeps the rest)")

    # Operations.
    log_level: str = Field("info", description="debug, info, warning, error")
    access_log: bool = Field(True, description="one JSON access line per request on stdout")
    exit_on_load_error: bool = Field(True, description="stop the process when the model or "
                                                       "pack fails to load")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if DTYPE_ALIASES.get(self.precision.lower(), self.precision.lower()) not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if not self.strength_min <= self.strength_max:
            raise ValueError("strength_min must not exceed strength_max")
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
        return self


# ---- the command line ------------------------------------------------------------------------------


def _cli_type(annotation: Any) -> tuple[type, list[str] | None]:
    """(argparse type, choices) of a field's annotation: Optional unwrapped, Literal → choices."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return str, [str(a) for a in get_args(annotation)]
    if args and get_origin(annotation) in (Union, UnionType):
        return _cli_type(args[0])
    return annotation, None


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """A `--<name>` option per `Settings` field (its description as help, the variable and the
    default named); unset options stay None, so the environment and the defaults apply."""
    for name, field in Settings.model_fields.items():
        kind, choices = _cli_type(field.annotation)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        choices = extra.get("choices", choices)
        default = "none" if field.default is None else field.default
        text = (f"{field.description or name.replace('_', ' ')} (env STEER_{name.upper()}; "
                f"default: {default})").replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None,
                                metavar=None if choices else name.upper(), help=text)


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `Settings` fields given on the command line."""
    return {name: getattr(args, name) for name in Settings.model_fields
            if getattr(args, name, None) is not None}
