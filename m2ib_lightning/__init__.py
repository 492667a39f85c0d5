"""M2IB attribution for CLIP-style models, driven by PyTorch Lightning."""

from m2ib_lightning.api import explain
from m2ib_lightning.backbones import BackboneAdapter, CLIPBackbone, TowerState
from m2ib_lightning.backbones.openclip import OpenCLIPBackbone
from m2ib_lightning.backbones.siglip import SigLIPBackbone
from m2ib_lightning.data import ImageTextDataModule, Preprocessor
from m2ib_lightning.errors import BackboneLoadError, ConfigError, DatasetOpenError
from m2ib_lightning.methods.bottlenecks import (
    M2IB,
    IBAStyleM2IB,
    PerTokenM2IB,
    ScaledM2IB,
    ScaledPerTokenM2IB,
    SmoothM2IB,
)
from m2ib_lightning.methods.m2ib import M2IBAttribution
from m2ib_lightning.methods.multilayer import JointM2IB, MultiLayerM2IB
from m2ib_lightning.methods.nib import NIBAttribution
from m2ib_lightning.methods.strategy import IndependentDDPStrategy
from m2ib_lightning.outputs import AttributionRecord, Attributions, load_attributions
from m2ib_lightning.outputs.overlays import overlay_image
from m2ib_lightning.run.tensorboard import TensorBoardMaps
from m2ib_lightning.run.writer import AttributionWriter

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
    "JointM2IB",
    "M2IBAttribution",
    "MultiLayerM2IB",
    "NIBAttribution",
    "OpenCLIPBackbone",
    "PerTokenM2IB",
    "Preprocessor",
    "ScaledM2IB",
    "ScaledPerTokenM2IB",
    "SigLIPBackbone",
    "SmoothM2IB",
    "TensorBoardMaps",
    "TowerState",
    "explain",
    "load_attributions",
    "overlay_image",
]
