"""Baseline attribution methods in the same framework as M2IB: chosen by ``class_path``, same outputs.

Each baseline is an :class:`~m2ib_lightning.methods.base.AttributionModule` that explains the same
target as M2IB, the cosine similarity between the image embedding and the caption embedding, and
returns the same :class:`~m2ib_lightning.records.Explanation` (so the writer, the store and the evaluation
treat all methods alike). None has trainable parameters.

=============================  ================================  =================================
class                          image map                         text scores
=============================  ================================  =================================
:class:`GradientSaliency`      ``max_c |ds/dx|`` per pixel        ``||ds/dh||`` per token at a block
:class:`GradCAM`               Grad-CAM on the tokens of block    same on the text tokens
                               ``vision_layer``
:class:`AttentionRollout`      gradient-weighted rollout          same, read at the pooled token
                               (Chefer et al. 2021), CLS row
:class:`LeGrad`                each layer's read-out gradient     same on the text tower
                               w.r.t. its attention, averaged
                               (Bousselham et al. 2024)
:class:`GradECLIP`             pooled token's last attention      same, at the pooled token
                               as gradient x loosened attention
                               x value (Zhao et al. 2024)
:class:`RISE`                  random-mask saliency               random token-drop saliency
                               (Petsiuk et al. 2018)
:class:`RandomMap`             uniform noise per patch            uniform noise per token
=============================  ================================  =================================

Choose one in YAML::

    model:
      class_path: m2ib_lightning.methods.baselines.GradCAM
      init_args:
        backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
        vision_layer: 2
"""

from m2ib_lightning.methods.baselines.base import Baseline, drop_tokens, token_gradients
from m2ib_lightning.methods.baselines.grad_eclip import GradECLIP
from m2ib_lightning.methods.baselines.gradcam import GradCAM
from m2ib_lightning.methods.baselines.legrad import LeGrad
from m2ib_lightning.methods.baselines.random import RandomMap
from m2ib_lightning.methods.baselines.rise import RISE
from m2ib_lightning.methods.baselines.rollout import AttentionRollout
from m2ib_lightning.methods.baselines.saliency import GradientSaliency

__all__ = ["RISE", "AttentionRollout", "Baseline", "GradCAM", "GradECLIP", "GradientSaliency", "LeGrad", "RandomMap",
           "drop_tokens", "token_gradients"]
