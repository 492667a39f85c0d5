"""Tiny random models that load offline with the ordinary loaders: for tests, demos and benchmarks.

Nothing here downloads anything. :func:`build_tiny_clip` writes a directory that ``transformers``
loads (``CLIPModel``, ``AutoTokenizer``, ``AutoImageProcessor``), with a word-level tokenizer trained
on the given captions; :func:`build_tiny_siglip` and :func:`build_tiny_openclip` do the same for the
other adapters. Runtime code never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m2ib_lightning.backbones.openclip import CHECKPOINT_NAMES, CONFIG_NAME
from m2ib_lightning.errors import ConfigError

__all__ = [
    "BOS_TOKEN",
    "CLIP_MEAN",
    "CLIP_STD",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "build_tiny_clip",
    "build_tiny_openclip",
    "build_tiny_siglip",
    "use_portable_tokenizer_class",
    "verify_tiny_clip",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"
MODEL_MAX_LENGTH = 77

# Values of transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, spelled out so that the processor
# config does not depend on where a given transformers release keeps them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def use_portable_tokenizer_class(config_file: Path) -> None:
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
    text_layers: int | None = None,
) -> Path:
    """Save a tiny randomly initialised CLIP, its tokenizer and image processor into ``out_dir``.

    The directory loads offline with ``CLIPModel.from_pretrained``, ``AutoTokenizer.from_pretrained``
    and ``AutoImageProcessor.from_pretrained``. Both towers share ``hidden_size``, ``num_layers``
    (unless ``text_layers`` is given), ``num_heads`` and ``intermediate_size``; with the defaults the
    vision tower sees ``(image_size / patch_size)^2 + 1 = 50`` tokens, the ViT-B/32 geometry.

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
        text_layers: Number of blocks of the text encoder when it differs from the vision
            encoder's (``num_layers``); None: both have ``num_layers``.

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
        **({} if text_layers is None else {"num_hidden_layers": text_layers}),
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
    use_portable_tokenizer_class(out / "tokenizer_config.json")
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


def build_tiny_siglip(
    out_dir: str | Path,
    captions: Sequence[str] = (),
    hidden_size: int = 32,
    num_layers: int = 3,
    num_heads: int = 2,
    intermediate_size: int = 64,
    image_size: int = 64,
    patch_size: int = 16,
    text_length: int = 16,
    seed: int = 0,
) -> Path:
    """Save a tiny random ``SiglipModel`` with a word-level tokenizer and image processor to ``out_dir``.

    The released SigLIP tokenizer needs sentencepiece and a download; this one is built with the
    ``tokenizers`` library from ``captions`` (plus a few words) with SigLIP's conventions: no BOS,
    ``</s>`` appended as EOS and used for padding (id 1), ``<unk>`` id 0.
    """
    import transformers
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(WordLevel(unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    trainer = WordLevelTrainer(special_tokens=["<unk>", "</s>"], show_progress=False)
    core.train_from_iterator(["a an the of on in at with and photo picture image", *captions], trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>",
                                        pad_token="</s>", model_max_length=text_length, padding_side="right")
    tower = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
             "num_attention_heads": num_heads}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": text_length,
                     "pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None, "projection_size": hidden_size},
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    use_portable_tokenizer_class(out / "tokenizer_config.json")
    # The PIL processor where it exists: transformers 5's default one needs torchvision.
    processor = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    processor(do_resize=True, size={"height": image_size, "width": image_size},
                            image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


def build_tiny_openclip(
    out_dir: str | Path,
    width: int = 32,
    num_layers: int = 3,
    head_width: int = 16,
    embed_dim: int = 16,
    image_size: int = 64,
    patch_size: int = 16,
    context_length: int = 32,
    seed: int = 0,
    weights: str = "open_clip_model.safetensors",
    custom_text: bool = False,
    text_cfg: dict[str, Any] | None = None,
) -> Path:
    """Save a tiny random open_clip ``CLIP`` to ``out_dir`` as open_clip's ``local-dir:`` format.

    ``open_clip_config.json`` (model and preprocessing config) is built by open_clip's own config
    mechanism, and the weights are written to ``weights`` (``open_clip_model.safetensors``, or
    ``open_clip_pytorch_model.bin`` for a pickle). ``custom_text`` builds a ``CustomTextCLIP`` (text
    tower under ``model.text``) instead of a ``CLIP``; ``text_cfg`` overrides entries of open_clip's
    ``CLIPTextCfg`` (e.g. ``no_causal_mask``, ``pool_type``, ``qk_norm``). The tokenizer is
    open_clip's shipped BPE vocabulary, so the text tower keeps the full 49408-token vocabulary.
    """
    import open_clip

    if weights not in CHECKPOINT_NAMES:
        raise ConfigError(f"weights must be one of {CHECKPOINT_NAMES}, got {weights!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": num_layers, "width": width, "head_width": head_width,
                       "patch_size": patch_size},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": width // head_width, "layers": num_layers, **(text_cfg or {})},
        **({"custom_text": True} if custom_text else {}),
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # No weights in the directory yet: open_clip builds the model with its own random init.
        model = open_clip.create_model(f"local-dir:{out}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, out / weights)
    else:
        torch.save(state, out / weights)
    return out
