"""Attribution outputs on disk: the format, the reader, the run directory that owns them, overlays.

Owns: the shard and manifest format (:mod:`.format`), reading a directory (:mod:`.reader`), the ONE
owner of a run's directory, which checks settings, knows finished ids and writes shards and the skip
manifest (:mod:`.rundir`), and map overlays (:mod:`.overlays`).

May import: :mod:`m2ib_lightning.errors`, :mod:`m2ib_lightning.records`, :mod:`m2ib_lightning.files`,
:mod:`m2ib_lightning.data` (reading an image for an overlay). Never methods, evaluation or above.
"""

from m2ib_lightning.outputs.format import OVERLAYS, SCHEMA, SHARDS, SKIPPED, AttributionRecord
from m2ib_lightning.outputs.overlays import overlay, overlay_image
from m2ib_lightning.outputs.reader import Attributions, load_attributions

__all__ = ["OVERLAYS", "SCHEMA", "SHARDS", "SKIPPED", "AttributionRecord", "Attributions", "load_attributions",
           "overlay", "overlay_image"]
