"""The training loop end to end on tiny-model features: stages in order, run folder contents,
exact resume, one-line start-up errors, init_from and the `alphaset train` command."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import UserError, main
from pipeline.store import StoreError
from training.checkpoint import read_state
from training.config import load_config
from training.train import train

pytest_plugins = ["conftest_train"]


def _metrics(stage_dir):
    """step → logged record (the last line wins, as after a resume)."""
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def test_stages_write_the_run_folder(trained_run):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert [s["name"] for s in cfg["stages"]] == ["pixel", "align"]
    sources = json.loads((trained_run / "run.json").read_text())
    assert sources["stages"]["align"]["view"] == "cats_and_rockets"
    assert sources["stages"]["pixel"]["features"] == "tiny256"
    assert sources["stages"]["pixel"]["features_settings"]["t5"] == "tiny"
    for stage in ("pixel", "align"):
        sdir = trained_run / stage
        done = json.loads((sdir / "done.json").read_text())
        ckpt = sdir / "checkpoints" / "step-4"
        assert done["final"] == str(ckpt) and done["steps"] == 4
        assert {p.name for p in ckpt.iterdir()} == {
            "model.safetensors",
            "ema.safetensors",
            "optimizer.pt",
            "state.json",
        }
        assert (sdir / "checkpoints" / "step-2").is_dir()  # save_every = 2
        state = read_state(str(ckpt))
        assert state["step"] == 4 and state["stage"] == stage
        assert (
            state["config"]["stages"][0]["name"] == "pixel"
        )  # the resolved config in every checkpoint
        assert state["transformer_config"]["caption_channels"] == 64
        assert state["data"][0]["workers"]["0"][1] >= 1 and len(state["rng"]) == 1
        torch.load(ckpt / "optimizer.pt", weights_only=True)  # loadable without pickle code
        model, ema = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")
        assert model.keys() == ema.keys()
        assert any(not torch.equal(model[k], ema[k]) for k in model)  # EMA lags the weights
        metrics = _metrics(sdir)
        assert sorted(metrics) == [1, 2, 3, 4]
        for rec in metrics.values():
            assert set(rec) == {"step", "loss", "grad_norm", "lr", "img_per_s", "data_wait"}
            assert rec["loss"] > 0 and 0 <= rec["data_wait"] <= 1
        assert metrics[1]["lr"] == pytest.approx(5e-4) and metrics[2]["lr"] == pytest.approx(
            1e-3
        )  # warm-up 2
        assert list((sdir / "tb").glob("events.out.tfevents.*"))
    # validation grid: 2 prompts at 256 px side by side, also in TensorBoard
    from PIL import Image

    assert Image.open(trained_run / "pixel" / "samples" / "step-4.png").size == (512, 256)
    # stage 2 started from stage 1's final weights, not from scratch
    align2 = load_file(trained_run / "align" / "checkpoints" / "step-2" / "model.safetensors")
    pixel4 = load_file(trained_run / "pixel" / "checkpoints" / "step-4" / "model.safetensors")
    assert (align2["proj_out.weight"] - pixel4["proj_out.weight"]).abs().max() < 0.05
    assert pixel4["proj_out.weight"].abs().max() > 0  # moved away from its zero init


def test_resume_continues_exactly(kit, train_store, tmp_path):
    """Stop after 3 of 6 steps, resume: steps 4-6 log the same losses as an uninterrupted run."""
    stage = kit.tiny_stage("s", steps=6, save_every=4)
    whole = kit.write_config(
        tmp_path / "a.toml", kit.tiny_run(train_store, tmp_path / "a", num_workers=1), [stage]
    )
    train(load_config(str(whole)), progress=False)
    parts = kit.write_config(
        tmp_path / "b.toml", kit.tiny_run(train_store, tmp_path / "b", num_workers=1), [stage]
    )
    finals = train(load_config(str(parts)), stop_after=3, progress=False)
    assert finals == {}
    assert (tmp_path / "b" / "t" / "s" / "checkpoints" / "step-3").is_dir()
    with pytest.raises(UserError, match=r"already has stage\(s\) s; pass --resume"):
        train(load_config(str(parts)), progress=False)
    train(load_config(str(parts)), resume=True, progress=False)
    a, b = _metrics(tmp_path / "a" / "t" / "s"), _metrics(tmp_path / "b" / "t" / "s")
    assert [a[i]["loss"] for i in range(1, 7)] == [b[i]["loss"] for i in range(1, 7)]
    assert [a[i]["grad_norm"] for i in range(4, 7)] == [b[i]["grad_norm"] for i in range(4, 7)]
    wa = load_file(tmp_path / "a" / "t" / "s" / "checkpoints" / "step-6" / "ema.safetensors")
    wb = load_file(tmp_path / "b" / "t" / "s" / "checkpoints" / "step-6" / "ema.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A finished run resumes as a no-op; a changed stage is refused.
    assert train(load_config(str(parts)), resume=True, progress=False)["s"].endswith("step-6")


def test_resume_refuses_changed_settings(kit, train_store, tmp_path):
    path = kit.write_config(
        tmp_path / "a.toml", kit.tiny_run(train_store, tmp_path), [kit.tiny_stage("s", steps=4)]
    )
    train(load_config(str(path)), stop_after=2, progress=False)
    changed = kit.write_config(
        tmp_path / "a.toml",
        kit.tiny_run(train_store, tmp_path),
        [kit.tiny_stage("s", steps=4, lr=0.5)],
    )
    with pytest.raises(UserError, match=r"stage 's' was started with other settings \(lr differ\)"):
        train(load_config(str(changed)), resume=True, progress=False)


def test_multi_scale_stage_from_a_single_scale_checkpoint(kit, train_store, trained_run, tmp_path):
    init = trained_run / "align" / "checkpoints" / "step-4"
    stage = kit.tiny_stage(
        "ms", features="tiny256ms", multi_scale=True, init_from=str(init), steps=2
    )
    path = kit.write_config(
        tmp_path / "s.toml", kit.tiny_run(train_store, tmp_path, record_keys=True), [stage]
    )
    finals = train(load_config(str(path)), progress=False)
    weights = load_file(f"{finals['ms']}/model.safetensors")
    assert (
        "adaln_single.emb.resolution_embedder.linear_1.weight" in weights
    )  # micro-conditions added
    state = read_state(finals["ms"])
    assert state["transformer_config"]["use_additional_conditions"] is True
    keys = [
        json.loads(line)["keys"]
        for line in (tmp_path / "t" / "ms" / "keys" / "rank-0.jsonl").read_text().splitlines()
    ]
    assert len(keys) == 2 and all(len(k) == 2 for k in keys)


@pytest.mark.parametrize(
    "stage, match",
    [
        ({"features": "nope"}, r"stage 's': no features/nope"),
        (
            {"resolution": 512},
            r"stage 's': trains at 512 px but features/tiny256 was extracted at 256 px",
        ),
        ({"view": "missing"}, r"stage 's': no view 'missing'"),
        ({"init_from": "/no/such/ckpt"}, r"init_from /no/such/ckpt: no such folder"),
    ],
)
def test_start_up_errors_before_any_model(kit, train_store, tmp_path, stage, match, monkeypatch):
    import training.train as tt

    def no_model(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(tt, "build_transformer", no_model)
    path = kit.write_config(
        tmp_path / "s.toml", kit.tiny_run(train_store, tmp_path), [kit.tiny_stage("s", **stage)]
    )
    with pytest.raises((UserError, FileNotFoundError, StoreError), match=match):
        train(load_config(str(path)), progress=False)
    assert not (tmp_path / "t").exists()


def test_cli_train_and_one_line_errors(kit, train_store, tmp_path, capsys):
    path = kit.write_config(
        tmp_path / "s.toml", kit.tiny_run("elsewhere", tmp_path), [kit.tiny_stage("s", steps=2)]
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(path),
                "--store",
                train_store,
                "--runs",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )
    assert f"s: {tmp_path / 'r' / 't' / 's' / 'checkpoints' / 'step-2'}" in capsys.readouterr().out
    assert (
        main(["train", "--config", str(path), "--quiet"]) == 2
    )  # the config's store does not exist
    err = capsys.readouterr().err.strip()
    assert err.startswith("alphaset train: error: no store at") and "\n" not in err


def test_metrics_have_one_line_per_step_after_a_kill_and_resume(kit, train_store, tmp_path):
    """A run killed after logging step 3 but before its step-3 checkpoint: the resumed run
    continues from step 2 and metrics.jsonl ends with exactly one line per step."""
    import shutil

    stage = kit.tiny_stage("s", steps=4, save_every=2)
    path = kit.write_config(tmp_path / "a.toml", kit.tiny_run(train_store, tmp_path), [stage])
    train(load_config(str(path)), stop_after=3, progress=False)
    sdir = tmp_path / "t" / "s"
    shutil.rmtree(sdir / "checkpoints" / "step-3")  # the kill: step 3 logged, never saved
    assert [json.loads(x)["step"] for x in (sdir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    train(load_config(str(path)), resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (sdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_runs_folder_must_be_a_posix_path(kit, train_store, tmp_path, monkeypatch, capsys):
    """An fsspec URL as the runs folder is one line, before anything (not even a local
    ``s3:/bucket`` folder) is written."""
    monkeypatch.chdir(tmp_path)
    path = kit.write_config(
        tmp_path / "s.toml", kit.tiny_run(train_store, "runs"), [kit.tiny_stage("s")]
    )
    for url in ("s3://bucket/runs", "gs://b/r", "file:///tmp/r"):
        with pytest.raises(UserError, match=r"must be a shared POSIX path"):
            load_config(str(path), dir=url)
        assert main(["train", "--config", str(path), "--runs", url, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "POSIX" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
