"""The training config: ``stages.toml`` parsed into dataclasses, validated at start-up.

A config has one ``[run]`` table (store, model preset, run folder, loop options), an optional
``[defaults]`` table of stage settings shared by every stage, and an ordered ``[[stage]]`` array.
Unknown keys and bad values raise ``ValueError`` naming the value and what is allowed, before
anything is read or built. The resolved config (every default filled in, paths absolute) is what
the run folder and every checkpoint record, so a run can be rebuilt from its checkpoint alone::

    [run]
    name = "tiny"                 # run folder = <dir>/<name>
    store = "demo-out/store"
    model = "tiny"                # training.model.PRESETS

    [defaults]
    features = "tiny-256"         # features/<tag> of the store
    batch_size = 4

    [[stage]]
    name = "pixel"                # runs/<run>/pixel/
    view = "imagenet"             # views/<name>.parquet (omit: every featurized sample)
    resolution = 256
    steps = 20
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

RESOLUTIONS = (256, 512, 1024)
OPTIMIZERS = ("adamw", "came")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("bf16", "no")
STRATEGIES = ("ddp", "fsdp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class StageConfig:
    """One training stage: its data, length, optimisation and checkpointing."""

    name: str
    features: str  # features/<tag> in the store
    resolution: int  # must equal the features' resolution
    steps: int
    view: str | None = None  # views/<name>; None: every sample of the features
    multi_scale: bool = False  # aspect-ratio buckets + resolution/aspect micro-conditions
    batch_size: int = 4  # per worker (global batch = batch_size × workers)
    lr: float = 2e-5
    warmup: int = 1000
    lr_schedule: str = "constant"
    weight_decay: float = 0.03
    adam_eps: float = 1e-10
    optimizer: str = "adamw"
    grad_clip: float = 0.01
    ema: float = 0.9999
    init_from: str = "previous"  # previous | scratch | a checkpoint or diffusers folder
    caption_dropout: float = 0.1
    shuffle_buffer: int = 1000
    save_every: int = 1000
    sample_every: int = 0  # 0: no validation images
    validation_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 14
    guidance_scale: float = 4.5
    lora: dict[str, Any] | None = None  # { rank, alpha, targets }: train LoRA adapters only

    def validate(self) -> None:
        where = f"stage {self.name!r}"
        if self.lora is not None:
            from training.lora import LoraOptions, options_dict

            self.lora = options_dict(LoraOptions.from_dict(self.lora, f"{where}: lora"))
        if not _NAME.match(self.name):
            raise ValueError(
                f"{where}: name must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {self.name!r}"
            )
        if self.resolution not in RESOLUTIONS:
            raise ValueError(
                f"{where}: resolution must be one of {RESOLUTIONS}, got {self.resolution!r}"
            )
        _positive(where, "steps", self.steps)
        _positive(where, "batch_size", self.batch_size)
        _positive(where, "shuffle_buffer", self.shuffle_buffer)
        _positive(where, "save_every", self.save_every)
        _positive(where, "sample_steps", self.sample_steps)
        if self.sample_every < 0:
            raise ValueError(
                f"{where}: sample_every must be >= 0 (0 = never), got {self.sample_every}"
            )
        if self.warmup < 0:
            raise ValueError(f"{where}: warmup must be >= 0 steps, got {self.warmup}")
        if not (isinstance(self.lr, float | int) and 0 < self.lr < 1):
            raise ValueError(f"{where}: lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"{where}: weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 < self.adam_eps < 1:
            raise ValueError(f"{where}: adam_eps must be in (0, 1), got {self.adam_eps!r}")
        if not self.grad_clip > 0:
            raise ValueError(
                f"{where}: grad_clip must be > 0 (PixArt uses 0.01), got {self.grad_clip!r}"
            )
        if not 0 <= self.ema < 1:
            raise ValueError(
                f"{where}: ema must be in [0, 1) (PixArt uses 0.9999), got {self.ema!r}"
            )
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(
                f"{where}: caption_dropout must be in [0, 1), got {self.caption_dropout!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{where}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"{where}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if not self.init_from:
            raise ValueError(
                f"{where}: init_from must be 'previous', 'scratch' or a checkpoint folder"
            )
        if self.sample_every and not self.validation_prompts:
            raise ValueError(
                f"{where}: sample_every = {self.sample_every} needs validation_prompts"
            )
        if not all(isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise ValueError(f"{where}: validation_prompts must be non-empty strings")
        if self.guidance_scale < 1:
            raise ValueError(f"{where}: guidance_scale must be >= 1, got {self.guidance_scale!r}")


@dataclass
class RunConfig:
    """What is shared by every stage of a run: store, model, run folder and loop options."""

    name: str
    store: str
    model: str = "pixart-xl-2"  # training.model.PRESETS
    dir: str = "runs"  # run folder = <dir>/<name>
    seed: int = 0
    learned_sigma: bool = True  # 8 output channels + PixArt's VLB loss term
    mixed_precision: str = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the transformer
    strategy: str = "ddp"  # ddp | fsdp when run with several workers
    num_workers: int = 2  # data-loader processes per rank
    log_every: int = 10
    record_keys: bool = False  # write the sample keys of every batch, per rank
    stages: list[StageConfig] = field(default_factory=list)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.dir, self.name)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"no stage {name!r} (stages: {', '.join(s.name for s in self.stages)})")

    def validate(self) -> None:
        from training.model import PRESETS

        if not _NAME.match(self.name):
            raise ValueError(f"[run] name must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {self.name!r}")
        if not self.store:
            raise ValueError("[run] store is required (the store folder or URL)")
        if self.model not in PRESETS:
            raise ValueError(f"[run] model must be one of {', '.join(PRESETS)}, got {self.model!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"[run] mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"[run] strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_workers < 0:
            raise ValueError(f"[run] num_workers must be >= 0, got {self.num_workers}")
        _positive("[run]", "log_every", self.log_every)
        if not self.stages:
            raise ValueError("the config has no [[stage]]; add at least one")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique, {dup[0]!r} is repeated")
        for s in self.stages:
            s.validate()
        for prev, s in zip(self.stages[:-1], self.stages[1:], strict=True):
            if s.init_from == "previous" and prev.multi_scale and not s.multi_scale:
                raise ValueError(
                    f"stage {s.name!r} starts from multi-scale stage {prev.name!r}, so it must be "
                    "multi_scale = true too (its micro-condition weights cannot be dropped)"
                )
        if self.stages[0].init_from == "previous":
            raise ValueError(
                f"stage {self.stages[0].name!r} is the first stage: init_from must be 'scratch' "
                "or a checkpoint folder, not 'previous'"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def _positive(where: str, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def _check_types(where: str, cls: type, values: dict[str, Any]) -> None:
    """Unknown keys and values of the wrong TOML type fail with the allowed keys / type."""
    known = _fields(cls)
    for key, value in values.items():
        if key not in known or key == "stages":
            allowed = ", ".join(k for k in known if k != "stages")
            raise ValueError(f"{where}: unknown key {key!r} (allowed: {allowed})")
        default = known[key].default
        if default is dataclasses.MISSING and known[key].default_factory is not dataclasses.MISSING:
            default = known[key].default_factory()  # type: ignore[misc]
        ann = str(known[key].type)
        ok = True
        if ann.startswith("bool"):
            ok = isinstance(value, bool)
        elif ann.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif ann.startswith("float"):
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        elif ann.startswith("str"):
            ok = isinstance(value, str) or (value is None and "None" in ann)
        elif ann.startswith("list"):
            ok = isinstance(value, list)
        if not ok:
            raise ValueError(f"{where}: {key} must be {ann}, got {value!r}")


def config_from_dict(data: dict[str, Any], base_dir: str = ".") -> RunConfig:
    """Build and validate a RunConfig from a parsed TOML dict (``base_dir``: relative paths' root)."""
    data = copy.deepcopy(data)
    extra = sorted(set(data) - {"run", "defaults", "stage"})
    if extra:
        raise ValueError(f"unknown table [{extra[0]}] (allowed: [run], [defaults], [[stage]])")
    run = data.get("run")
    if not isinstance(run, dict):
        raise ValueError("the config needs a [run] table (name, store, model, …)")
    _check_types("[run]", RunConfig, run)
    for key in ("name", "store"):
        if key not in run:
            raise ValueError(f"[run] {key} is required")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ValueError("[defaults] must be a table of stage settings")
    _check_types("[defaults]", StageConfig, defaults)
    stage_list = data.get("stage", [])
    if not isinstance(stage_list, list):
        raise ValueError("stages are an array of tables: write [[stage]], not [stage]")
    stages = []
    for i, raw in enumerate(stage_list):
        merged = {**defaults, **raw}
        where = f"[[stage]] #{i + 1}" + (f" ({raw['name']!r})" if "name" in raw else "")
        _check_types(where, StageConfig, raw)
        for key in ("name", "features", "resolution", "steps"):
            if key not in merged:
                raise ValueError(f"{where}: {key} is required (in the stage or in [defaults])")
        merged["lr"] = float(merged.get("lr", StageConfig.lr))
        stages.append(StageConfig(**merged))
    cfg = RunConfig(**run, stages=stages)
    cfg.store = _absolute(cfg.store, base_dir)
    cfg.dir = _absolute(cfg.dir, base_dir)
    for s in cfg.stages:
        if s.init_from not in ("previous", "scratch"):
            s.init_from = _absolute(s.init_from, base_dir)
    cfg.validate()
    return cfg


def _absolute(path: str, base_dir: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(os.path.join(base_dir, path))


def load_config(path: str, **overrides: Any) -> RunConfig:
    """Read ``stages.toml``; relative paths in it are relative to the current directory.

    ``overrides`` replace ``[run]`` keys (e.g. ``store=…``, ``dir=…`` from the command line).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
    data.setdefault("run", {})
    if isinstance(data["run"], dict):
        data["run"].update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data)


def config_from_json(text: str | dict[str, Any]) -> RunConfig:
    """Rebuild a resolved config (as saved in a run folder or checkpoint)."""
    d = json.loads(text) if isinstance(text, str) else copy.deepcopy(text)
    stages = [StageConfig(**s) for s in d.pop("stages")]
    return RunConfig(**d, stages=stages)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two flat dicts."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_finetune_settings(steps: int, batch_size: int, lr: float, lora: int | None) -> None:
    """The checks every fine-tuning command (controlnet, distill, dreambooth) makes on its loop
    settings."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 < lr < 1:
        raise ValueError(f"--lr must be in (0, 1), got {lr}")
    if lora is not None and lora < 1:
        raise ValueError(f"--lora rank must be >= 1, got {lora}")
