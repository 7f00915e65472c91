"""Caption model presets and the random-weight LLaVA builders behind the `tiny` presets.

`PRESETS` maps the names `alphaset caption --model` accepts to a hub id (real models, loaded from
the Hugging Face cache or a local folder) or to a builder that writes a small random-weight LLaVA
into a folder: config + safetensors, a tokenizer built here with the `tokenizers` library (no
download), an image processor and the llava-hf chat template. Such a folder loads through exactly
the `from_pretrained` calls a downloaded model takes, so tests and the demo run the real code path.

`LlavaArch` describes an architecture by its sizes; `build_llava` makes the model and processor in
memory (the GPU benchmark builds the llava-1.5-7b architecture this way, without any download).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.models import Preset

# The chat template of llava-hf/llava-1.5-7b-hf ("USER: <image>\n{prompt} ASSISTANT:").
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "image": "<image>"}

# A few sentences of the language captions are written in: the tokenizer's trained vocabulary.
_CORPUS = """\
USER ASSISTANT system user assistant
Describe this image and its style in a very detailed manner.
Given the caption of this image, describe this image in a very detailed manner.
The image shows a photograph of a cat sitting on a wooden table next to a cup of coffee.
In the background there is a window with soft natural light, and the colors are warm and muted.
A rocket stands on the launch pad under a clear blue sky; smoke rises from its base.
The style is realistic, with sharp focus, high contrast, shallow depth of field and fine detail.
An astronaut in a white suit holds a flag; the portrait is lit from the left.
A black and white picture of a man with a camera in a park, grass and trees behind him.
Microscope slide with stained cells in brown and blue tones, a scientific illustration.
Painting, drawing, sketch, digital art, 3d render, watercolor, oil, cartoon, anime, vintage.
Red green blue yellow orange purple pink white black gray brown gold silver dark bright.
People, animals, buildings, streets, mountains, rivers, ocean, beach, city, forest, flowers, food.
A close-up view from above, at night, during the day, indoors and outdoors, with text and logos.
one two three four five many several small large tall short old new young round square
: ; , . ! ? " ' ( ) - / & %
"""


@dataclass(frozen=True)
class LlavaArch:
    """Sizes of a LLaVA model: a CLIP vision tower, a projector and a Llama text model.

    ``next=True`` makes a LLaVA-NeXT (any-resolution tiling) model instead of LLaVA-1.5.
    ``vocab_size=None`` sizes the vocabulary to the tokenizer's.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 128
    vocab_size: int | None = None
    max_positions: int = 2048
    next: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.text_hidden % self.text_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden sizes must be multiples of the head counts")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ARCHS: dict[str, LlavaArch] = {
    "tiny": LlavaArch(),
    "tiny-next": LlavaArch(next=True),
    # ~60M parameters: the CPU benchmark's model (vocabulary and text width of a real LLaVA scaled down).
    "bench-cpu": LlavaArch(
        image_size=224, patch_size=32, vision_hidden=256, vision_layers=4, vision_heads=4,
        vision_intermediate=1024, text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=8,
        text_intermediate=1376, vocab_size=32064,
    ),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2 7B) — for random-weight benchmarks.
    "llava-1.5-7b": LlavaArch(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32,
        text_intermediate=11008, vocab_size=32064, max_positions=4096,
    ),
}  # fmt: skip


def build_tokenizer(vocab_size: int | None = None):
    """A word-level tokenizer trained here on a small English text, with LLaVA's special tokens.

    With ``vocab_size`` the vocabulary is filled up with placeholder words so that every id a
    random model can generate decodes to text.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        _CORPUS.splitlines(), trainers.WordLevelTrainer(special_tokens=specials)
    )
    vocab = tok.get_vocab()
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(
                f"vocab_size {vocab_size} is below the trained vocabulary ({len(vocab)})"
            )
        vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
        tok.model = models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"])
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        padding_side="left",
        model_max_length=4096,
    )


def build_llava(
    arch: LlavaArch, dtype: Any = None, device: Any = None, attn_implementation: str | None = None
) -> tuple[Any, Any]:
    """A random-weight LLaVA (or LLaVA-NeXT) model and its processor, built in memory
    (directly on ``device``: a 7B model never passes through host memory in float32)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer(arch.vocab_size)
    vocab = len(tokenizer)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in SPECIAL_TOKENS.items()}
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        projection_dim=arch.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads,
        max_position_embeddings=arch.max_positions,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["image"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    crop = {"height": arch.image_size, "width": arch.image_size}
    image_kwargs = dict(
        size={"shortest_edge": arch.image_size},
        crop_size=crop,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    proc_kwargs = dict(
        tokenizer=tokenizer,
        patch_size=arch.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    if arch.next:
        s = arch.image_size
        pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        config = LlavaNextConfig(
            **common, image_grid_pinpoints=pinpoints, image_seq_length=arch.image_tokens
        )
        model_cls = LlavaNextForConditionalGeneration
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(**image_kwargs, image_grid_pinpoints=pinpoints),
            **proc_kwargs,
        )
    else:
        config = LlavaConfig(**common, image_seq_length=arch.image_tokens)
        model_cls = LlavaForConditionalGeneration
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(**image_kwargs), **proc_kwargs
        )
    config.pad_token_id = ids["pad"]
    torch.manual_seed(0)  # the same tiny model wherever it is built
    with torch.device(device or "cpu"):
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = model_cls._from_config(config, dtype=dtype or torch.float32, **kwargs)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    return model, processor


def save_llava(arch: LlavaArch, folder: str) -> None:
    """Build a random-weight model of ``arch`` and save it where ``from_pretrained`` finds it."""
    model, processor = build_llava(arch)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _builder(arch_name: str):
    def build(folder: str) -> None:
        save_llava(ARCHS[arch_name], folder)

    build.__name__ = f"build_{arch_name.replace('-', '_')}"
    return build


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", build_tiny=_builder("tiny")),
    "tiny-next": Preset("tiny-next", build_tiny=_builder("tiny-next")),
    "llava-1.5-7b": Preset("llava-1.5-7b", hub_id="llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": Preset("llava-1.5-13b", hub_id="llava-hf/llava-1.5-13b-hf"),
    "llava-v1.6-vicuna-7b": Preset(
        "llava-v1.6-vicuna-7b", hub_id="llava-hf/llava-v1.6-vicuna-7b-hf"
    ),
    "llava-v1.6-mistral-7b": Preset(
        "llava-v1.6-mistral-7b", hub_id="llava-hf/llava-v1.6-mistral-7b-hf"
    ),
}


def arch(name: str, **overrides: Any) -> LlavaArch:
    """An architecture from ARCHS with some sizes changed (benchmarks)."""
    if name not in ARCHS:
        raise ValueError(f"unknown LLaVA architecture {name!r} (known: {', '.join(ARCHS)})")
    return replace(ARCHS[name], **overrides)
