"""Offline demo assets: a tiny random CLIP and a handful of synthetic image-caption pairs.

Nothing here downloads anything. ``build_tiny_clip`` writes a directory that the ordinary
``transformers`` loaders accept (``CLIPModel``, ``AutoTokenizer``, ``AutoImageProcessor``), so code
that normally loads ``openai/clip-vit-base-patch32`` can be run end to end on a laptop or in CI.
``make_demo_pairs`` draws flat-colour shapes whose captions name one of them, which is enough for
the pipeline to have something to explain (the model is random, so the maps are not meaningful).

Regenerate the shipped copy with::

    python -m m2ib_lightning.demo_assets data/demo
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "COLOURS",
    "SHAPES",
    "build_tiny_clip",
    "draw_background",
    "draw_shape",
    "make_demo_pairs",
    "verify_tiny_clip",
    "main",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"
MODEL_MAX_LENGTH = 77

# Values of transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, spelled out so that the processor
# config does not depend on where a given transformers release keeps them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((250, 250, 250), (235, 235, 235), (245, 240, 225), (225, 235, 240), (240, 230, 235))

# Common English plus the words of typical image captions, so that captions other than the demo's
# still map mostly to real tokens instead of [UNK].
_BASE_WORDS = """
a an the this that these those it its is are was were be been being has have had do does did not
no yes and or but if then than so as of in on at by for with without from to into onto over under
above below between behind near next beside inside outside around through across along up down out
off left right top bottom middle center centre side corner front back edge here there where when
what which who how why all any some each every both few many more most other another such only own
same one two three four five six seven eight nine ten first second third last single pair group
lot lots small large big little tiny huge long short tall wide narrow round flat square circle
circles squares triangle triangles shape shapes line lines dot dots spot stripe stripes pattern
red green blue yellow purple orange pink brown black white gray grey dark light bright colour
color coloured colored colourful colorful picture image photo photograph view close background
foreground scene object objects thing things man woman person people child children boy girl
baby family friend friends dog dogs cat cats bird birds horse fish animal animals tree trees flower
flowers grass plant field forest park garden water sea ocean beach lake river sky cloud clouds sun
snow rain mountain hill rock road street city town building house home room wall window door floor
table chair bed car bus train plane boat bike food plate cup glass bottle book phone computer ball
game sport player team shirt hat dress face hand hands head eye eyes hair day night morning evening
sitting standing walking running playing holding looking wearing eating drinking riding lying
jumping smiling showing shown made make take takes see seen look looks new old young good great
nice beautiful pretty empty full open closed hot cold warm high low very also just together alone
chest lung lungs heart x ray scan ct mri radiograph patient normal abnormal mass lesion opacity
""".split()
_PUNCTUATION = list(".,;:!?'\"()[]-/&%+=*#")
_DIGITS = list("0123456789")


def _training_corpus(captions: Sequence[str]) -> list[str]:
    """Return the texts the tokenizer is trained on: the base vocabulary, then ``captions``."""
    return [" ".join(_BASE_WORDS), " ".join(_PUNCTUATION), " ".join(_DIGITS), *captions]


def _train_tokenizer(captions: Sequence[str], vocab_size: int) -> Any:
    """Train a word-level ``tokenizers.Tokenizer`` with CLIP-style special tokens.

    Word-level (one id per word) keeps text attribution maps readable: every score belongs to a
    whole word, never to a sub-word piece.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    tokenizer = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # [UNK] is trained in at id 0 (so "replace by id 0" in the paper's text metric means "unknown
    # word"); BOS/EOS are appended afterwards and become the two largest ids, as in real CLIP. EOS
    # being the largest id also keeps pooling right under transformers' legacy argmax rule, which
    # it applies when eos_token_id == 2.
    trainer = WordLevelTrainer(vocab_size=vocab_size - 2, special_tokens=[UNK_TOKEN], show_progress=False)
    tokenizer.train_from_iterator(_training_corpus(captions), trainer=trainer)
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return tokenizer


def _image_processor_class() -> Any:
    """Return the PIL-backed CLIP image processor class where it exists.

    transformers 5 makes ``CLIPImageProcessor`` require torchvision and warns when it falls back
    to ``CLIPImageProcessorPil``; both save the same ``preprocessor_config.json``.
    """
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _use_portable_tokenizer_class(config_file: Path) -> None:
    """Name the tokenizer class so that transformers 4.x and 5.x both load it.

    transformers 5 saves ``"TokenizersBackend"``, a name 4.x does not know; both map
    ``"PreTrainedTokenizerFast"`` to their ``tokenizer.json``-backed class.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    config_file.write_text(text, encoding="utf-8")


def build_tiny_clip(
    out_dir: str | Path,
    *,
    captions: Sequence[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    projection_dim: int = 64,
    image_size: int = 224,
    patch_size: int = 32,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Save a tiny randomly initialised CLIP, its tokenizer and image processor into ``out_dir``.

    The directory loads offline with ``CLIPModel.from_pretrained``, ``AutoTokenizer.from_pretrained``
    and ``AutoImageProcessor.from_pretrained``. Both towers share ``hidden_size``, ``num_layers``,
    ``num_heads`` and ``intermediate_size``; with the defaults the vision tower sees
    ``(image_size / patch_size)^2 + 1 = 50`` tokens, the ViT-B/32 geometry.

    Args:
        out_dir: Directory to write (created if missing; existing files are overwritten).
        captions: Extra texts the word-level tokenizer is trained on, on top of a built-in list of
            common English words.
        hidden_size: Width of both encoders.
        num_layers: Number of transformer blocks in each encoder.
        num_heads: Attention heads per block; must divide ``hidden_size``.
        intermediate_size: Width of the MLP inside each block.
        projection_dim: Size of the shared image-text embedding.
        image_size: Input resolution of the vision tower and of the image processor.
        patch_size: ViT patch size; must divide ``image_size``.
        vocab_size: Upper bound on the tokenizer size, special tokens included.
        seed: Seed of the weight initialisation.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size must be divisible by num_heads, got {hidden_size} and {num_heads}")
    if image_size % patch_size:
        raise ValueError(f"image_size must be divisible by patch_size, got {image_size} and {patch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(list(captions or ()), vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # Real CLIP pads with EOS; the text tower pools at the FIRST EOS, so padding never moves it.
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    if tokenizer.eos_token_id == 2:
        raise RuntimeError("eos_token_id == 2 would switch transformers' CLIP text pooling to argmax")

    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
    }
    text_config = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**tower, "image_size": image_size, "patch_size": patch_size}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)

    # fork_rng keeps the caller's global RNG state untouched while making the init reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _use_portable_tokenizer_class(out / "tokenizer_config.json")
    _image_processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)
    return out


def verify_tiny_clip(model_dir: str | Path) -> None:
    """Reload ``model_dir`` the way users will and check the CLIP text conventions hold.

    Raises ``AssertionError`` if BOS/EOS are missing, padding does not use EOS, or the text
    features are not pooled at the first EOS.
    """
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    AutoImageProcessor.from_pretrained(model_dir)
    text_config = model.config.text_config
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (text_config.bos_token_id, text_config.eos_token_id) == (bos, eos), "config/tokenizer ids differ"
    assert text_config.pad_token_id == tokenizer.pad_token_id == eos, "padding must use the EOS id"
    assert text_config.vocab_size == len(tokenizer), f"{text_config.vocab_size} != {len(tokenizer)}"

    ids = tokenizer("a red circle.")["input_ids"]
    assert ids[0] == bos and ids[-1] == eos and tokenizer.unk_token_id not in ids, ids
    batch = tokenizer(["a red circle.", "a small blue square on the left"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, len(ids) :].eq(eos).all(), batch["input_ids"]
    with torch.no_grad():
        out = model.get_text_features(**batch)
        # transformers 5 returns a ModelOutput whose pooler_output is projected; 4.x a tensor.
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        hidden = model.text_model(**batch).last_hidden_state
    first_eos = batch["input_ids"].eq(eos).int().argmax(dim=-1)
    expected = model.text_projection(hidden[torch.arange(len(first_eos)), first_eos])
    torch.testing.assert_close(features, expected)


def _describe_position(row: int, col: int) -> str:
    """Coarse phrase for a cell of the 3 x 3 placement grid, e.g. ``"in the top left"``."""
    vertical = ("top", "", "bottom")[row]
    horizontal = ("left", "", "right")[col]
    if vertical and horizontal:
        return f"in the {vertical} {horizontal}"
    if horizontal:
        return f"on the {horizontal}"
    if vertical:
        return f"at the {vertical}"
    return "in the center"


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int] | int
) -> None:
    """Draw ``shape`` (one of :data:`SHAPES`) filling ``box`` = ``(x0, y0, x1, y1)`` in pixels.

    ``fill`` is an RGB triple, or a single value for a one-band image (e.g. 1 on a ``"1"``/``"L"``
    image to draw the shape's exact pixel mask with the same rasterisation as the coloured image).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_background(draw: ImageDraw.ImageDraw, rng: random.Random, image_size: int) -> None:
    """Fill the square canvas with a light plain, striped or grid background drawn from ``rng``."""
    base = rng.choice(BACKGROUNDS)
    draw.rectangle((0, 0, image_size, image_size), fill=base)
    texture = rng.choice(("plain", "stripes", "grid"))
    if texture == "plain":
        return
    # A faint tint of the base colour: enough texture to not be a constant input, while the
    # PNG stays a few kB because runs of identical pixels compress well.
    tint = tuple(max(0, c - 12) for c in base)
    step = rng.choice((14, 16, 28))
    for offset in range(0, image_size, step):
        draw.line((0, offset, image_size, offset), fill=tint, width=2)
        if texture == "grid":
            draw.line((offset, 0, offset, image_size), fill=tint, width=2)


def _draw_pair(rng: random.Random, image_size: int) -> tuple[Image.Image, str, list[int]]:
    """Draw one image and return it with a caption naming one shape and that shape's box."""
    image = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(image)
    draw_background(draw, rng, image_size)

    cell = image_size / 3
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], k=rng.randint(1, 3))
    # Distinct colours per image make "<colour> <shape>" name exactly one object.
    colours = rng.sample(sorted(COLOURS), k=len(cells))
    objects = []
    for (row, col), colour in zip(cells, colours):
        shape = rng.choice(SHAPES)
        size = int(cell * rng.uniform(0.55, 0.85))
        x0 = int(col * cell + rng.uniform(0, cell - size))
        y0 = int(row * cell + rng.uniform(0, cell - size))
        box = (x0, y0, x0 + size, y0 + size)
        draw_shape(draw, shape, box, COLOURS[colour])
        objects.append((shape, colour, row, col, box))

    shape, colour, row, col, box = rng.choice(objects)
    article = "an" if colour[0] in "aeiou" else "a"
    if len(objects) > 1 and rng.random() < 0.3:
        article = "the"
    caption = f"{article} {colour} {shape} {_describe_position(row, col)}"
    return image, caption, list(box)


def make_demo_pairs(out_dir: str | Path, n: int = 16, image_size: int = 224, seed: int = 0) -> Path:
    """Write ``n`` synthetic image-caption pairs and return the path of ``pairs.jsonl``.

    Layout: ``out_dir/images/demo-XXX.png`` and ``out_dir/pairs.jsonl``, one JSON object per line
    ``{"id", "image", "caption", "bbox"}`` where ``image`` is relative to the jsonl's folder and
    ``bbox`` is the ``[x0, y0, x1, y1]`` pixel box of the shape the caption names (for pointing-game
    style checks). The same arguments give byte-identical files.

    Args:
        out_dir: Directory to write (created if missing).
        n: Number of pairs.
        image_size: Side of the square RGB images, in pixels.
        seed: Seed of the drawing; each image uses its own stream derived from it.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        # One stream per image: pair k is the same whatever n is.
        rng = random.Random(f"{seed}-{index}")
        image, caption, bbox = _draw_pair(rng, image_size)
        sample_id = f"demo-{index:03d}"
        relative = f"images/{sample_id}.png"
        image.save(out / relative, format="PNG", optimize=True)
        record = {"id": sample_id, "image": relative, "caption": caption, "bbox": bbox}
        lines.append(json.dumps(record))
    pairs = out / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def _read_captions(pairs: Path) -> list[str]:
    with pairs.open(encoding="utf-8") as handle:
        return [json.loads(line)["caption"] for line in handle if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: regenerate the demo pairs and the tiny CLIP."""
    parser = argparse.ArgumentParser(
        prog="python -m m2ib_lightning.demo_assets",
        description="Write synthetic image-caption pairs and a tiny random CLIP trained-tokenizer model.",
    )
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("data/demo"), help="output folder")
    parser.add_argument("--n", type=int, default=16, help="number of image-caption pairs")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the weights")
    parser.add_argument("--model-subdir", default="tiny-clip", help="model folder inside out_dir")
    parser.add_argument("--skip-check", action="store_true", help="do not reload and check the model")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    # Per-shard progress bars are noise for a model this size.
    hf_logging.disable_progress_bar()

    pairs = make_demo_pairs(args.out_dir, n=args.n, image_size=args.image_size, seed=args.seed)
    model_dir = build_tiny_clip(
        args.out_dir / args.model_subdir,
        captions=_read_captions(pairs),
        image_size=args.image_size,
        seed=args.seed,
    )
    if not args.skip_check:
        verify_tiny_clip(model_dir)
    print(f"wrote {pairs} and {model_dir}")


if __name__ == "__main__":
    main()
