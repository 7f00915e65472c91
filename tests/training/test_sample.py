"""`alphaset sample`: every sampler on tiny diffusers exports (loaded with from_pretrained like a
user's), bucket snapping, outputs and determinism, --low-vram equivalence, one-line errors, and a
training run folder sampled directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import UserError, main
from training.sample import (
    GRID_FILE,
    RESULT_FILE,
    SAMPLERS,
    SampleSettings,
    generate,
    load_model,
    parse_size,
    sample,
    snap_size,
)

pytest_plugins = ["conftest_train"]

PROMPTS = ["a photo of a cat", "a red car on a street"]


def _tiny_export(folder: Path, t5_dir: Path, *, multi_scale: bool) -> Path:
    """A PixArtAlphaPipeline of tiny random models saved with save_pretrained.

    Single-scale: a 256 px model (sample_size 32). Multi-scale: laid out as training.export writes
    a 256 px multi-scale model (sample_size 128 so the pipeline passes micro-conditions, the
    training resolution in alphaset_export.json). Both learn sigma (8 output channels)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from training.diffusion import inference_scheduler
    from training.export import EXPORT_INFO, pipeline_transformer_config
    from training.feature_models import tiny_vae_model

    config = {
        "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 24, "patch_size": 2,
        "in_channels": 4, "out_channels": 8, "caption_channels": 64, "cross_attention_dim": 48,
        "sample_size": 32, "interpolation_scale": 0.5, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "num_embeds_ada_norm": 1000,
        "activation_fn": "gelu-approximate", "attention_bias": True,
        "use_additional_conditions": multi_scale,
    }  # fmt: skip
    torch.manual_seed(1)
    transformer = PixArtTransformer2DModel(**pipeline_transformer_config(config))
    for p in transformer.parameters():  # non-zero everywhere: outputs depend on every input
        p.data.normal_(0, 0.05)
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(t5_dir / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(t5_dir / "text_encoder"),
        vae=tiny_vae_model(),
        transformer=transformer,
        scheduler=inference_scheduler(),
    )
    pipe.save_pretrained(folder)
    if multi_scale:
        settings = {"resolution": 256, "multi_scale": True, "max_length": 120}
        (folder / EXPORT_INFO).write_text(json.dumps({"features": {"settings": settings}}))
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads
    make them ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    from training.feature_models import build_tiny_t5

    root = tmp_path_factory.mktemp("sample-exports")
    build_tiny_t5(str(root / "t5"))
    return {
        "single": _tiny_export(root / "single", root / "t5", multi_scale=False),
        "multi": _tiny_export(root / "multi", root / "t5", multi_scale=True),
    }


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# ---- samplers and sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_gives_the_bucket_size(exports, name):
    result = sample(str(exports["single"]), PROMPTS, sampler=name, steps=2, size="300x200", batch=2)
    gen = result.generation
    # 300x200 is h/w 0.667: PixArt's 256 px bucket "0.68" is 208 x 304
    assert gen.size == (304, 208)
    assert [im.size for im in result.images] == [(304, 208)] * 2
    assert gen.scheduler["class"] == SAMPLERS[name].scheduler
    assert all(_arr(im).std() > 1 for im in result.images)
    assert not np.array_equal(_arr(result.images[0]), _arr(result.images[1]))


def test_sampler_defaults_are_pixarts():
    assert {n: (s.steps, s.cfg) for n, s in SAMPLERS.items()} == {
        "dpm": (20, 4.5),
        "sa": (25, 3.0),
        "iddpm": (100, 4.5),
        "lcm": (4, 1.0),
    }
    s = SampleSettings(sampler="lcm")
    assert (s.steps, s.cfg) == (4, 1.0)
    assert SampleSettings(sampler="sa", steps=7, cfg=2.0).steps == 7


def test_snap_size_to_buckets():
    assert snap_size(1024, 1024, 1024, 16) == (1024, 1024)
    assert snap_size(1024, 768, 1024, 16) == (1152, 832)  # landscape 3:4 → bucket 0.72
    assert snap_size(768, 1024, 1024, 16) == (896, 1152)
    assert snap_size(4000, 100, 512, 16) == (1024, 256)  # beyond the table: the extreme bucket
    assert snap_size(300, 200, 256, 16) == (304, 208)
    # a resolution without a table: sides on the latent patch grid
    assert snap_size(100, 20, 64, 16) == (96, 16)
    assert parse_size("1024X768") == (1024, 768)


def test_multi_scale_model_snaps_to_its_training_buckets(exports, tmp_path):
    """A multi-scale export (sample_size 128, micro-conditions on) trained at 256 px: a 2:1 request
    lands in the 256 px table's 0.5 bucket, not the 1024 px one."""
    result = sample(
        str(exports["multi"]),
        PROMPTS[:1],
        sampler="dpm",
        steps=2,
        size="1024x512",
        out=str(tmp_path),
    )
    assert result.generation.size == (352, 176)
    rec = result.record
    assert rec["model_resolution"] == 256 and rec["multi_scale"] is True
    assert rec["size_requested"] == [1024, 512] and rec["size"] == [352, 176]
    assert Image.open(tmp_path / "000_seed0.png").size == (352, 176)


# ---- outputs, determinism, low-vram -------------------------------------------------------------
def test_outputs_and_determinism(exports, tmp_path):
    kw = dict(sampler="lcm", steps=2, seed=5, per_prompt=2, size="256x256")  # noise at each step
    a = sample(str(exports["single"]), PROMPTS[:1], batch=2, out=str(tmp_path / "a"), **kw)
    b = sample(str(exports["single"]), PROMPTS[:1], batch=1, out=str(tmp_path / "b"), **kw)
    names = ["000_seed5.png", "001_seed6.png"]
    # an image depends on its seed, not on the batch it ran in (up to float rounding)
    for x, y in zip(a.images, b.images, strict=True):
        assert np.abs(_arr(x) - _arr(y)).max() <= 2
    assert not np.array_equal(_arr(a.images[0]), _arr(a.images[1]))  # seeds differ per image

    rec = json.loads((tmp_path / "a" / RESULT_FILE).read_text())
    assert rec["sampler"] == "lcm" and rec["steps"] == 2 and rec["cfg"] == 1.0 and rec["seed"] == 5
    assert rec["size"] == [256, 256] and rec["checkpoint"] == str(exports["single"])
    assert rec["scheduler"]["class"] == "LCMScheduler"
    assert rec["scheduler"]["beta_schedule"] == "linear"  # the model's noise schedule kept
    assert [(i["file"], i["prompt"], i["seed"]) for i in rec["images"]] == [
        (names[0], PROMPTS[0], 5),
        (names[1], PROMPTS[0], 6),
    ]
    assert set(rec["versions"]) >= {"alphaset", "torch", "diffusers", "transformers"}
    assert rec["device"] == "cpu" and rec["dtype"] == "float32"
    grid = Image.open(tmp_path / "a" / GRID_FILE)
    assert grid.size == (2 * 256 + 3 * 2, 256 + 2 * 2)
    assert np.array_equal(np.asarray(grid)[2:258, 2:258], np.asarray(a.images[0]))

    # bitwise: same seed and settings, same image
    c = sample(str(exports["single"]), PROMPTS[:1], batch=2, out=str(tmp_path / "c"), **kw)
    assert c.files[:2] == [str(tmp_path / "c" / n) for n in names]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_low_vram_matches_the_normal_path(exports):
    """Same images; at 352 px wide the tiny VAE (256 px tiles) decodes in two blended tiles."""
    settings = SampleSettings(sampler="dpm", steps=2, size="352x176", batch=1)
    normal = generate(load_model(str(exports["single"])), PROMPTS, settings)
    model = load_model(str(exports["single"]))
    low = generate(model, PROMPTS, SampleSettings(**{**vars(settings), "low_vram": True}))
    assert low.size == normal.size == (352, 176)
    assert low.peak_memory_bytes is None  # on CPU; CUDA runs report torch's peak
    for x, y in zip(normal.images, low.images, strict=True):
        diff = np.abs(_arr(x) - _arr(y))
        assert diff.mean() < 3.0, diff.mean()  # of 255: tiles normalise their own activations
    # T5 was freed
    assert model.pipe.text_encoder is None
    with pytest.raises(UserError, match="text encoder was freed"):
        generate(model, PROMPTS[:1], SampleSettings(steps=2, low_vram=True))


def test_iddpm_samples_with_the_learned_variance(exports, monkeypatch):
    """IDDPM runs diffusers' DDPMScheduler on the DiT's *whole* output ("learned_range"): with the
    DiT's last layer set to predict eps = 0 and a variance half of v, the latents the pipeline
    decodes equal a reference chain of that scheduler stepped on [0, v] — and v = -1 (the
    posterior variance) is what the noise-only fixed_small chain gives, while v = +1 is not."""
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    import training.sample as sample_mod

    model = load_model(str(exports["single"]))
    transformer, vae = model.pipe.transformer, model.pipe.vae
    assert sample_mod.learned_sigma(transformer)
    proj = transformer.proj_out  # the last layer; unpatchify puts feature k in channel k % 8
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
    decoded: list[torch.Tensor] = []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, **kw: decoded.append(z.clone()) or decode(z, **kw))
    steps, seed = 4, 3

    def run(v: float) -> torch.Tensor:
        with torch.no_grad():
            proj.bias[torch.arange(proj.out_features) % 8 >= 4] = v
        gen = generate(model, PROMPTS[:1], SampleSettings(sampler="iddpm", steps=steps, seed=seed))
        assert gen.scheduler["class"] == "DDPMScheduler" and gen.scheduler["learned_variance"]
        assert gen.scheduler["variance_type"] == "learned_range"
        assert not transformer._forward_hooks  # the hook is gone after the run
        assert type(model.pipe.scheduler) is DDPMScheduler  # and the pipeline's own scheduler back
        return decoded[-1] * vae.config.scaling_factor

    def reference(variance_type: str, v: float | None) -> torch.Tensor:
        sched = sample_mod.make_scheduler("iddpm", model.scheduler_config)
        sched = DDPMScheduler.from_config(sched.config, variance_type=variance_type)
        sched.set_timesteps(steps)
        g = [torch.Generator("cpu").manual_seed(seed)]
        x = randn_tensor((1, 4, 32, 32), generator=g)
        for t in sched.timesteps:
            out = torch.zeros_like(x) if v is None else torch.cat([0 * x, torch.full_like(x, v)], 1)
            x = sched.step(out, t, x, generator=g).prev_sample
        return x

    low, high = run(-1.0), run(1.0)
    torch.testing.assert_close(low, reference("learned_range", -1.0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(high, reference("learned_range", 1.0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(low, reference("fixed_small", None), rtol=1e-4, atol=1e-3)
    # beta_t vs the posterior variance: the noise added at the last noisy step differs by ~0.7 std
    assert (high - low).abs().mean() > 0.3


def test_learned_variance_takes_the_text_branch_under_guidance():
    """The pipeline batches [uncond, text]; the variance used is the text branch's (PixArt)."""
    from diffusers import DDPMScheduler

    import training.sample as sample_mod
    from training.diffusion import inference_scheduler

    config = sample_mod.make_scheduler("iddpm", dict(inference_scheduler().config)).config
    ours = sample_mod._learned_range_ddpm().from_config(config, variance_type="learned_range")
    ref = DDPMScheduler.from_config(config, variance_type="learned_range")
    for s in (ours, ref):
        s.set_timesteps(4)
    t = ours.timesteps[1]
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ours.variance = torch.cat([torch.full_like(x, -1.0), torch.full_like(x, 1.0)])  # [uncond, text]
    got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    text = ref.step(torch.cat([eps, torch.full_like(x, 1.0)], 1), t, x,
                    generator=torch.Generator().manual_seed(0)).prev_sample  # fmt: skip
    uncond = ref.step(torch.cat([eps, torch.full_like(x, -1.0)], 1), t, x,
                      generator=torch.Generator().manual_seed(0)).prev_sample  # fmt: skip
    torch.testing.assert_close(got, text)
    assert (got - uncond).abs().mean() > 0.01


# ---- errors -------------------------------------------------------------------------------------
def test_library_errors(exports, tmp_path):
    export = str(exports["single"])
    with pytest.raises(
        UserError, match=r"unknown sampler 'euler' \(samplers: dpm, sa, iddpm, lcm\)"
    ):
        sample(export, PROMPTS, sampler="euler")
    with pytest.raises(UserError, match=r"--size 12x: expected WxH in pixels"):
        sample(export, PROMPTS, size="12x")
    with pytest.raises(UserError, match=r"--size 0x512: width and height must be positive"):
        sample(export, PROMPTS, size="0x512")
    with pytest.raises(UserError, match=r"--steps must be 1-50 for lcm, got 60"):
        sample(export, PROMPTS, sampler="lcm", steps=60)
    with pytest.raises(UserError, match=r"--cfg must be >= 0"):
        sample(export, PROMPTS, cfg=-1.0)
    with pytest.raises(UserError, match=r"no prompts"):
        sample(export, [])
    with pytest.raises(FileNotFoundError, match=r"--checkpoint .*nowhere: no such folder"):
        sample(str(tmp_path / "nowhere"), PROMPTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"not a training checkpoint"):
        sample(str(tmp_path / "empty"), PROMPTS)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken: not a loadable PixArtAlphaPipeline folder"):
        sample(str(tmp_path / "broken"), PROMPTS)


def test_cli(exports, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\n  a red car  \n")
    out = tmp_path / "out"
    argv = ["sample", "--checkpoint", str(exports["single"]), "--prompts", str(prompts)]
    opts = ["--sampler", "lcm", "--steps", "2", "--size", "300x200", "--seed", "3", "--quiet"]
    assert main([*argv, *opts, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "lcm (LCMScheduler): 2 steps, cfg 1, 304x208 (asked 300x200), seeds 3-4" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "000_seed3.png", "001_seed4.png", GRID_FILE, RESULT_FILE
    ]  # fmt: skip
    assert json.loads((out / RESULT_FILE).read_text())["images"][1]["prompt"] == "a red car"

    bad = [
        (["--sampler", "euler"], "unknown sampler 'euler'"),
        (["--size", "12x"], "--size 12x: expected WxH"),
        (["--size", "0x512"], "width and height must be positive"),
        (["--prompts", str(tmp_path / "none.txt")], "none.txt: no such file"),
    ]
    for extra, message in bad:
        args = [*argv, *extra] if extra[0] != "--prompts" else argv[:3] + extra
        assert main([*args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("alphaset sample: error:") and message in err[0]
    assert main(["sample", "--checkpoint", str(tmp_path / "gone"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone: no such folder" in err[0]


# ---- from a training run -----------------------------------------------------------------------
def test_training_run_samples_like_its_export(trained_run, tmp_path):
    """A run folder is sampled through training.export.build_pipeline; its diffusers export (same
    EMA weights, T5 and VAE) gives the same image."""
    from training.export import export_diffusers

    kw = dict(sampler="dpm", steps=2, seed=0)
    from_run = sample(str(trained_run), PROMPTS[:1], out=str(tmp_path / "run"), **kw)
    rec = from_run.record
    assert rec["checkpoint_kind"] == "checkpoint"
    assert rec["resolved_checkpoint"] == str(trained_run / "align" / "checkpoints" / "step-4")
    assert from_run.generation.size == (256, 256)  # the run's 256 px single-scale stage

    exported = export_diffusers(str(trained_run), str(tmp_path / "export"))
    from_export = sample(exported, PROMPTS[:1], **kw)
    assert np.array_equal(_arr(from_run.images[0]), _arr(from_export.images[0]))
