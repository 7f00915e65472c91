"""stages.toml parsing and validation, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import UserError
from training.config import config_from_json, load_config

pytest_plugins = ["conftest_train"]
REPO = Path(__file__).resolve().parents[2]


def test_defaults_merge_and_paths_resolve(kit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = kit.write_config(
        tmp_path / "s.toml",
        {"name": "r", "store": "store", "model": "tiny"},
        [{"name": "one", "init_from": "scratch"}, {"name": "two", "steps": 7, "view": "v"}],
        defaults={"features": "f", "resolution": 512, "steps": 3, "batch_size": 8},
    )
    cfg = load_config(str(path))
    assert cfg.store == str(tmp_path / "store")
    assert cfg.run_dir == str(tmp_path / "runs" / "r")
    assert [s.steps for s in cfg.stages] == [3, 7]
    assert all(s.batch_size == 8 and s.resolution == 512 and s.features == "f" for s in cfg.stages)
    assert cfg.stages[1].init_from == "previous" and cfg.stages[1].view == "v"
    # The resolved config round-trips through its JSON (what run folders and checkpoints record).
    assert config_from_json(cfg.to_json()) == cfg


def test_overrides_replace_run_keys(kit, tmp_path):
    path = kit.write_config(tmp_path / "s.toml", kit.tiny_run("a", tmp_path), [kit.tiny_stage("s")])
    cfg = load_config(str(path), store=str(tmp_path / "other"), dir=None)
    assert cfg.store == str(tmp_path / "other")


@pytest.mark.parametrize(
    "run, stage, match",
    [
        ({"colour": "red"}, {}, r"\[run\]: unknown key 'colour' \(allowed: name, store"),
        ({}, {"learning_rate": 1e-4}, r"unknown key 'learning_rate' \(allowed: name, features"),
        ({}, {"resolution": 300}, r"resolution must be one of \(256, 512, 1024\), got 300"),
        ({}, {"steps": 0}, r"steps must be a positive integer, got 0"),
        ({}, {"steps": "ten"}, r"steps must be int, got 'ten'"),
        ({}, {"optimizer": "sgd"}, r"optimizer must be one of \('adamw', 'came'\), got 'sgd'"),
        ({}, {"ema": 1.0}, r"ema must be in \[0, 1\)"),
        ({}, {"caption_dropout": 1.5}, r"caption_dropout must be in \[0, 1\), got 1.5"),
        ({}, {"init_from": "previous"}, r"first stage: init_from must be 'scratch'"),
        ({}, {"sample_every": 5}, r"sample_every = 5 needs validation_prompts"),
        (
            {"model": "huge"},
            {},
            r"\[run\] model must be one of pixart-xl-2, tiny, small, got 'huge'",
        ),
        (
            {"mixed_precision": "fp8"},
            {},
            r"mixed_precision must be one of \('bf16', 'no'\), got 'fp8'",
        ),
        ({"strategy": "zero3"}, {}, r"strategy must be one of \('ddp', 'fsdp'\), got 'zero3'"),
        ({"seed": -1}, {}, r"\[run\] seed must be an integer in \[0, 2\*\*32\), got -1"),
        ({}, {"objective": "gan"}, r"objective must be one of \('diffusion', 'lcm'"),
        ({}, {"objective": "lcm"}, r"objective 'lcm' fine-tunes a trained model; init_from"),
        (
            {},
            {"objective": "controlnet", "init_from": "/x"},
            r"\[stage.controlnet\]: edges is required",
        ),
    ],
)
def test_bad_values_name_value_and_allowed(kit, tmp_path, run, stage, match):
    path = kit.write_config(
        tmp_path / "s.toml", kit.tiny_run("st", tmp_path, **run), [kit.tiny_stage("s", **stage)]
    )
    with pytest.raises(UserError, match=match):
        load_config(str(path))


def test_structure_errors(kit, tmp_path):
    (tmp_path / "a.toml").write_text('[run]\nname = "r"\nstore = "s"\n\n[stage]\nname = "x"\n')
    with pytest.raises(UserError, match=r"write \[\[stage\]\], not \[stage\]"):
        load_config(str(tmp_path / "a.toml"))
    (tmp_path / "b.toml").write_text('[run]\nname = "r"\nstore = "s"\n[extras]\nx = 1\n')
    with pytest.raises(UserError, match=r"unknown table \[extras\]"):
        load_config(str(tmp_path / "b.toml"))
    (tmp_path / "c.toml").write_text('[run]\nname = "r"\nstore = "s"\n[[stage]]\nname = "x"\n')
    with pytest.raises(UserError, match=r"features is required"):
        load_config(str(tmp_path / "c.toml"))
    (tmp_path / "d.toml").write_text("[run\n")
    with pytest.raises(UserError, match=r"not valid TOML"):
        load_config(str(tmp_path / "d.toml"))
    with pytest.raises(FileNotFoundError, match=r"no config file"):
        load_config(str(tmp_path / "missing.toml"))
    stages = [
        kit.tiny_stage("ms", multi_scale=True),
        kit.tiny_stage("single", init_from="previous"),
    ]
    with pytest.raises(
        UserError, match=r"stage 'single' starts from multi-scale stage 'ms', so it must be"
    ):
        load_config(str(kit.write_config(tmp_path / "f.toml", kit.tiny_run("s", tmp_path), stages)))
    stages = [kit.tiny_stage("same"), kit.tiny_stage("same", init_from="previous")]
    with pytest.raises(UserError, match=r"stage names must be unique, 'same' is repeated"):
        load_config(str(kit.write_config(tmp_path / "e.toml", kit.tiny_run("s", tmp_path), stages)))


@pytest.mark.parametrize("name", ["pixart_alpha.toml", "tiny.toml"])
def test_shipped_configs_parse(kit, name):
    cfg = load_config(str(REPO / "configs" / name))
    assert len(cfg.stages) >= 3
    assert cfg.stages[0].init_from != "previous"
    assert all(s.init_from == "previous" for s in cfg.stages[1:])
    if name == "pixart_alpha.toml":
        assert cfg.model == "pixart-xl-2"
        assert [s.resolution for s in cfg.stages][-1] == 1024 and cfg.stages[-1].multi_scale
        assert all(s.lr == 2e-5 and s.grad_clip == 0.01 and s.ema == 0.9999 for s in cfg.stages)


def test_objective_tables_validate_like_every_key(kit, tmp_path):
    base = tmp_path / "base"
    run = kit.tiny_run("st", tmp_path)
    lines = kit.write_config(
        tmp_path / "x.toml", run, [kit.tiny_stage("s", objective="lcm", init_from=str(base))]
    ).read_text()
    (tmp_path / "a.toml").write_text(lines + "\n[stage.lcm]\nguidance = 6.0\n")
    cfg = load_config(str(tmp_path / "a.toml"))
    assert cfg.stages[0].lcm["guidance"] == 6.0 and cfg.stages[0].lcm["ddim_steps"] == 50
    assert cfg.stages[0].settings.target_ema == 0.95
    for table, match in [
        (
            "[stage.lcm]\nguidanse = 6.0\n",
            r"\[stage.lcm\]: unknown key 'guidanse' \(allowed: ddim_steps",
        ),
        ("[stage.lcm]\nddim_steps = 33\n", r"ddim_steps must divide 1000, got 33"),
        ('[stage.lcm]\nw_min = "high"\n', r"w_min must be float, got 'high'"),
        (
            '[stage.dreambooth]\ninstance_dir = "d"\n',
            r"\[stage.dreambooth\] is set but objective = 'lcm'",
        ),
    ]:
        (tmp_path / "b.toml").write_text(lines + "\n" + table)
        with pytest.raises(UserError, match=match):
            load_config(str(tmp_path / "b.toml"))
    # The resolved config written back as TOML reads back equal (what the front ends write).
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert load_config(str(tmp_path / "c.toml")).to_dict() == cfg.to_dict()
