"""Bottlenecks: the reference M2IB and its variants, each a small subclass of the reference.

Choose one per side in YAML by ``class_path`` (``docs/variants.md`` walks through writing one):

* :class:`~m2ib_lightning.methods.bottlenecks.reference.M2IB` - the reference method (one mask value per token per
  channel, standard-normal noise, KL on the raw hidden states);
* :class:`PerTokenM2IB` - one mask value per token, shared by its channels (D times fewer parameters);
* :class:`IBAStyleM2IB` - hidden states normalised with per-feature mean and standard deviation
  estimated over the dataset, as in the per-sample bottleneck of Schulz et al. (ICLR 2020, "IBA");
* :class:`SmoothM2IB` - the mask blurred over the patch grid by a Gaussian kernel, as IBA does;
* :class:`ScaledM2IB` - the KL measured on each token scaled to unit RMS, the noise at the token's
  scale: one ``beta`` means the same on models whose hidden states differ in size;
* :class:`ScaledPerTokenM2IB` - both: one mask value per token on unit-RMS tokens (the best of the
  validation sweeps on the synthetic worlds).

Explaining only one side is a switch of the LightningModule, not a variant:
``M2IBAttribution(sides=["vision"])`` or ``["text"]``.

Dataset statistics (the IBA-style variant) come from a generic, opt-in hook: a bottleneck that
defines ``fit_statistics(hidden_states, context, all_gather, save)`` is called once by
:meth:`M2IBAttribution.fit_bottleneck_statistics` before the optimisation starts (Lightning's
``on_train_start``, or :func:`m2ib_lightning.explain` for the Python API). ``hidden_states()``
returns an iterator of ``(hidden (B, L, D) float32, valid (B, L) bool)`` at the bottleneck layer,
one item per data batch; it is only iterated when the statistics are not cached yet.
"""

from m2ib_lightning.methods.bottlenecks.iba import IBAStyleM2IB, Welford
from m2ib_lightning.methods.bottlenecks.per_token import PerTokenM2IB
from m2ib_lightning.methods.bottlenecks.reference import M2IB, TokenLayout
from m2ib_lightning.methods.bottlenecks.scaled import ScaledM2IB, ScaledPerTokenM2IB
from m2ib_lightning.methods.bottlenecks.smooth import SmoothM2IB

__all__ = ["M2IB", "IBAStyleM2IB", "PerTokenM2IB", "ScaledM2IB", "ScaledPerTokenM2IB", "SmoothM2IB", "TokenLayout",
           "Welford"]
