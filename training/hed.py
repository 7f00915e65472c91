"""HED edges: the detector (Xie & Tu's holistically-nested edge detection) and the ``edges/<tag>``
stage that writes one edge map per sample, the ControlNet condition PixArt-δ trains on.

The network has the architecture of ControlNet's ``ControlNetHED_Apache2`` annotator, the HED that
PixArt-δ extracts its edges with (``diffusion/model/hed.py``), so its standard weights file
(``ControlNetHED.pth``: ``norm``, ``block1..5.convs.N``, ``block1..5.projection``) loads with
``--hed FILE``: five VGG-style stages (2, 2, 3, 3, 3 conv3x3 + ReLU, 2x2 max-pool before stages
2-5) on the RGB input in 0-255 minus a learned ``norm``, a 1x1 projection per stage resized to the
input size, and the edge map sigmoid(mean of the five). Weights come from that file (``.pth`` read
with ``weights_only=True``, or ``.safetensors``) or a folder (``config.json`` with ``widths`` +
``model.safetensors``); ``tiny`` is a random narrow one.

Stage output ``STORE/edges/<tag>/<shard>.parquet``: one row per ok key of image shard N, in
order: ``key``, ``edges`` (PNG bytes, 8-bit grey, the crop the features stage uses at the same
resolution: resize-cover + centre crop; with ``multi_scale`` the image's aspect-ratio bucket, as
multi-scale features crop it), ``height``, ``width``, ``error`` (null when ok).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.cli import UserError
from pipeline.models import Preset, resolve
from pipeline.stage import StageSpec, StageSummary, run_stage
from pipeline.store import Store

KIND = "edges"
CONVS = (2, 2, 3, 3, 3)
VGG_WIDTHS = (64, 128, 256, 512, 512)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class HedStage(nn.Module):
    """``convs`` (3x3 + ReLU each) then a 1x1 ``projection`` to one side map (DoubleConvBlock)."""

    def __init__(self, c_in: int, c_out: int, n: int):
        super().__init__()
        self.convs = nn.Sequential(
            *(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1) for i in range(n))
        )
        self.projection = nn.Conv2d(c_out, 1, 1)

    def forward(self, x: torch.Tensor, down: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if down:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(nn.Module):
    """ControlNetHED_Apache2's layout: (N, 3, H, W) RGB in [0, 1] → (N, 1, H, W) in (0, 1)."""

    def __init__(self, widths: tuple[int, ...] = VGG_WIDTHS):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"HED has 5 stages, got widths {widths}")
        self.widths = tuple(int(w) for w in widths)
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        c_in = 3
        for i, (n, w) in enumerate(zip(CONVS, self.widths, strict=True)):
            setattr(self, f"block{i + 1}", HedStage(c_in, w, n))
            c_in = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = x * 255.0 - self.norm
        sides = []
        for i in range(5):
            x, side = getattr(self, f"block{i + 1}")(x, down=i > 0)
            sides.append(F.interpolate(side, (h, w), mode="bilinear", align_corners=False))
        return torch.sigmoid(torch.cat(sides, 1).mean(1, keepdim=True))


def _build_tiny(folder: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = HED((4, 8, 8, 16, 16))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"widths": list(model.widths)}, f)
    save_file(model.state_dict(), os.path.join(folder, WEIGHTS_FILE))


PRESETS: dict[str, Preset] = {"tiny": Preset("tiny", build_tiny=_build_tiny)}


def _read_state(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable weights: safetensors/pickle raise their own types
        raise UserError(f"--hed {path}: cannot read weights ({type(e).__name__})") from e
    if not isinstance(state, dict):
        raise UserError(f"--hed {path}: expected a state dict, got {type(state).__name__}")
    return state.get("state_dict", state)


def load_hed(value: str, device: str = "cpu") -> HED:
    """A preset name, a folder (config.json + model.safetensors) or a weights file → HED (eval)."""
    if os.path.isfile(value):
        state = _read_state(value)
    else:
        folder, _ = resolve(value, PRESETS, "hed-apache2", flag="--hed")  # new layout: new cache
        path = os.path.join(folder, WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--hed {value}: no {WEIGHTS_FILE} in the folder")
        state = _read_state(path)
    try:
        widths = tuple(int(state[f"block{i + 1}.projection.weight"].shape[1]) for i in range(5))
        model = HED(widths)
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"--hed {value}: weights do not fit the HED network ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:120]})") from e  # fmt: skip
    return model.eval().to(device)


@torch.no_grad()
def edge_map(model: HED, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) uint8 edge strength."""
    device = next(model.parameters()).device
    x = (
        torch.from_numpy(np.ascontiguousarray(rgb).copy()).to(device).permute(2, 0, 1)[None].float()
        / 255.0
    )
    return (model(x)[0, 0] * 255.0).round().clamp(0, 255).byte().cpu().numpy()


def png_bytes(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


class EdgeWorker:
    """One shard of ``edges/<tag>``: every ok image → its feature crop → HED → PNG row."""

    def __init__(
        self, store: str, stage: str, hed: str, resolution: int, multi_scale: bool = False,
        **settings: Any,
    ):  # fmt: skip
        self.store = Store(store)
        self.stage, self.hed_name, self.resolution = stage, hed, resolution
        self.multi_scale = multi_scale
        self.model = load_hed(hed)

    def __call__(self, shard: str) -> dict[str, Any]:
        import pyarrow as pa

        from pipeline import fs
        from pipeline.images import ImageError
        from training.features import prepare_image

        start = time.perf_counter()
        wanted = self.store.ok_keys(shard)
        rows: dict[str, list[Any]] = {k: [] for k in ("key", "edges", "height", "width", "error")}
        got = {}
        for key, _ext, data in self.store.iter_images(shard):
            got[key] = data
        reasons: Counter[str] = Counter()
        for key in wanted:
            err, png, hw = None, None, (None, None)
            if key not in got:
                err = "missing image"
            else:
                try:
                    crop, _ = prepare_image(got[key], self.resolution, self.multi_scale)
                    png, hw = png_bytes(edge_map(self.model, crop)), crop.shape[:2]
                except ImageError as e:
                    err = f"bad image: {e}"[:200]
            if err:
                reasons[err.split(":")[0]] += 1
            for name, value in zip(rows, (key, png, hw[0], hw[1], err), strict=True):
                rows[name].append(value)
        table = pa.table(
            {
                "key": pa.array(rows["key"], pa.string()),
                "edges": pa.array(rows["edges"], pa.binary()),
                "height": pa.array(rows["height"], pa.int32()),
                "width": pa.array(rows["width"], pa.int32()),
                "error": pa.array(rows["error"], pa.string()),
            }
        )
        out = f"{shard}.parquet"
        checksum = fs.write_parquet(self.store.url(self.stage, out), table)
        n_err = sum(e is not None for e in rows["error"])
        return self.store.write_status(
            self.stage,
            shard,
            {
                "rows": len(wanted),
                "ok": len(wanted) - n_err,
                "errors": n_err,
                "errors_by_reason": dict(reasons),
                "checksum": checksum,
                "output": out,
                "model": self.hed_name,
                "settings": {"resolution": self.resolution, "multi_scale": self.multi_scale},
                "seconds": round(time.perf_counter() - start, 3),
            },
        )


def extract_edges(
    store: str | Store,
    hed: str,
    resolution: int,
    tag: str | None = None,
    workers: int = 1,
    shards: list[str] | None = None,
    use_ray: bool = True,
    progress: bool = True,
    multi_scale: bool = False,
) -> StageSummary:
    """Write ``edges/<tag>/`` (default tag ``hed-<resolution>``, ``-ms`` with ``multi_scale``:
    each image's aspect-ratio bucket crop, as the multi-scale feature stage crops it, so a
    ControlNet on a multi-scale base gets edges of the same bucket as the image latent)."""
    from training.config import RESOLUTIONS
    from training.features import check_tag

    store = store if isinstance(store, Store) else Store(store)
    store.require()
    if resolution not in RESOLUTIONS:
        raise UserError(f"--resolution must be one of {RESOLUTIONS}, got {resolution}")
    load_hed(hed)  # a bad --hed fails before any work
    hed = os.path.abspath(hed) if os.path.exists(hed) else hed
    tag = check_tag(tag or f"hed-{resolution}{'-ms' if multi_scale else ''}")
    stage = f"{KIND}/{tag}"
    spec = StageSpec(
        stage=stage,
        worker_cls=EdgeWorker,
        worker_kwargs={
            "store": store.root,
            "stage": stage,
            "hed": hed,
            "resolution": resolution,
            "multi_scale": multi_scale,
        },
        settings={"hed": hed, "resolution": resolution, "multi_scale": multi_scale},
        shards=shards,
        workers=workers,
    )
    return run_stage(store, spec, progress=progress, use_ray=use_ray)


def read_edges(store: str | Store, tag: str) -> dict[str, bytes]:
    """key → edge PNG of every ok row of ``edges/<tag>``."""
    from pipeline import fs

    store = store if isinstance(store, Store) else Store(store)
    done = store.completed(f"{KIND}/{tag}")
    if not done:
        raise FileNotFoundError(f"edges/{tag}: no finished shards; run 'alphaset edges' first")
    out: dict[str, bytes] = {}
    for shard in sorted(done):
        t = fs.read_parquet(store.url(KIND, tag, f"{shard}.parquet"), ["key", "edges", "error"])
        for k, e, err in zip(*(t[c].to_pylist() for c in ("key", "edges", "error")), strict=True):
            if err is None:
                out[k] = e
    return out
