"""The keyword under which a transformers model takes its KV cache in `forward`.

transformers 5.2x calls it `cache` (`past_key_values` before, kept as a deprecated alias until
5.40); vLLM's CPU build pins transformers below 5.20 (its virtualenv, scripts/ensure-vllm.sh), so
the library's own forwards name it by what the installed model class accepts.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any


@cache
def cache_name(model_class: type) -> str:
    """`cache` where `model_class.forward` takes it, else `past_key_values`."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, kv_cache: Any) -> dict[str, Any]:
    """{name: kv_cache} for `model(**inputs, **cache_kwargs(model, kv_cache))`."""
    return {cache_name(type(model)): kv_cache}
