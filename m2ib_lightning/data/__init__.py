"""Image-text pairs streamed from files or the hub, sharded across ranks, robust to bad samples.

Owns: reading rows (:mod:`.rows`, opening a dataset as a stream of rows; :mod:`.module`, the
LightningDataModule; :mod:`.stream`, one reader's pairs and batches), who reads which rows
(:mod:`.sharding`), reading a file on past a bad line, row group or tar member (:mod:`.recover`,
:mod:`.textrows`, :mod:`.csvrows`), decoding and checking images (:mod:`.images`), fetching URLs
(:mod:`.fetch`) and turning pairs into model inputs (:mod:`.preprocess`).

May import: :mod:`m2ib_lightning.errors`, :mod:`m2ib_lightning.backbones` (for the preprocessing a
backbone defines) and third-party libraries. Never methods, outputs or anything above them: which
ids a run passes over comes in as an argument (``pass_over(ids)``).
"""

from m2ib_lightning.data.images import ImageError, load_image, read_image
from m2ib_lightning.data.module import ImageTextDataModule
from m2ib_lightning.data.preprocess import Preprocessor, read_caption
from m2ib_lightning.data.rows import data_source, open_rows
from m2ib_lightning.data.stream import Collate, PairStream

__all__ = ["Collate", "ImageError", "ImageTextDataModule", "PairStream", "Preprocessor", "data_source",
           "load_image", "open_rows", "read_caption", "read_image"]
