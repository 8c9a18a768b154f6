"""The gsjax Qwen3-VL chat template and HF-semantics rendering (spec/qwen3vl.md §5.3).

Rendering goes through transformers' own renderer (`trim_blocks`, `lstrip_blocks`, loop controls and its
`tojson` = `json.dumps(ensure_ascii=False)`): plain jinja2's `tojson` sorts keys and HTML-escapes, which would
change the tools block and tool-call arguments the model was trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

TEMPLATE_ASSET = "qwen3_vl_chat_template.jinja"


@functools.cache
def chat_template() -> str:
    """The vendored template text (package data `gsjax/assets/qwen3_vl_chat_template.jinja`)."""
    return (resources.files("gsjax") / "assets" / TEMPLATE_ASSET).read_text(encoding="utf-8")


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    template: str | None = None,
    **template_kwargs: Any,
) -> str:
    """Render one conversation to text with HF's renderer; `template` defaults to gsjax's.

    Tools may be JSON schemas or type-hinted callables (HF converts the latter)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(messages)],
        tools=list(tools) if tools is not None else None,
        chat_template=template or chat_template(),
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    return rendered[0]
