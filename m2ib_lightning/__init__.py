"""M2IB attribution for CLIP-style models, driven by PyTorch Lightning."""

from m2ib_lightning.api import explain
from m2ib_lightning.backbones import BackboneAdapter, CLIPBackbone, TowerState
from m2ib_lightning.bottlenecks import M2IB
from m2ib_lightning.data import ImageTextDataModule, Preprocessor
from m2ib_lightning.errors import BackboneLoadError, ConfigError, DatasetOpenError
from m2ib_lightning.module import M2IBAttribution
from m2ib_lightning.openclip import OpenCLIPBackbone
from m2ib_lightning.overlays import overlay_image
from m2ib_lightning.siglip import SigLIPBackbone
from m2ib_lightning.store import AttributionRecord, Attributions, load_attributions
from m2ib_lightning.strategies import IndependentDDPStrategy
from m2ib_lightning.tb_logging import TensorBoardMaps
from m2ib_lightning.variants import IBAStyleM2IB, PerTokenM2IB
from m2ib_lightning.writer import AttributionWriter

__all__ = [
    "M2IB",
    "AttributionRecord",
    "AttributionWriter",
    "Attributions",
    "BackboneAdapter",
    "BackboneLoadError",
    "CLIPBackbone",
    "ConfigError",
    "DatasetOpenError",
    "IBAStyleM2IB",
    "ImageTextDataModule",
    "IndependentDDPStrategy",
    "M2IBAttribution",
    "OpenCLIPBackbone",
    "PerTokenM2IB",
    "Preprocessor",
    "SigLIPBackbone",
    "TensorBoardMaps",
    "TowerState",
    "explain",
    "load_attributions",
    "overlay_image",
]
