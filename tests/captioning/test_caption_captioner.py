import numpy as np
import pytest
from PIL import Image

from captioning.captioner import ALT_PROMPT, DEFAULT_PROMPT, CaptionConfig, Captioner, clean_caption
from pipeline.errors import UserError


def _photos(photos_dir, n=3):
    return [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir())[:n]]


@pytest.mark.parametrize(
    "raw, prompt, expected",
    [
        ("  A cat\n on a  table. ", "Describe it.", "A cat on a table."),
        ("ASSISTANT: A cat.", "Describe it.", "A cat."),
        ("Describe it. A cat.", "Describe it.", "A cat."),
        ("assistant: describe IT.  ASSISTANT: a dog", "Describe it.", "a dog"),
        ("A description of it.", "Describe it.", "A description of it."),
    ],
)
def test_clean_caption_strips_echoes_and_whitespace(raw, prompt, expected):
    assert clean_caption(raw, prompt) == expected


def test_prompt_with_alt_follows_pixart():
    cfg = CaptionConfig(prompt_with_alt=True)
    assert cfg.user_prompt('a  "red"\ncar') == ALT_PROMPT.format("a 'red' car")
    assert cfg.user_prompt('a "red" car').startswith(
        "Given the caption of this image \"a 'red' car\", describe"
    )
    assert cfg.user_prompt(None) == cfg.user_prompt("  ") == DEFAULT_PROMPT
    assert CaptionConfig(prompt="Hi").user_prompt("alt") == "Hi"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"prompt": " "}, "--prompt must not be empty"),
        ({"dtype": "int8"}, "--dtype must be one of auto, float32, float16, bfloat16, got 'int8'"),
        ({"max_side": 8}, "--max-side must be >= 16"),
        ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens must be in 0..max_new_tokens"),
    ],
)
def test_bad_settings_fail_early_naming_the_value(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        CaptionConfig(**kwargs)


def test_batched_generation_with_left_padding_matches_one_by_one(tiny_loaded, photos_dir):
    model, processor = tiny_loaded
    cap = Captioner(model, processor, CaptionConfig(max_new_tokens=6, batch_size=3))
    imgs = _photos(photos_dir)
    alts = [None, "a longer alt text that makes this prompt longer than the others", None]
    cap_alt = Captioner(
        model, processor, CaptionConfig(max_new_tokens=6, batch_size=3, prompt_with_alt=True)
    )
    batched = cap_alt.caption(imgs, alts)
    single = [cap_alt.caption([img], [alt])[0] for img, alt in zip(imgs, alts, strict=True)]
    assert batched == single
    assert cap_alt.prepare(imgs, alts).inputs["attention_mask"][0, 0] == 0  # padded on the left
    out = cap.caption(imgs)
    assert all(c.text and c.n_tokens == 6 and c.truncated for c in out)  # random weights: no EOS
    assert cap.device.type == "cpu" and str(cap.dtype) == "torch.float32"


def test_finish_counts_tokens_and_flags_truncation(tiny_loaded):
    model, processor = tiny_loaded
    cap = Captioner(model, processor, CaptionConfig(max_new_tokens=4))
    eos, pad = processor.tokenizer.eos_token_id, cap.pad_id
    word = processor.tokenizer.convert_tokens_to_ids("cat")
    assert cap.finish([word, word, eos, pad], "p").__dict__ == {
        "text": "cat cat",
        "n_tokens": 2,
        "truncated": False,
    }
    assert cap.finish([word] * 4, "p").truncated is True
    assert (
        cap.finish([word] * 3, "p").truncated is False
    )  # shorter than the limit: ended by padding


def test_max_side_downsizes_before_the_processor(tiny_loaded):
    model, processor = tiny_loaded
    cap = Captioner(model, processor, CaptionConfig(max_new_tokens=2, max_side=64))
    big = Image.fromarray(np.full((900, 1200, 3), 128, np.uint8))
    # --max-side first (64x48), then the CLIP processor's shortest edge (32), both with PIL
    assert cap.shortest_edge == 32 and cap.fit(big).size == (43, 32)
    prepared = cap.prepare([big])
    assert prepared.inputs["pixel_values"].shape[-2:] == (32, 32)
    assert cap.generate(prepared)[0].n_tokens == 2


def test_static_cache_pads_the_last_batch_and_gives_the_same_captions(tiny_loaded, photos_dir):
    model, processor = tiny_loaded
    imgs = _photos(photos_dir, 3)
    dyn = Captioner(model, processor, CaptionConfig(max_new_tokens=5, batch_size=2))
    static = Captioner(
        model, processor, CaptionConfig(max_new_tokens=5, batch_size=2, cache="static")
    )
    assert static.prepare(imgs[:1]).inputs["input_ids"].shape[1] % 64 == 0
    assert [c.text for c in static.caption(imgs)] == [c.text for c in dyn.caption(imgs)]


def test_llava_next_preset_captions(photos_dir):
    from captioning.models import PRESETS
    from pipeline.models import tiny_model_dir

    cap = Captioner.load(
        tiny_model_dir("caption", PRESETS["tiny-next"]), CaptionConfig(max_new_tokens=3)
    )
    assert type(cap.model).__name__ == "LlavaNextForConditionalGeneration"
    assert cap.shortest_edge is None  # any-resolution tiling needs the whole image
    out = cap.caption(_photos(photos_dir, 2))
    assert [c.n_tokens for c in out] == [3, 3] and all(c.text for c in out)
