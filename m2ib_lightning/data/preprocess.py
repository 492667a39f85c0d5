"""Model inputs from images and captions, and the rules for what counts as a readable caption.

The :class:`Preprocessor` comes from the backbone (its tokenizer and image processor, and the
text tower's maximum length), so configs never repeat preprocessing settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from m2ib_lightning.backbones import BackboneAdapter

__all__ = ["Preprocessor", "read_caption"]


@dataclass
class Preprocessor:
    """Turns a list of (image, caption) into model inputs, batched.

    Attributes:
        tokenizer: a transformers tokenizer (pads to the longest caption, truncates to ``max_length``).
        image_processor: a transformers image processor giving ``pixel_values`` ``(B, C, H, W)``.
        max_length: the text tower's maximum number of tokens.
    """

    tokenizer: Any
    image_processor: Any
    max_length: int

    @classmethod
    def from_backbone(cls, backbone: BackboneAdapter) -> Preprocessor:
        """The backbone's tokenizer and image processor, truncating to its ``max_text_length``."""
        return cls(backbone.tokenizer, backbone.image_processor, backbone.max_text_length)

    def __call__(self, images: list[Image.Image], captions: list[str]) -> dict[str, torch.Tensor]:
        text = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    def untruncated_lengths(self, captions: list[str], kept: Sequence[int]) -> list[int]:
        """Token counts of ``captions`` before truncation, given ``kept`` (their counts after it).

        Only captions that reached ``max_length`` can have been cut, so only those are tokenised again.
        """
        full = list(kept)
        cut = [i for i, n in enumerate(kept) if n >= self.max_length]
        if cut:
            encoded = self.tokenizer([captions[i] for i in cut], truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(cut, encoded):
                full[i] = len(ids)
        return full


def read_caption(value: Any) -> str:
    """The caption of a row, stripped; raises ``ValueError`` with the skip reason.

    Bytes are decoded as UTF-8 (strictly: a caption we cannot read is not explained with guessed
    characters); text that cannot be encoded as UTF-8 (lone surrogates from a broken JSON escape)
    is refused for the same reason, and because the tokenizer would refuse it mid-batch.
    """
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"undecodable caption: not UTF-8 ({err.reason} at byte {err.start})") from None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"empty or missing caption (not text: got {type(value).__name__} {str(value)[:60]!r})")
    if value is None or not value.strip():
        raise ValueError(f"empty or missing caption ({value!r})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"undecodable caption: invalid character at position {err.start}") from None
    return value.strip()

