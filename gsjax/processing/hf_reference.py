"""The transformers Qwen3-VL processor, built offline and without torchvision (spec/qwen3vl.md §5.5).

It is the parity reference for gsjax's own processing (tests, `scripts/check_logits.py`): the PIL image
processor with every §5.1 value passed explicitly, the given tokenizer, the chat template, and no video
processor (`Qwen3VLProcessor(video_processor=None)` fails in 5.23, so video is dropped from the signature).
"""

from __future__ import annotations

import functools
from typing import Any

from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.template import chat_template
from gsjax.processing.tokens import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START


@functools.cache
def _processor_class() -> type:
    """Defined lazily so importing gsjax never imports the transformers processor stack."""
    from transformers import ProcessorMixin
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """`Qwen3VLProcessor` whose sub-processors (inferred from this signature) are image + tokenizer."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None):
            self.image_token, self.video_token = IMAGE_PAD, VIDEO_PAD
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
            self.vision_start_token, self.vision_end_token = VISION_START, VISION_END
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen3VLProcessor


def build_hf_processor(tokenizer: Any, cfg: ImageProcessorConfig, template: str | None = None) -> Any:
    """A `Qwen3VLProcessor`-compatible object: `Qwen2VLImageProcessorPil(**cfg)` + `tokenizer` + template
    (the tokenizer's own when it has one, else gsjax's)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(**cfg.to_hf_kwargs())
    template = template or getattr(tokenizer, "chat_template", None) or chat_template()
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
