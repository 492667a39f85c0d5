"""Frozen dual-encoder backbones, split at the bottleneck layer.

Owns: the adapter interface (:mod:`.base`, with the attention records methods read in :mod:`.traces`),
recording attention for it (:mod:`.attention`), checkpoint loading (:mod:`.loading`), fingerprints of
weights and tokenizers (:mod:`.fingerprint`), and the adapters: transformers CLIP (:mod:`.clip`, with
its exact speed-ups in :mod:`.clip_blocks`), transformers SigLIP (:mod:`.siglip`) and open_clip
(:mod:`.openclip`, :mod:`.openclip_io`, :mod:`.openclip_parts`; open_clip itself is imported only when one is built).

May import: :mod:`m2ib_lightning.errors` and third-party libraries; nothing else of the package.
"""

from m2ib_lightning.backbones.base import (
    EMBEDDINGS,
    SIDES,
    AttentionTrace,
    BackboneAdapter,
    PooledAttention,
    Side,
    TowerState,
)
from m2ib_lightning.backbones.clip import CLIPBackbone
from m2ib_lightning.backbones.fingerprint import tokenizer_fingerprint, weights_fingerprint
from m2ib_lightning.backbones.loading import load_pretrained
from m2ib_lightning.backbones.openclip import OpenCLIPBackbone
from m2ib_lightning.backbones.siglip import SigLIPBackbone

__all__ = [
    "EMBEDDINGS",
    "SIDES",
    "AttentionTrace",
    "BackboneAdapter",
    "CLIPBackbone",
    "OpenCLIPBackbone",
    "PooledAttention",
    "SigLIPBackbone",
    "Side",
    "TowerState",
    "load_pretrained",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]
