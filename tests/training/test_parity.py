"""PixArt-α parity settings of the trainer: lr scaling, pe_interpolation, micro-conditions from
the original size, and official ``.pth`` checkpoints as ``init_from`` (tiny-model features)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import UserError
from training.buckets import ASPECT_RATIO_256, bucket_ratio
from training.checkpoint import read_state
from training.config import StageConfig, load_config
from training.data import FeatureBatches, open_features
from training.objective import Objective
from training.train import effective_lr, train

pytest_plugins = ["conftest_train"]


def test_effective_lr_is_pixarts_auto_scale_rule():
    """sqrt(global batch / 256): 176 per GPU on 64 GPUs is 6.63× the configured 2e-5."""
    stage = StageConfig(name="s", features="f", resolution=256, steps=1, batch_size=176)
    assert effective_lr(stage, 64) == 2e-5
    stage.lr_scale = "sqrt"
    assert math.isclose(effective_lr(stage, 64) / 2e-5, 6.633, rel_tol=1e-3)
    stage.lr_scale = "linear"
    assert math.isclose(effective_lr(stage, 64), 2e-5 * 176 * 64 / 256)


@pytest.mark.parametrize(
    "stage, match",
    [
        ({"lr_scale": "cubic"}, r"lr_scale must be one of \('none', 'sqrt', 'linear'\)"),
        ({"micro_conditions": "x"}, r"micro_conditions must be one of \('original', 'bucket'\)"),
        ({"null": "zeros"}, r"null must be one of \('t5-empty', 'y_embedding'\)"),
        ({"pe_interpolation": "gamma"}, r"pe_interpolation must be a number or one of alpha"),
        ({"pe_interpolation": -1.0}, r"pe_interpolation must be a positive number"),
    ],
)
def test_parity_settings_are_validated(kit, tmp_path, stage, match):
    path = kit.write_config(
        tmp_path / "s.toml", kit.tiny_run("st", tmp_path), [kit.tiny_stage("s", **stage)]
    )
    with pytest.raises(UserError, match=match):
        load_config(str(path))


def test_pixart_alpha_config_uses_pixarts_recipe():
    from pathlib import Path

    cfg = load_config(str(Path(__file__).parents[2] / "configs" / "pixart_alpha.toml"))
    assert all(s.lr_scale == "sqrt" for s in cfg.stages)
    assert all(s.micro_conditions == "original" and s.null == "t5-empty" for s in cfg.stages)


def test_batches_carry_the_original_size_and_the_bucket_ratio_key(kit, train_store, tmp_path):
    fset = open_features(train_store, kit.TAG_MS, resolution=256, multi_scale=True, stage="s")
    it = iter(FeatureBatches(fset, 2, seed=0, shuffle_buffer=16))
    seen = set()
    for _ in range(6):
        batch = next(it)
        h, w = (int(x) for x in batch["hw"][0])
        seen.add(tuple(int(x) for x in batch["orig_hw"][0]))
        key = next(float(k) for k, v in ASPECT_RATIO_256.items() if v == (h, w))
        assert torch.equal(batch["ratio"], torch.full((2, 1), key))
        assert bucket_ratio(h, w, 256) == key
    assert seen <= {(256, 256), (192, 384)} and (192, 384) in seen  # the photos' stored sizes
    stage = kit.tiny_stage("s", features=kit.TAG_MS, multi_scale=True)
    path = kit.write_config(tmp_path / "s.toml", kit.tiny_run(train_store, tmp_path), [stage])
    cfg = load_config(str(path))
    objective = Objective(cfg, cfg.stages[0], torch.device("cpu"))
    added = objective.added(batch)
    assert torch.equal(added["resolution"], batch["orig_hw"])
    assert torch.equal(added["aspect_ratio"], batch["ratio"])
    cfg.stages[0].micro_conditions = "bucket"
    added = objective.added(batch)
    assert torch.equal(added["resolution"], batch["hw"])
    assert torch.allclose(added["aspect_ratio"][:, 0], batch["hw"][:, 0] / batch["hw"][:, 1])


def test_lr_scale_is_applied_logged_and_recorded(kit, train_store, tmp_path):
    stage = kit.tiny_stage("s", steps=2, warmup=0, lr_scale="sqrt")
    path = kit.write_config(tmp_path / "s.toml", kit.tiny_run(train_store, tmp_path), [stage])
    finals = train(load_config(str(path)), progress=False)
    want = 1e-3 * math.sqrt(2 / 256)
    state = read_state(finals["s"])
    assert math.isclose(state["effective_lr"], want) and state["global_batch"] == 2
    metrics = [
        json.loads(x) for x in (tmp_path / "t" / "s" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(math.isclose(m["lr"], want) for m in metrics)


def test_a_pixart_pth_as_init_from_with_its_pe_interpolation(kit, train_store, tmp_path):
    """A tiny random checkpoint in PixArt's layout (256 px: lewei_scale 1.0) starts a stage."""
    from test_pixart_import import random_pth

    pth = tmp_path / "PixArt-XL-2-256x256.pth"
    sd = random_pth(pth, layers=2, hidden=48, caption=64, res=256)
    stages = [
        kit.tiny_stage("a", init_from=str(pth), steps=1, lr=1e-6, warmup=0),
        kit.tiny_stage("b", init_from=str(pth), steps=1, pe_interpolation="sigma"),
    ]
    path = kit.write_config(tmp_path / "s.toml", kit.tiny_run(train_store, tmp_path), stages)
    finals = train(load_config(str(path)), progress=False)
    assert read_state(finals["a"])["transformer_config"]["interpolation_scale"] == 1.0
    assert read_state(finals["b"])["transformer_config"]["interpolation_scale"] == 0.5
    w = load_file(f"{finals['a']}/model.safetensors")
    q, k, _ = sd["blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.allclose(w["transformer_blocks.1.attn1.to_k.weight"], k, atol=1e-4)
    assert torch.allclose(w["pos_embed.proj.weight"], sd["x_embedder.proj.weight"], atol=1e-4)


def test_import_pixart_cli_writes_a_loadable_folder(tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel
    from test_pixart_import import random_pth

    from pipeline.cli import main

    pth = tmp_path / "PixArt-XL-2-1024-MS.pth"
    sd = random_pth(pth, res=1024, ms=True)
    out = tmp_path / "imported"
    assert main(["import", "pixart", str(pth), "--out", str(out)]) == 0
    assert "1024 px multi-scale, pe_interpolation 2.0, y_embedding kept" in capsys.readouterr().out
    model = PixArtTransformer2DModel.from_pretrained(str(out))
    assert model.config.interpolation_scale == 2.0 and model.config.use_additional_conditions
    assert torch.equal(model.proj_out.weight, sd["final_layer.linear.weight"])
    y = load_file(str(out / "y_embedding.safetensors"))["y_embedding"]
    assert torch.equal(y, sd["y_embedder.y_embedding"])
    info = json.loads((out / "alphaset_import.json").read_text())
    assert info["resolution"] == 1024 and info["multi_scale"] is True
    # One-line errors: an existing folder, a file that is not a PixArt checkpoint.
    assert main(["import", "pixart", str(pth), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert main(["import", "pixart", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a loadable .pth" in err and err.count("\n") == 1


def test_null_y_embedding_from_an_imported_checkpoint(kit, train_store, tmp_path):
    """Caption dropout to PixArt's learned null (keeping the caption's mask), end to end."""
    from test_pixart_import import random_pth

    from pipeline.cli import main
    from training.train import with_y_embedding_null

    pth = tmp_path / "PixArt-XL-2-256x256.pth"
    sd = random_pth(pth, layers=2, hidden=48, caption=64, res=256)
    out = tmp_path / "imported"
    assert main(["import", "pixart", str(pth), "--out", str(out)]) == 0
    stages = [
        kit.tiny_stage("a", init_from=str(out), steps=2, null="y_embedding", caption_dropout=0.9),
        kit.tiny_stage("b", init_from="previous", steps=1, null="y_embedding"),
    ]
    path = kit.write_config(tmp_path / "s.toml", kit.tiny_run(train_store, tmp_path), stages)
    cfg = load_config(str(path))
    fset = open_features(train_store, kit.TAG, resolution=256, multi_scale=False, stage="a")
    fy = with_y_embedding_null(fset, cfg, cfg.stages[1])  # 'previous' walks back to the import
    y16 = sd["y_embedder.y_embedding"].numpy().astype("float16")
    assert (fy.null_t5 == y16).all() and fy.null_keeps_mask
    batches = iter(FeatureBatches(fy, 2, seed=0, shuffle_buffer=4, caption_dropout=0.99))
    batch = next(batches)
    assert (batch["t5"].numpy() == y16).all() and (batch["mask"].sum(1) < 120).all()
    finals = train(cfg, progress=False)
    assert set(finals) == {"a", "b"}
    scratch = kit.tiny_stage("c", null="y_embedding")
    bad = kit.write_config(
        tmp_path / "b.toml", kit.tiny_run(train_store, tmp_path / "x"), [scratch]
    )
    with pytest.raises(UserError, match=r"null = 'y_embedding' needs an init_from PixArt .pth"):
        train(load_config(str(bad)), progress=False)


def test_sampling_with_pixarts_learned_null(trained_run, tmp_path, capsys):
    """`sample --y-embedding SOURCE`: the unconditional branch is PixArt's y_embedding."""
    import numpy as np
    from PIL import Image
    from test_pixart_import import random_pth

    from pipeline.cli import main

    pth = tmp_path / "PixArt-XL-2-256x256.pth"
    random_pth(pth, layers=2, hidden=48, caption=64, res=256)
    args = ["sample", "--checkpoint", str(trained_run / "align"), "--prompt", "a cat",
            "--steps", "2", "--cfg", "4.5", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "t5")]) == 0
    assert main([*args, "--y-embedding", str(pth), "--out", str(tmp_path / "y")]) == 0
    assert main([*args, "--y-embedding", str(pth), "--out", str(tmp_path / "y2")]) == 0
    img = {
        d: np.asarray(Image.open(tmp_path / d / "000_seed0.png"), dtype=np.int16)
        for d in ("t5", "y", "y2")
    }
    assert np.array_equal(img["y"], img["y2"]) and np.abs(img["y"] - img["t5"]).max() > 0
    record = json.loads((tmp_path / "y" / "samples.json").read_text())
    assert json.dumps(record).count(str(pth)) >= 1
    capsys.readouterr()
    assert main([*args, "--y-embedding", str(tmp_path), "--out", str(tmp_path / "z")]) == 2
    assert "no y_embedding in it" in capsys.readouterr().err
