"""ControlNet (HED): the HED detector and edges stage, a zero-init ControlNet equals its base,
training lowers the loss, and `alphaset sample --controlnet --control-image` uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import UserError, main
from pipeline.store import Store
from training.checkpoint import CONTROLNET_FILE
from training.controlnet import ControlNetTransformer
from training.hed import HED, edge_map, extract_edges, load_hed, read_edges, read_png
from training.recipes import controlnet_config, losses, run_recipe

pytest_plugins = ["conftest_train"]


@pytest.fixture(scope="module")
def edges_store(train_store) -> str:
    summary = extract_edges(train_store, "tiny", 256, use_ray=False, progress=False)
    assert summary.ok, summary.lines()
    return train_store


def test_hed_shapes_and_weights_roundtrip(tmp_path: Path):
    from safetensors.torch import save_file

    model = load_hed("tiny")
    rgb = np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)
    out = edge_map(model, rgb)
    assert out.shape == (37, 50) and out.dtype == np.uint8
    save_file(model.state_dict(), str(tmp_path / "hed.safetensors"))
    torch.save(model.state_dict(), tmp_path / "hed.pth")
    for f in ("hed.safetensors", "hed.pth"):
        assert np.array_equal(edge_map(load_hed(str(tmp_path / f)), rgb), out)
    assert len(HED().block5.convs) == 3  # VGG-16 stage 5: 3 convs (ControlNetHED_Apache2)


def test_edges_stage_rows_follow_the_shards(edges_store: str):
    store = Store(edges_store)
    edges = read_edges(store, "hed-256")
    ok = [k for sh in store.shards() for k in store.ok_keys(sh)]
    assert sorted(edges) == sorted(ok)
    assert read_png(edges[ok[0]]).shape == (256, 256)
    status = store.completed("edges/hed-256")
    assert set(status) == set(store.shards()) and all(r["errors"] == 0 for r in status.values())


def test_zero_init_controlnet_equals_the_base(trained_run: Path):
    from training.checkpoint import load_transformer

    base = load_transformer(str(trained_run / "align"))
    net = ControlNetTransformer(base, blocks=1).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    text = torch.randn(2, 120, 64, generator=g)
    mask = torch.ones(2, 120, dtype=torch.long)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        want = base(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t).sample
        got = net(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                  control=torch.randn(1, 4, 32, 32, generator=g)).sample  # fmt: skip
    assert torch.allclose(want, got, atol=1e-6)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"copies", "before_proj", "after_proj"}


def test_training_lowers_the_loss_and_sampling_uses_it(edges_store, trained_run, tmp_path, kit):
    out = tmp_path / "cn"
    cfg = controlnet_config(
        edges_store, str(trained_run / "align"), kit.TAG, "hed-256", str(out), view=kit.VIEW,
        blocks=1, steps=8, batch_size=4, lr=3e-3, num_workers=0, log_every=1, sample_every=8,
        validation_prompts=["a photo of a cat"], caption_dropout=0.0, grad_clip=1.0,
    )  # fmt: skip
    assert (cfg.stages[0].grad_clip, cfg.stages[0].caption_dropout) == (1.0, 0.0)
    final = run_recipe(cfg, progress=False, device="cpu")
    ls = losses(str(out))
    assert len(ls) == 8 and all(np.isfinite(ls)), ls
    # PixArt-δ's wiring: the control enters only through before_proj, which gets a gradient once
    # after_proj is non-zero; 8 steps move both (the controlled sample below then differs).
    from safetensors.torch import load_file

    trained = load_file(str(Path(final) / CONTROLNET_FILE))
    assert trained["before_proj.weight"].abs().max() > 0
    assert trained["after_proj.0.weight"].abs().max() > 0
    state = json.loads((Path(final) / "state.json").read_text())
    assert state["objective"] == "controlnet" and state["controlnet_base"]
    assert (Path(final) / CONTROLNET_FILE).is_file() and not (
        Path(final) / "model.safetensors"
    ).exists()
    assert (out / "controlnet" / "samples" / "step-8.png").is_file()  # grid under the edge map
    from training.checkpoint import load_transformer

    with pytest.raises(UserError, match=r"is a ControlNet checkpoint: use its base"):
        load_transformer(str(out))  # export / sample --checkpoint need the base
    edge = tmp_path / "edge.png"
    from PIL import Image

    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).save(edge)
    args = ["sample", "--checkpoint", str(trained_run / "align"), "--prompt", "a cat",
            "--steps", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    control = ["--controlnet", str(out), "--control-image", str(edge), "--out", str(tmp_path / "c")]
    assert main([*args, *control]) == 0
    a = np.asarray(Image.open(tmp_path / "plain" / "000_seed0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "c" / "000_seed0.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() > 0


def test_multi_scale_base_trains_and_resumes_exactly(edges_store, trained_run, tmp_path, kit):
    """PixArt-δ's ControlNet on a multi-scale base: micro-conditions passed, edges encoded at
    each batch's latent bucket, and --resume gives the same losses."""
    from training.config import load_config
    from training.train import train

    summary = extract_edges(
        edges_store, "tiny", 256, use_ray=False, progress=False, multi_scale=True
    )
    assert summary.ok, summary.lines()
    shapes = {read_png(png).shape for png in read_edges(edges_store, "hed-256-ms").values()}
    assert (256, 256) in shapes and len(shapes) > 1  # square and wide buckets, as the features

    stage = kit.tiny_stage(
        "ms", features=kit.TAG_MS, multi_scale=True, steps=2, save_every=2,
        init_from=str(trained_run / "align" / "checkpoints" / "step-4"),
    )  # fmt: skip
    path = kit.write_config(
        tmp_path / "ms.toml", kit.tiny_run(edges_store, tmp_path / "base"), [stage]
    )
    base = train(load_config(str(path)), progress=False)["ms"]

    def make(out):
        return controlnet_config(
            edges_store, base, kit.TAG_MS, "hed-256-ms", out, blocks=1, steps=3, batch_size=2,
            lr=1e-3, num_workers=0, log_every=1, bf16=True,
        )  # fmt: skip

    kit.assert_exact_resume(make, tmp_path, stop=2)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["stages"][0]["multi_scale"]


def test_controlnet_errors(trained_run, tmp_path, capsys):
    from training.checkpoint import load_transformer

    with pytest.raises(UserError, match=r"blocks must be 1-1 \(the base has 2 blocks\), got 2"):
        ControlNetTransformer(load_transformer(str(trained_run / "align")), blocks=2)
    bad = tmp_path / "hed.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read weights"):
        load_hed(str(bad))
    args = ["sample", "--checkpoint", str(trained_run), "--prompt", "x"]
    for extra in (["--control-image", "e.png"], ["--controlnet", "x", "--control-image", "e.png"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--control" in err
    assert main(["edges", "--store", str(tmp_path), "--hed", "tiny", "--resolution", "300"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["finetune", "controlnet", "--store", str(tmp_path), "--base", str(tmp_path / "b"),
                 "--features", "f", "--edges", "e", "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "--base" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients():
    """[run] gradient_checkpointing reaches the ControlNet's block-by-block forward."""
    from training.model import build_transformer, transformer_config

    cfg = transformer_config("tiny", resolution=256, caption_channels=64)
    grads = []
    for checkpointing in (False, True):
        base = build_transformer(cfg, seed=0)
        for p in base.parameters():  # non-zero everywhere, so gradients flow through the base
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        if checkpointing:
            base.enable_gradient_checkpointing()
        net = ControlNetTransformer(base, blocks=1)
        for lin in [net.before_proj, *net.after_proj]:
            torch.nn.init.normal_(lin.weight, std=0.05, generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(1)
        x, ctrl = torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
        text = torch.randn(2, 8, 64, generator=g)
        out = net(x, encoder_hidden_states=text, timestep=torch.tensor([10, 500]), control=ctrl)
        out.sample.square().mean().backward()
        grads.append(net.copies[0].attn1.to_q.weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
