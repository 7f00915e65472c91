import json
from pathlib import Path

import pytest

from captioning.models import ARCHS, PRESETS, build_tokenizer
from pipeline.cli import main
from pipeline.models import ModelNotFoundError, resolve


def test_tiny_preset_is_a_real_llava_folder_loaded_by_from_pretrained(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    files = {p.name for p in Path(tiny_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert resolve("tiny", PRESETS, "caption") == (tiny_dir, PRESETS["tiny"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nDescribe it. ASSISTANT:"  # llava-hf's LLaVA-1.5 template
    assert (
        json.loads((Path(tiny_dir) / "config.json").read_text())["text_config"]["num_hidden_layers"]
        == 2
    )


def test_tokenizer_decodes_every_id_of_a_padded_vocabulary():
    tok = build_tokenizer(vocab_size=300)
    assert len(tok) == 300
    assert tok.decode(list(range(5, 300)), skip_special_tokens=True).count(" ") == 300 - 5 - 1
    ids = tok("Describe this image.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids


def test_llava_1_5_7b_architecture_matches_the_hub_model():
    a = ARCHS["llava-1.5-7b"]
    assert (a.image_size, a.patch_size, a.image_tokens) == (336, 14, 576)
    assert (a.text_hidden, a.text_layers, a.text_heads, a.text_intermediate, a.vocab_size) == (
        4096, 32, 32, 11008, 32064,
    )  # fmt: skip
    assert PRESETS["llava-1.5-7b"].hub_id == "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize(
    "model, expected",
    [
        (
            "llava-1.5-7b",
            r"cannot load caption model 'llava-1\.5-7b' \(hub id llava-hf/llava-1\.5-7b-hf\).*--model DIR",
        ),
        ("no-such-preset", r"unknown caption preset .*llava-1\.5-7b.*tiny"),
        ("./no/such/folder", r"--model \./no/such/folder: no such folder"),
    ],
)
def test_missing_model_is_a_one_line_error(photo_store, capsys, monkeypatch, model, expected):
    import re

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["caption", "--store", photo_store.root, "--model", model, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(expected, err), err


def test_a_folder_without_a_model_is_refused(photo_store, tmp_path):
    from captioning.run import locate_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"cannot load caption model .*empty.*--model DIR"):
        locate_model(str(tmp_path / "empty"))
