"""Model presets and loaders for feature extraction: the T5 text encoder and the SD VAE.

``t5-v1_1-xxl`` resolves to the ``text_encoder``/``tokenizer`` subfolders of
``PixArt-alpha/PixArt-XL-2-1024-MS``: the same T5 v1.1 XXL encoder weights as
``google/t5-v1_1-xxl`` and ``DeepFloyd/t5-v1_1-xxl`` (what PixArt-α's own scripts download), but
encoder-only safetensors (~19 GB instead of the 44 GB encoder-decoder checkpoint), not gated, and
exactly the tokenizer PixArt was trained with. A local download of either of the other two works
as ``--t5 DIR`` (a flat folder), and so does a whole PixArt pipeline folder (the loader looks for
``text_encoder/`` and ``tokenizer/`` inside). ``sd-vae-ft-ema`` is ``stabilityai/sd-vae-ft-ema``
(the VAE PixArt-α ships; scale factor 0.18215); ``--vae DIR`` takes a flat folder or a pipeline
folder with ``vae/``.

The ``tiny`` presets build random-weight models with the real architectures' shapes where they
matter downstream: the tiny VAE has 4 latent channels and downsamples by 8, the tiny T5 has
``d_model`` 64 (so a tiny DiT uses ``caption_channels=64``) and a T5-style Unigram tokenizer
(``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended) trained in-process on a built-in corpus.
Both are saved and loaded back with ``from_pretrained`` like a downloaded model.
"""

from __future__ import annotations

import os
import random
from typing import Any

from pipeline.errors import UserError
from pipeline.models import Preset, not_found, resolve

T5_DIM_TINY = 64
VAE_SCALE_FACTOR = 0.18215
T5_KIND = "t5"
VAE_KIND = "vae"
LOAD_ERRORS = (OSError, ValueError, KeyError)


# ---- tiny builders ----------------------------------------------------------------------------
_WORDS = (
    "a an the of on in at with and or near under over behind beside between next to from into "
    "photo picture image painting drawing illustration render portrait close up view shot scene "
    "man woman person people child boy girl dog cat bird horse cow sheep bear zebra giraffe "
    "car truck bus train bicycle motorcycle airplane boat rocket astronaut camera tripod cup "
    "coffee saucer table chair sofa bed window door wall floor street road city building house "
    "tree trees flower flowers grass field mountain mountains river lake sea ocean beach sky "
    "cloud clouds sun moon star stars galaxy space night day morning evening sunset light "
    "red orange yellow green blue purple pink brown black white gray grey golden silver "
    "small large big tiny old young happy sad bright dark colorful wooden metal glass stone "
    "is are sitting standing walking running flying parked holding wearing looking lying "
    "background foreground left right top bottom front center middle detailed high quality "
    "style art digital oil watercolor sketch cartoon realistic photograph black-and-white "
    "one two three four five several many group pair some his her their its this that"
).split()


def tiny_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic caption-like sentences (plus every printable ASCII character) for training
    the tiny tokenizer; the words are what image captions are made of."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n)]
    lines.append("".join(chr(c) for c in range(33, 127)))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 2024 , . ! ? ; : ' \" ( ) - _ / & % $ # @ + = *")
    return lines


def build_tiny_tokenizer(folder: str, vocab_size: int = 1000) -> Any:
    """Train a T5-style Unigram tokenizer in-process and save it to ``folder``; return it."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],  # ids 0, 1, 2 as in T5
        unk_token="<unk>",
        initial_alphabet=[chr(c) for c in range(33, 127)],
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(folder)
    return fast


def build_tiny_t5(folder: str) -> None:
    """Tiny T5 v1.1-style encoder (gated-gelu, relative position buckets) + its tokenizer, laid
    out like a pipeline folder: ``text_encoder/`` and ``tokenizer/``."""
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    config = T5Config(
        vocab_size=(len(tokenizer) + 127) // 128 * 128,
        d_model=T5_DIM_TINY,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(os.path.join(folder, "text_encoder"))


def tiny_vae_model() -> Any:
    """An AutoencoderKL with the SD VAE's layout (4 blocks → downsample 8, 4 latent channels)
    and small widths."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=VAE_SCALE_FACTOR,
    )


def build_tiny_vae(folder: str) -> None:
    tiny_vae_model().save_pretrained(folder)


T5_PRESETS: dict[str, Preset] = {
    "t5-v1_1-xxl": Preset(
        "t5-v1_1-xxl",
        hub_id="PixArt-alpha/PixArt-XL-2-1024-MS",
        settings={"text_encoder_subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer"},
    ),
    "tiny": Preset("tiny", build_tiny=build_tiny_t5),
}
VAE_PRESETS: dict[str, Preset] = {
    "sd-vae-ft-ema": Preset("sd-vae-ft-ema", hub_id="stabilityai/sd-vae-ft-ema"),
    "tiny": Preset("tiny", build_tiny=build_tiny_vae),
}
PRESETS: dict[str, dict[str, Preset]] = {T5_KIND: T5_PRESETS, VAE_KIND: VAE_PRESETS}


# ---- resolving and loading --------------------------------------------------------------------
def _subfolder(source: str, preset: Preset | None, setting: str, name: str) -> str | None:
    """Which subfolder holds the part: the preset says, a local pipeline folder shows it."""
    if preset is not None and setting in preset.settings:
        return preset.settings[setting]
    if os.path.isdir(os.path.join(source, name)):
        return name
    return None


def resolve_t5(value: str) -> tuple[str, str | None, str | None]:
    """``--t5 PRESET|DIR`` → (source for from_pretrained, text_encoder subfolder, tokenizer subfolder)."""
    source, preset = resolve(value, T5_PRESETS, T5_KIND, flag="--t5")
    return (
        source,
        _subfolder(source, preset, "text_encoder_subfolder", "text_encoder"),
        _subfolder(source, preset, "tokenizer_subfolder", "tokenizer"),
    )


def resolve_vae(value: str) -> tuple[str, str | None]:
    """``--vae PRESET|DIR`` → (source for from_pretrained, subfolder)."""
    source, preset = resolve(value, VAE_PRESETS, VAE_KIND, flag="--vae")
    return source, _subfolder(source, preset, "vae_subfolder", "vae")


def _hub_id(value: str, presets: dict[str, Preset]) -> str | None:
    return presets[value].hub_id if value in presets else None


def t5_config(value: str) -> dict[str, Any]:
    """The encoder's config (no weights read): a cheap start-up check that the model is there."""
    from transformers import T5Config

    source, enc_sub, _ = resolve_t5(value)
    try:
        return T5Config.from_pretrained(source, subfolder=enc_sub or "").to_dict()
    except LOAD_ERRORS as e:
        raise not_found("T5", value, _hub_id(value, T5_PRESETS), "--t5", e) from e


def vae_config(value: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    source, sub = resolve_vae(value)
    try:
        return dict(AutoencoderKL.load_config(source, subfolder=sub))
    except LOAD_ERRORS as e:
        raise not_found("VAE", value, _hub_id(value, VAE_PRESETS), "--vae", e) from e


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """transformers >= 4.56 takes ``dtype=``; older ones only ``torch_dtype=``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_t5(value: str, dtype: Any, device: str) -> tuple[Any, Any]:
    """(T5EncoderModel in eval mode on ``device``, tokenizer) for ``--t5 PRESET|DIR``."""
    from transformers import AutoTokenizer, T5EncoderModel

    source, enc_sub, tok_sub = resolve_t5(value)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tok_sub or "")
        model = T5EncoderModel.from_pretrained(
            source, subfolder=enc_sub or "", **_dtype_kwarg(dtype)
        )
    except LOAD_ERRORS as e:
        raise not_found("T5", value, _hub_id(value, T5_PRESETS), "--t5", e) from e
    return model.to(device).eval().requires_grad_(False), tokenizer


def load_vae(value: str, dtype: Any, device: str) -> Any:
    """AutoencoderKL in eval mode on ``device`` for ``--vae PRESET|DIR``."""
    from diffusers import AutoencoderKL

    source, sub = resolve_vae(value)
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=sub, torch_dtype=dtype)
    except LOAD_ERRORS as e:
        raise not_found("VAE", value, _hub_id(value, VAE_PRESETS), "--vae", e) from e
    return vae.to(device).eval().requires_grad_(False)


DTYPES = ("auto", "bf16", "fp16", "fp32")
VAE_DTYPES = ("fp32", "fp16", "bf16")  # the VAE's: fp32 by default (see training.features)


def torch_dtype(name: str, device: str) -> Any:
    """``auto`` is bf16 on CUDA (T5 overflows in fp16; bf16 is PixArt's choice) and fp32 on CPU."""
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        name = "bf16" if device.startswith("cuda") else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
