"""open_clip's tokenizers and image transform, called like their transformers counterparts.

The rest of the package (the preprocessor, the text metric, the record writer) talks to a
transformers-style tokenizer and image processor; these wrappers give open_clip's the same calls,
so :class:`~m2ib_lightning.backbones.openclip.OpenCLIPBackbone` needs no special case elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["OpenCLIPHFTokenizer", "OpenCLIPImageProcessor", "OpenCLIPTokenizer"]


class OpenCLIPTokenizer:
    """open_clip's ``SimpleTokenizer`` called like a transformers tokenizer.

    ``tokenizer(captions, padding=..., truncation=..., max_length=..., return_tensors="pt")`` gives
    ``input_ids`` ``(B, context_length)`` (0-padded, truncated with the end token kept, exactly as
    open_clip tokenises) and ``attention_mask`` (``ids != 0``). The length is always the model's
    ``context_length``, whatever padding is asked for: ``encode_text`` adds positional embeddings
    and the causal mask for that length. Without ``return_tensors`` it returns lists, and with
    ``truncation=False`` the untruncated ids (used to count a caption's tokens).
    """

    pad_token_id = 0

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        self.model_max_length = context_length

    def __call__(self, text: str | Sequence[str], padding: bool | str = True, truncation: bool = True,
                 max_length: int | None = None, return_tensors: str | None = None, **_: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        if not truncation:
            tok = self.tokenizer
            ids = [[tok.sot_token_id, *tok.encode(t), tok.eot_token_id] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        input_ids = self.tokenizer(texts, context_length=self.context_length)
        encoded = {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_token_id).long()}
        if return_tensors is None:
            return {k: [row[row_mask.bool()].tolist() for row, row_mask in zip(v, encoded["attention_mask"])]
                    for k, v in encoded.items()}
        return encoded

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.tokenizer.sot_token_id, self.tokenizer.eot_token_id]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """One string per id, e.g. ``["<start_of_text>", "red", "circle", "<end_of_text>"]``."""
        return [self.tokenizer.decode([i]).strip() for i in ids]

    def __len__(self) -> int:
        return self.tokenizer.vocab_size


class OpenCLIPHFTokenizer:
    """open_clip's ``HFTokenizer`` (e.g. BiomedCLIP's BERT WordPiece) called like a transformers tokenizer.

    Ids are open_clip's own (its text cleaning, ``[CLS] ... [SEP]``, truncated to ``context_length``),
    cut to the longest caption unless ``padding="max_length"``; ``attention_mask`` is
    ``ids != pad_token_id``, the mask ``HFTextEncoder`` gives its transformer. ``truncation=False``
    returns the untruncated ids as lists (used to count a caption's tokens).
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.wrapper, self.tokenizer, self.context_length = tokenizer, tokenizer.tokenizer, context_length
        self.model_max_length = context_length
        self.pad_token_id = self.tokenizer.pad_token_id

    def __call__(self, text: str | Sequence[str], padding: bool | str = True, truncation: bool = True,
                 max_length: int | None = None, return_tensors: str | None = None, **_: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        if not truncation:
            ids = self.tokenizer([self.wrapper.clean_fn(t) for t in texts], truncation=False)["input_ids"]
            return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        input_ids = self.wrapper(texts, context_length=self.context_length)
        mask = (input_ids != self.pad_token_id).long()
        if padding != "max_length":
            keep = max(int(mask.sum(1).max()), 1)
            input_ids, mask = input_ids[:, :keep], mask[:, :keep]
        if return_tensors is None:
            return {"input_ids": [row[m.bool()].tolist() for row, m in zip(input_ids, mask)],
                    "attention_mask": [row[m.bool()].tolist() for row, m in zip(mask, mask)]}
        return {"input_ids": input_ids, "attention_mask": mask}

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.tokenizer.all_special_ids)

    @property
    def unk_token_id(self) -> int | None:
        return self.tokenizer.unk_token_id

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """One string per id, e.g. ``["[CLS]", "red", "circle", "[SEP]"]``."""
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def __len__(self) -> int:
        return len(self.tokenizer)


class OpenCLIPImageProcessor:
    """open_clip's evaluation transform called like a transformers image processor.

    ``processor(images=[...], return_tensors="pt")["pixel_values"]`` is ``(B, 3, H, W)``: the
    transform applied to each PIL image and stacked. ``image_mean`` / ``image_std`` undo it for overlays.
    """

    def __init__(self, transform: Any, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        self.transform = transform
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def __call__(self, images: Any = None, return_tensors: str | None = "pt", **_: Any) -> dict[str, Tensor]:
        batch = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image) for image in batch])}

