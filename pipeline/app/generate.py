"""The Generate tab's engine: one model per process, sampled through `training.sample` — the code
path of ``alphaset sample`` (`load_model`, `SampleSettings`, `generate`, `apply_lora`,
`training.controlnet.controlled_pipeline`), so a seed and its settings give the same image as the
command line.

The model is loaded once, at start-up. A request's LoRA or ControlNet is put on for that request
only: a LoRA goes into a copy of the transformer (kept, per adapter file, for the next request
with the same file; its scale is set per request) and the ControlNet wraps the transformer; the
base transformer is put back afterwards. Requests run one at a time (a lock here; the Gradio queue
also runs them one by one), never two on the same GPU. ``--low-vram`` is `generate`'s path that
frees T5 after encoding, so the model is loaded again before the next request.
"""

from __future__ import annotations

import copy
import datetime
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from pipeline.errors import UserError
from training.buckets import TABLES
from training.sample import (
    NEGATIVE_PROMPT,
    SAMPLERS,
    Model,
    SampleSettings,
    apply_lora,
    generate,
    get_sampler,
    load_model,
    snap_size,
)

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_IMAGES = 16  # images of one request (prompts × images per prompt)


class GenerateError(UserError):
    """A request the user can fix (shown as one line in the page)."""


@dataclass
class Result:
    images: list[Image.Image]
    captions: list[str]  # one per image: prompt, sampler, steps, cfg, seed, size
    record: dict[str, Any]  # every setting, as samples.json holds it
    control: str | None  # the edge map used (a PNG path), when there was one


class Studio:
    """A loaded checkpoint plus what a request may add to it (LoRA, ControlNet, HED)."""

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        dtype: str = "auto",
        low_vram: bool = False,
        controlnet: str | None = None,
        hed: str | None = None,
    ):
        from training.feature_models import default_device, torch_dtype

        self.checkpoint = checkpoint
        self.device = device or default_device()
        self.dtype = torch_dtype(dtype, self.device)
        self.low_vram = low_vram
        self.controlnet = controlnet
        self.hed_value = hed
        self._lock = threading.Lock()
        self._hed: Any = None
        self._loras: dict[str, Any] = {}  # adapter file → transformer copy with it loaded
        self.model: Model = self._load()
        self._tmp = tempfile.mkdtemp(prefix="alphaset-app-")

    def _load(self) -> Model:
        return load_model(self.checkpoint, dtype=self.dtype)

    # ---- what the form offers ----------------------------------------------------------------
    def sizes(self) -> list[str]:
        """The model's aspect-ratio buckets as ``WxH``, square first (PixArt's tables)."""
        m = self.model
        if m.resolution not in TABLES:
            return [f"{m.resolution}x{m.resolution}"]
        buckets = {(int(w), int(h)) for h, w in TABLES[m.resolution].values()}
        square = (m.resolution, m.resolution)
        ordered = sorted(buckets, key=lambda wh: (wh != square, wh[0] / wh[1]))
        return [f"{w}x{h}" for w, h in ordered]

    def describe(self) -> str:
        m = self.model
        return (
            f"{m.kind} {m.source} · {m.resolution} px"
            f"{' multi-scale' if m.multi_scale else ''} · device {self.device}"
            f"{' · low-vram' if self.low_vram else ''}"
            f"{f' · ControlNet {self.controlnet}' if self.controlnet else ''}"
        )

    # ---- edges ---------------------------------------------------------------------------------
    def edges(self, photo: str) -> str:
        """The HED edge map of an uploaded photo, as a PNG path."""
        import numpy as np

        from training.hed import edge_map, load_hed, png_bytes

        if not self.hed_value:
            raise GenerateError(
                "no HED detector: the store has no edges/<tag> stage; start the app with --hed "
                "PRESET|PATH, or upload an edge map instead of a photo"
            )
        rgb = np.asarray(read_image(photo, "photo"))
        with self._lock:
            if self._hed is None:
                self._hed = load_hed(self.hed_value, "cpu")
            gray = edge_map(self._hed, rgb)  # (H, W) uint8
        path = os.path.join(self._tmp, f"edges-{os.urandom(4).hex()}.png")
        with open(path, "wb") as f:
            f.write(png_bytes(gray))
        return path

    # ---- one request ---------------------------------------------------------------------------
    def run(
        self,
        prompts: list[str],
        settings: SampleSettings,
        lora: str | None = None,
        lora_scale: float = 1.0,
        control: str | None = None,
        control_is_photo: bool = False,
    ) -> Result:
        """Generate with the loaded model; LoRA and ControlNet apply to this request only."""
        if not prompts:
            raise GenerateError("type a prompt (or several, one per line)")
        if len(prompts) * settings.per_prompt > MAX_IMAGES:
            raise GenerateError(
                f"{len(prompts)} prompts × {settings.per_prompt} images is more than "
                f"{MAX_IMAGES} images per request"
            )
        if settings.seed + len(prompts) * settings.per_prompt > MAX_SEED:
            raise GenerateError(f"seed must be 0 … {MAX_SEED - MAX_IMAGES}, got {settings.seed}")
        if control is not None:
            if not self.controlnet:
                raise GenerateError(
                    "an edge image needs a ControlNet: start the app with --controlnet FILE"
                )
            control = self.edges(control) if control_is_photo else control
            read_image(control, "edge image")  # a non-image fails here, with its name
        with self._lock:
            started = _now()
            if self.model.pipe.text_encoder is None:  # a --low-vram request freed T5
                self.model = self._load()
            pipe = self.model.pipe
            base = pipe.transformer
            try:
                if lora:
                    pipe.__dict__["transformer"] = self._lora_transformer(base, lora, lora_scale)
                if control is not None:
                    from training.controlnet import controlled_pipeline

                    w, h = settings.size or (self.model.resolution, self.model.resolution)
                    width, height = snap_size(w, h, self.model.resolution, self.model.unit)
                    controlled_pipeline(pipe, self.controlnet, control, width, height)
                gen = generate(self.model, prompts, settings, device=self.device)
            finally:
                pipe.__dict__["transformer"] = base
            finished = _now()
        w, h = gen.size
        captions = [
            f"{p} · {settings.sampler} {settings.steps} steps · cfg {settings.cfg:g} · seed {s} · {w}x{h}"
            for p, s in zip(gen.prompts, gen.seeds, strict=True)
        ]
        record = {
            "checkpoint": self.model.source,
            **asdict(settings),
            "size_requested": list(settings.size) if settings.size else None,
            "size": [w, h],
            "negative_prompt": NEGATIVE_PROMPT,
            "lora": f"{lora}:{lora_scale:g}" if lora else None,
            "controlnet": self.controlnet if control else None,
            "images": [
                {"prompt": p, "seed": s} for p, s in zip(gen.prompts, gen.seeds, strict=True)
            ],
            "scheduler": gen.scheduler["class"],
            "seconds": round(gen.seconds, 3),
            "device": self.device,
            "started": started,  # when the model was free for this request
            "finished": finished,
        }
        return Result(gen.images, captions, record, control)

    def _lora_transformer(self, base: Any, path: str, scale: float) -> Any:
        """A copy of the base transformer with the adapter at ``path`` (cached per file), at ``scale``."""
        from training.lora import read_lora, set_lora_scale

        read_lora(path)  # a bad file fails before anything is copied
        stamp = f"{os.path.abspath(path)}:{os.path.getmtime(path)}"
        if stamp not in self._loras:
            pipe = self.model.pipe
            pipe.__dict__["transformer"] = copy.deepcopy(base)
            try:
                apply_lora(self.model, f"{path}:{scale}")
                self._loras = {stamp: pipe.transformer}  # one adapter kept: memory stays bounded
            finally:
                pipe.__dict__["transformer"] = base
        transformer = self._loras[stamp]
        set_lora_scale(transformer, scale)
        return transformer


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def settings_from_form(
    sampler: str,
    steps: float | None,
    cfg: float | None,
    seed: float | str | None,
    size: str | None,
    per_prompt: float | None,
    low_vram: bool,
) -> SampleSettings:
    """The form's values → `SampleSettings` (its checks, with the form's names in the message)."""
    get_sampler(sampler)
    try:
        seed_i = int(seed) if seed is not None and str(seed).strip() != "" else 0
    except (TypeError, ValueError):
        raise GenerateError(f"seed must be a whole number, got {seed!r}") from None
    if not 0 <= seed_i <= MAX_SEED - MAX_IMAGES:
        raise GenerateError(f"seed must be 0 … {MAX_SEED - MAX_IMAGES}, got {seed_i}")
    return SampleSettings(
        sampler=sampler,
        steps=int(steps) if steps else None,
        cfg=float(cfg) if cfg is not None else None,
        seed=seed_i,
        size=size or None,  # type: ignore[arg-type]  # parsed in __post_init__
        per_prompt=int(per_prompt or 1),
        low_vram=low_vram,
    )


def sampler_defaults(name: str) -> tuple[int, float]:
    s = SAMPLERS[name]
    return s.steps, s.cfg


def read_image(path: str, what: str) -> Image.Image:
    """An uploaded file as RGB, or a one-line error naming it (not an image, truncated …)."""
    from pipeline.images import ImageError, decode

    try:
        with open(path, "rb") as f:
            return decode(f.read())[0]
    except (ImageError, OSError) as e:
        raise GenerateError(
            f"the {what} {os.path.basename(path)!r} is not an image ({e})"
        ) from None
