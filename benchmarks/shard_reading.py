"""Reading a run directory of many small shards (frequent time-based flushes) vs few large ones.

The writer flushes when ``writer.shard_size`` records wait (1024) and every ``writer.flush_every_s``
seconds (300): a slow run (CPU, expensive settings) writes many small shards. This measures what
that costs the reader: opening the directory (``load_attributions`` reads only the id columns),
reading one column of every record (``Attributions.column``), reading 200 records at random and
reading every record in order, for the same records laid out in shards of different sizes.

    python benchmarks/shard_reading.py [--records 4096] [--map-size 224] [--shard-sizes 1024 64 21 4]

(21 records per shard: a CPU run at 0.07 pairs/s flushing every 300 s.)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from m2ib_lightning.outputs import load_attributions
from m2ib_lightning.outputs.format import write_shard


def rows(n: int, map_size: int, grid: int, rng: np.random.Generator) -> list[dict]:
    tokens = ["<|startoftext|>", "a", "chest", "x", "ray", "with", "a", "nodule", "<|endoftext|>"]
    return [{"id": f"sample-{i:07d}", "similarity": 0.3, "map_height": map_size, "map_width": map_size,
             "image_map": rng.random((map_size, map_size), dtype=np.float32), "grid_height": grid,
             "grid_width": grid, "patch_scores": rng.normal(size=grid * grid).astype(np.float32),
             "tokens": tokens, "text_scores": rng.random(len(tokens), dtype=np.float32),
             "metrics": {"image/deletion": 0.1}} for i in range(n)]


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--map-size", type=int, default=224, help="image map side (224: ViT-B/32 maps, 98 KB each)")
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[1024, 64, 21, 4])
    args = parser.parse_args()
    data = rows(args.records, args.map_size, args.map_size // 32, np.random.default_rng(0))
    sample = random.Random(0).sample([r["id"] for r in data], 200)
    print(f"{args.records} records, {args.map_size} x {args.map_size} maps; median of 3 (open: of 5; every "
          "record: once)", flush=True)
    print("| records per shard | shards | open (index ids) | column('similarity') | 200 records at random "
          "| every record in order |")
    print("|---|---|---|---|---|---|")
    for size in args.shard_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            for seq, start in enumerate(range(0, len(data), size)):
                write_shard(directory, 0, seq, data[start:start + size], [], {"format": 1})
            shards = len(range(0, len(data), size))
            opened = timed(lambda: load_attributions(directory), repeat=5)
            attr = load_attributions(directory)
            column = timed(lambda: attr.column("similarity"))
            def at_random() -> None:
                opened = load_attributions(directory)
                for i in sample:
                    opened[i]

            some = timed(at_random)
            every = timed(lambda: sum(1 for _ in load_attributions(directory).values()), repeat=1)
            print(f"| {size} | {shards} | {opened:.2f} s | {column:.2f} s | {some:.2f} s | {every:.2f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
