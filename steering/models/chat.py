"""Chat-template formatting and the post-instruction positions (Arditi et al. 2024, §2.1).

The post-instruction tokens are the template tokens between the end of the user's message and the
start of the answer (for Qwen: `<|im_end|>\\n<|im_start|>assistant\\n`). Directions are read there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

Message = dict[str, str]
_PLACEHOLDER = "\u2063PLACEHOLDER\u2063"
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def format_chat(tokenizer, prompt: str | Sequence[Message],
                tools: list[dict] | None = None) -> str:
    """The model's own chat template with the generation prompt appended (and `tools`, the
    OpenAI-style function list, where the template takes them)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        as_messages(prompt), tokenize=False, add_generation_prompt=True, **extra
    )


def post_instruction_length(tokenizer) -> int:
    """How many tokens the template puts after the user's message (≥ 1)."""
    text = format_chat(tokenizer, _PLACEHOLDER)
    suffix = text.split(_PLACEHOLDER, 1)[1]
    n = len(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    return max(n, 1)


def shared_prefix_length(ids: Sequence[Sequence[int]], keep: int) -> int:
    """Length of the token prefix all prompts share, leaving at least `keep` tokens of each."""
    if len(ids) < 2:
        return 0
    n = min(len(x) for x in ids) - keep
    head = list(ids[0])
    for x in ids[1:]:
        while n > 0 and list(x[:n]) != head[:n]:
            n -= 1
    return max(n, 0)


_PROBES = ("a", "Z?", "1 2", "\u00bfqu\u00e9?")  # user messages with nothing in common


def template_opening(tokenizer) -> list[int]:
    """The tokens every single-message chat prompt starts with: the template's opening (for Qwen
    its default system turn and the user header)."""
    ids = [tokenizer(format_chat(tokenizer, p), add_special_tokens=False)["input_ids"]
           for p in _PROBES]
    return ids[0][: shared_prefix_length(ids, keep=1)]


def template_hash(tokenizer) -> str:
    format_chat(tokenizer, "x")  # installs the fallback where the tokenizer has none
    return hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16]
