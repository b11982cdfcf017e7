"""Server settings: command-line overrides > environment (`STEER_*`) > defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steering.models import DTYPE_ALIASES, PRECISIONS


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
    device: str = "auto"
    precision: str = Field("auto", description="auto (int8 on CPU, bf16 on CUDA), fp32, bf16, "
                                               "fp16, int8, int4 (steering.models.precision)")
    dtype: str = Field("auto", description="older spelling of a float precision; an explicit "
                                           "dtype wins over precision auto")

    # Where to listen.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Request limits (4xx beyond them).
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(512, ge=1, description="chat max_tokens when none is given")
    default_completion_max_tokens: int = Field(16, ge=1, description="text-completion default "
                                                                     "(OpenAI's)")
    strength_min: float = -8.0
    strength_max: float = 8.0
    max_n: int = Field(8, ge=1)
    max_choices: int = Field(16, ge=1, description="prompts × n of one request")
    max_stop: int = Field(4, ge=0)
    max_top_logprobs: int = Field(20, ge=0)

    # Engine.
    engine: Literal["auto", "native", "vllm"] = Field(
        "auto", description="auto (vLLM where it is installed and a CUDA device is present), "
                            "native, vllm (server/engine/select.py, docs/engine.md)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM engine: GPUs per model")
    vllm_enforce_eager: bool = Field(False, description="vLLM engine: no torch.compile / CUDA "
                                                        "graphs (faster start)")
    max_batch: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float | None = Field(None, gt=0, description="on SIGTERM, how long running "
                                          "requests may finish before the rest get 503 "
                                          "(default: request_timeout_s)")
    prefix_cache: int = Field(16, ge=0, description="chat-template openings kept per steering "
                              "of the prompt (0: off; docs/engine.md, server/engine/prefix.py)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429 / 503")
    event_loop_nice: int = Field(10, ge=0, le=19, description="on CPU, the HTTP event loop "
                                 "thread's niceness once the engine runs (0: leave it), so the "
                                 "decode step's matmul threads win the cores (docs/engine.md)")

    # Input hardening (4xx beyond these; see server/security/hardening.py).
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body (413)")
    max_messages: int = Field(256, ge=1, description="most chat messages in one request")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt in tokens "
                                                                  "(default: the context)")
    max_stop_chars: int = Field(256, ge=1, description="longest stop sequence in characters")
    max_compare_variants: int = Field(8, ge=1, description="most variants of one compare")

    # Security (server/security/: auth.py, policy.py, audit.py).
    auth: bool = Field(False, description="require API keys (Bearer) on /v1/*")
    keys_file: str | None = Field(None, description="YAML/JSON file of hashed API keys and "
                                                    "their policies")
    keys: str | None = Field(None, description="the same document inline (JSON/YAML), e.g. "
                                               "from the environment")
    audit_log: str | None = Field(None, description="also append audit lines to this file")
    docs: Literal["open", "key", "off"] = Field("open", description="/docs, /redoc and "
                                                "/openapi.json: open, behind a key, or off")
    metrics: Literal["open", "key", "off"] = Field("open", description="/metrics: open, behind "
                                                   "a key, or off")
    playground: Literal["open", "key", "off"] = Field("open", description="the /playground "
                                                      "page (its calls to /v1/* need a key)")
    log_field_chars: int = Field(256, ge=16, description="longest string a log line carries "
                                                         "per field (longer ones are cut)")

    # Extra packs (server/packs.py): bad ones are logged, skipped and listed as failed.
    packs_dir: str | None = Field(None, description="folder of NAME.safetensors + NAME.json "
                                                    "packs to serve as well")
    extra_packs: str | None = Field(None, description="comma-separated pack paths to serve "
                                                      "as well")
    concept_packs: str = Field("casual", description="comma-separated shipped concept packs "
                               "to extract on first start and serve ('' for none)")

    # Operations.
    log_level: str = "info"
    access_log: bool = True
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
