"""Running attribution over a dataset: the CLI, the sink callback, preemption, TensorBoard maps.

Owns: the LightningCLI (:mod:`.cli`), the one sink callback that evaluates and then writes through
the run directory (:mod:`.writer`), SLURM preemption at batch boundaries (:mod:`.preemption`), map
images in TensorBoard (:mod:`.tensorboard`) and building components from configs (:mod:`.configs`).

May import: every layer below (backbones, data, methods, outputs, evaluation). Only the package
root, :mod:`m2ib_lightning.select` and :mod:`m2ib_lightning.assets` import it.
"""
