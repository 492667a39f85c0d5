"""Attribution methods: LightningModules that explain a batch of image-text pairs.

Owns: the base class and output contract (:mod:`.base`), M2IB (:mod:`.m2ib`, its bottleneck variants in
:mod:`.bottlenecks`, several layers at once in :mod:`.multilayer`, its noise in :mod:`.noise`, its chunk
sizing in :mod:`.memory`), the deterministic narrowing bottleneck NIB (:mod:`.nib`), the shared read-out
of raw scores as maps (:mod:`.readout`), the baselines (:mod:`.baselines`, one file each) and the
distributed strategy under which every method runs (:mod:`.strategy`: each rank optimises its own
samples' masks, nothing is averaged; it lives here because that rule follows from what a method's
parameters are).

May import: :mod:`m2ib_lightning.errors`, :mod:`m2ib_lightning.records`, :mod:`m2ib_lightning.files`,
:mod:`m2ib_lightning.backbones`. Never data, outputs, evaluation or anything above them.
"""

from m2ib_lightning.methods.base import AttributionModule
from m2ib_lightning.methods.bottlenecks import (
    M2IB,
    IBAStyleM2IB,
    PerTokenM2IB,
    ScaledM2IB,
    ScaledPerTokenM2IB,
    SmoothM2IB,
    Welford,
)
from m2ib_lightning.methods.m2ib import M2IBAttribution, adam_lr1
from m2ib_lightning.methods.multilayer import JointM2IB, MultiLayerM2IB
from m2ib_lightning.methods.nib import NIBAttribution
from m2ib_lightning.methods.strategy import IndependentDDPStrategy, check_strategy

__all__ = [
    "M2IB",
    "AttributionModule",
    "IBAStyleM2IB",
    "IndependentDDPStrategy",
    "JointM2IB",
    "M2IBAttribution",
    "MultiLayerM2IB",
    "NIBAttribution",
    "PerTokenM2IB",
    "ScaledM2IB",
    "ScaledPerTokenM2IB",
    "SmoothM2IB",
    "Welford",
    "adam_lr1",
    "check_strategy",
]
