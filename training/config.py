"""The training config: ``stages.toml`` parsed into dataclasses, validated at start-up.

A config has one ``[run]`` table (store, model preset, run folder, loop options), an optional
``[defaults]`` table of stage settings shared by every stage, and an ordered ``[[stage]]`` array.
Unknown keys and bad values raise ``UserError`` naming the value and what is allowed, before
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

from pipeline.cli import UserError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

RESOLUTIONS = (256, 512, 1024)
OPTIMIZERS = ("adamw", "came")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("bf16", "no")
STRATEGIES = ("ddp", "fsdp")
OBJECTIVES = ("diffusion", "lcm", "controlnet", "dreambooth")
LR_SCALES = ("none", "sqrt", "linear")  # PixArt's auto_lr rules (diffusion/utils/optimizer.py)
LR_BASE_BATCH = 256  # PixArt's base_batch_size: lr × sqrt|linear(global batch / 256)
MICRO_CONDITIONS = ("original", "bucket")
NULLS = ("t5-empty", "y_embedding")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://…, gs://…, file:/… (not C:\\)


def check_run_dir(path: str) -> None:
    """The run folder is written with local file I/O by every rank (checkpoints, metrics,
    TensorBoard), so it must be a POSIX path; an fsspec URL fails here, before anything (not
    even a stray local ``s3:/bucket`` folder) is written."""
    if _URL.match(path):
        raise UserError(
            f"[run] dir {path}: the run folder must be a shared POSIX path (a local disk, or a "
            "filesystem every worker mounts, e.g. /mnt/shared/runs), not an fsspec URL"
        )


@dataclass
class LcmSettings:
    """``[stage.lcm]``: PixArt-δ's latent consistency distillation (see training.distill)."""

    ddim_steps: int = 50  # the skipping schedule: t_n every 1000 / ddim_steps
    # PixArt-δ (default): the teacher guides with a fixed w in PixArt's form cond + w·(cond −
    # uncond), i.e. diffusers' scale w + 1 (4.5 → 5.5), and the student has no w-embedding.
    teacher_guidance: float = 4.5
    # The LCM paper's variant: w ~ U[w_min, w_max] (diffusers' form) embedded into the student.
    guidance_embedding: bool = False
    w_min: float = 3.0  # guidance scale range the student learns (guidance_embedding)
    w_max: float = 15.0
    guidance: float = 4.5  # the w folded into the saved model (guidance_embedding)
    target_ema: float = 0.95  # decay of the EMA target network (the saved EMA weights)
    huber_c: float = 0.001
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    sample_steps: int = 4  # LCM steps of the validation grids

    def validate(self, where: str) -> None:
        if (
            not isinstance(self.ddim_steps, int)
            or not 1 <= self.ddim_steps <= 1000
            or 1000 % self.ddim_steps
        ):
            raise UserError(f"{where}: ddim_steps must divide 1000, got {self.ddim_steps!r}")
        if not 1 <= self.w_min <= self.w_max:
            raise UserError(
                f"{where}: guidance range must satisfy 1 <= w_min <= w_max, got {self.w_min}, {self.w_max}"
            )
        if not self.guidance >= 1:
            raise UserError(f"{where}: guidance must be >= 1, got {self.guidance}")
        if not self.teacher_guidance >= 0:
            raise UserError(f"{where}: teacher_guidance must be >= 0, got {self.teacher_guidance}")
        if not 0 <= self.target_ema < 1:
            raise UserError(f"{where}: target_ema must be in [0, 1), got {self.target_ema}")
        for key in ("huber_c", "sigma_data", "timestep_scaling"):
            if not getattr(self, key) > 0:
                raise UserError(f"{where}: {key} must be > 0, got {getattr(self, key)}")
        _positive(where, "sample_steps", self.sample_steps)


@dataclass
class ControlNetSettings:
    """``[stage.controlnet]``: PixArt-δ's ControlNet-Transformer on HED edges (training.controlnet)."""

    edges: str = ""  # edges/<tag> of the store (alphaset edges)
    blocks: int = 13  # base blocks copied (PixArt-δ: 13)

    def validate(self, where: str) -> None:
        if not self.edges:
            raise UserError(f"{where}: edges is required (the edges/<tag> of 'alphaset edges')")
        _positive(where, "blocks", self.blocks)


@dataclass
class DreamBoothSettings:
    """``[stage.dreambooth]``: DreamBooth with optional prior preservation (training.dreambooth)."""

    instance_dir: str = ""  # folder of the subject's images
    instance_prompt: str = ""  # e.g. "a photo of sks dog"
    class_prompt: str | None = None  # e.g. "a photo of a dog" (prior preservation)
    prior_images: int = 0  # class images generated once by the base (cached in the stage folder)
    prior_weight: float = 1.0
    prior_steps: int = 20  # sampler steps per class image
    prior_batch: int = 8  # class images generated per batch

    def validate(self, where: str) -> None:
        if not self.instance_dir:
            raise UserError(f"{where}: instance_dir is required (a folder of the subject's images)")
        if not self.instance_prompt or not self.instance_prompt.strip():
            raise UserError(f"{where}: instance_prompt is required, e.g. 'a photo of sks dog'")
        if not isinstance(self.prior_images, int) or self.prior_images < 0:
            raise UserError(f"{where}: prior_images must be >= 0, got {self.prior_images!r}")
        if (self.prior_images > 0) != bool(self.class_prompt and self.class_prompt.strip()):
            raise UserError(f"{where}: class_prompt and prior_images (>= 1) go together")
        if self.prior_weight < 0:
            raise UserError(f"{where}: prior_weight must be >= 0, got {self.prior_weight}")
        _positive(where, "prior_steps", self.prior_steps)
        _positive(where, "prior_batch", self.prior_batch)


# objective → its settings table (None: no table)
OBJECTIVE_SETTINGS: dict[str, type | None] = {
    "diffusion": None,
    "lcm": LcmSettings,
    "controlnet": ControlNetSettings,
    "dreambooth": DreamBoothSettings,
}


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
    # none: lr as given; sqrt / linear: lr × sqrt(global batch / 256) or × global batch / 256,
    # PixArt's auto_lr (its released configs use sqrt); the effective lr is logged and recorded.
    lr_scale: str = "none"
    # The positional-embedding scale: a number, "alpha" (PixArt-α's table: 1.0 at 256/512, 2.0 at
    # 1024) or "sigma" (0.5 / 1.0 / 2.0); unset: an init_from checkpoint's own, else "alpha".
    pe_interpolation: Any = None
    # Multi-scale micro-conditions: "original" (PixArt: the source image's height/width and the
    # bucket's ratio key) or "bucket" (the bucket's pixel size and h/w).
    micro_conditions: str = "original"
    # The unconditional caption of caption dropout and validation CFG: "t5-empty" (T5(""), the
    # features' _null.npz, as diffusers samples) or "y_embedding" (PixArt's learned null, from an
    # imported PixArt checkpoint of this run).
    null: str = "t5-empty"
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
    objective: str = "diffusion"  # diffusion | lcm | controlnet | dreambooth
    lcm: dict[str, Any] | None = None  # [stage.lcm] (LcmSettings)
    controlnet: dict[str, Any] | None = None  # [stage.controlnet] (ControlNetSettings)
    dreambooth: dict[str, Any] | None = None  # [stage.dreambooth] (DreamBoothSettings)

    @property
    def settings(self) -> Any:
        """The objective's settings dataclass (None for plain diffusion)."""
        cls = OBJECTIVE_SETTINGS[self.objective]
        return None if cls is None else cls(**(getattr(self, self.objective) or {}))

    def validate(self) -> None:
        where = f"stage {self.name!r}"
        if self.lora is not None:
            from training.lora import LoraOptions, options_dict

            self.lora = options_dict(LoraOptions.from_dict(self.lora, f"{where}: lora"))
        self._validate_objective(where)
        if not _NAME.match(self.name):
            raise UserError(
                f"{where}: name must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {self.name!r}"
            )
        if self.resolution not in RESOLUTIONS:
            raise UserError(
                f"{where}: resolution must be one of {RESOLUTIONS}, got {self.resolution!r}"
            )
        _positive(where, "steps", self.steps)
        _positive(where, "batch_size", self.batch_size)
        _positive(where, "shuffle_buffer", self.shuffle_buffer)
        _positive(where, "save_every", self.save_every)
        _positive(where, "sample_steps", self.sample_steps)
        if self.sample_every < 0:
            raise UserError(
                f"{where}: sample_every must be >= 0 (0 = never), got {self.sample_every}"
            )
        if self.warmup < 0:
            raise UserError(f"{where}: warmup must be >= 0 steps, got {self.warmup}")
        if not (isinstance(self.lr, float | int) and 0 < self.lr < 1):
            raise UserError(f"{where}: lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise UserError(f"{where}: weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 < self.adam_eps < 1:
            raise UserError(f"{where}: adam_eps must be in (0, 1), got {self.adam_eps!r}")
        if not self.grad_clip > 0:
            raise UserError(
                f"{where}: grad_clip must be > 0 (PixArt uses 0.01), got {self.grad_clip!r}"
            )
        if not 0 <= self.ema < 1:
            raise UserError(
                f"{where}: ema must be in [0, 1) (PixArt uses 0.9999), got {self.ema!r}"
            )
        if not 0 <= self.caption_dropout < 1:
            raise UserError(
                f"{where}: caption_dropout must be in [0, 1), got {self.caption_dropout!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"{where}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(
                f"{where}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if not self.init_from:
            raise UserError(
                f"{where}: init_from must be 'previous', 'scratch' or a checkpoint folder"
            )
        if self.sample_every and not self.validation_prompts:
            raise UserError(f"{where}: sample_every = {self.sample_every} needs validation_prompts")
        if not all(isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise UserError(f"{where}: validation_prompts must be non-empty strings")
        if self.guidance_scale < 1:
            raise UserError(f"{where}: guidance_scale must be >= 1, got {self.guidance_scale!r}")
        for key, allowed in (
            ("lr_scale", LR_SCALES),
            ("micro_conditions", MICRO_CONDITIONS),
            ("null", NULLS),
        ):
            if getattr(self, key) not in allowed:
                raise UserError(
                    f"{where}: {key} must be one of {allowed}, got {getattr(self, key)!r}"
                )
        if self.pe_interpolation is not None:
            from training.model import pe_interpolation

            try:
                pe_interpolation(self.resolution, self.pe_interpolation)
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None

    def _validate_objective(self, where: str) -> None:
        """The objective's name, its table (keys, types, values, defaults filled in) and what
        it needs of the rest of the stage."""
        if self.objective not in OBJECTIVES:
            raise UserError(
                f"{where}: objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        for name, cls in OBJECTIVE_SETTINGS.items():
            table = getattr(self, name, None) if cls is not None else None
            if table is not None and name != self.objective:
                raise UserError(
                    f"{where}: [stage.{name}] is set but objective = {self.objective!r}; "
                    f"add objective = {name!r} or remove the table"
                )
        cls = OBJECTIVE_SETTINGS[self.objective]
        if cls is None:
            return
        table = getattr(self, self.objective)
        if table is None:
            table = {}
        if not isinstance(table, dict):
            raise UserError(f"{where}: [stage.{self.objective}] must be a table")
        _check_types(f"{where}: [stage.{self.objective}]", cls, table)
        settings = cls(**table)
        settings.validate(f"{where}: [stage.{self.objective}]")
        setattr(self, self.objective, asdict(settings))
        if self.init_from == "scratch":
            raise UserError(
                f"{where}: objective {self.objective!r} fine-tunes a trained model; init_from must "
                "be 'previous' or a checkpoint folder, not 'scratch'"
            )
        if self.objective == "controlnet" and self.lora is not None:
            raise UserError(
                f"{where}: objective 'controlnet' trains its own block copies; lora does not apply"
            )


@dataclass
class RunConfig:
    """What is shared by every stage of a run: store, model, run folder and loop options."""

    name: str
    store: str
    model: str = "pixart-xl-2"  # training.model.PRESETS
    dir: str = "runs"  # run folder = <dir>/<name>
    seed: int = 0
    learned_sigma: bool = True  # 8 output channels + PixArt's VLB loss term
    mixed_precision: str = "bf16"  # bf16 autocast on the training device (CUDA or CPU); "no": fp32
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
        raise UserError(f"no stage {name!r} (stages: {', '.join(s.name for s in self.stages)})")

    def validate(self) -> None:
        from training.model import PRESETS

        if not _NAME.match(self.name):
            raise UserError(f"[run] name must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {self.name!r}")
        if not self.store:
            raise UserError("[run] store is required (the store folder or URL)")
        if self.model not in PRESETS:
            raise UserError(f"[run] model must be one of {', '.join(PRESETS)}, got {self.model!r}")
        if self.mixed_precision not in PRECISIONS:
            raise UserError(
                f"[run] mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}"
            )
        if self.strategy not in STRATEGIES:
            raise UserError(f"[run] strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**32
        ):
            raise UserError(f"[run] seed must be an integer in [0, 2**32), got {self.seed!r}")
        check_run_dir(self.dir)
        if self.num_workers < 0:
            raise UserError(f"[run] num_workers must be >= 0, got {self.num_workers}")
        _positive("[run]", "log_every", self.log_every)
        if not self.stages:
            raise UserError("the config has no [[stage]]; add at least one")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"stage names must be unique, {dup[0]!r} is repeated")
        for s in self.stages:
            s.validate()
        for prev, s in zip(self.stages[:-1], self.stages[1:], strict=True):
            if s.init_from == "previous" and prev.multi_scale and not s.multi_scale:
                raise UserError(
                    f"stage {s.name!r} starts from multi-scale stage {prev.name!r}, so it must be "
                    "multi_scale = true too (its micro-condition weights cannot be dropped)"
                )
        if self.stages[0].init_from == "previous":
            raise UserError(
                f"stage {self.stages[0].name!r} is the first stage: init_from must be 'scratch' "
                "or a checkpoint folder, not 'previous'"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The resolved config as a ``stages.toml`` that ``load_config`` reads back to an equal
        config (what the fine-tuning commands write into their run folder)."""
        d = self.to_dict()
        stages = d.pop("stages")
        lines = ["[run]", *_toml_pairs(d)]
        for stage in stages:
            tables = {k: v for k, v in stage.items() if isinstance(v, dict)}
            lines += ["", "[[stage]]", *_toml_pairs(stage)]
            for name, table in tables.items():
                lines += ["", f"[stage.{name}]", *_toml_pairs(table)]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a TOML basic string
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else json.dumps(str(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def _toml_pairs(d: dict[str, Any]) -> list[str]:
    """``key = value`` lines of the scalar and list entries (None: left out, the default)."""
    return [
        f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)
    ]


def _positive(where: str, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def _check_types(where: str, cls: type, values: dict[str, Any]) -> None:
    """Unknown keys and values of the wrong TOML type fail with the allowed keys / type."""
    known = _fields(cls)
    for key, value in values.items():
        if key not in known or key == "stages":
            allowed = ", ".join(k for k in known if k != "stages")
            raise UserError(f"{where}: unknown key {key!r} (allowed: {allowed})")
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
        elif ann.startswith("dict"):
            ok = isinstance(value, dict)
        if not ok:
            raise UserError(f"{where}: {key} must be {ann}, got {value!r}")


def config_from_dict(data: dict[str, Any], base_dir: str = ".") -> RunConfig:
    """Build and validate a RunConfig from a parsed TOML dict (``base_dir``: relative paths' root)."""
    data = copy.deepcopy(data)
    extra = sorted(set(data) - {"run", "defaults", "stage"})
    if extra:
        raise UserError(f"unknown table [{extra[0]}] (allowed: [run], [defaults], [[stage]])")
    run = data.get("run")
    if not isinstance(run, dict):
        raise UserError("the config needs a [run] table (name, store, model, …)")
    _check_types("[run]", RunConfig, run)
    for key in ("name", "store"):
        if key not in run:
            raise UserError(f"[run] {key} is required")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError("[defaults] must be a table of stage settings")
    _check_types("[defaults]", StageConfig, defaults)
    stage_list = data.get("stage", [])
    if not isinstance(stage_list, list):
        raise UserError("stages are an array of tables: write [[stage]], not [stage]")
    stages = []
    for i, raw in enumerate(stage_list):
        merged = {**defaults, **raw}
        where = f"[[stage]] #{i + 1}" + (f" ({raw['name']!r})" if "name" in raw else "")
        _check_types(where, StageConfig, raw)
        if merged.get("objective") == "dreambooth":
            merged.setdefault("features", "")  # DreamBooth trains on its instance images
        for key in ("name", "features", "resolution", "steps"):
            if key not in merged:
                raise UserError(f"{where}: {key} is required (in the stage or in [defaults])")
        merged["lr"] = float(merged.get("lr", StageConfig.lr))
        stages.append(StageConfig(**merged))
    cfg = RunConfig(**run, stages=stages)
    check_run_dir(cfg.dir)
    cfg.store = _absolute(cfg.store, base_dir)
    cfg.dir = _absolute(cfg.dir, base_dir)
    for s in cfg.stages:
        if s.init_from not in ("previous", "scratch"):
            s.init_from = _absolute(s.init_from, base_dir)
        if isinstance(s.dreambooth, dict) and s.dreambooth.get("instance_dir"):
            s.dreambooth["instance_dir"] = _absolute(s.dreambooth["instance_dir"], base_dir)
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
            raise UserError(f"{path} is not valid TOML: {e}") from e
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
