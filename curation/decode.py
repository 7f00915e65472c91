"""The CPU side of scoring: decode each image once and derive everything per-image from it — the
CLIP input crop (uint8), width/height, sharpness and the perceptual hash — in a pool of processes
that runs ahead of the model.

Processes, not threads: at GPU rates (thousands of images/s) the Python parts of decoding (PIL's
header parsing, EXIF, glue code) would serialise on the GIL and starve the model's own thread.
On Linux the processes are forked, as torch's DataLoader workers are: they start instantly, share
the parent's imports, and never re-run the caller's ``__main__`` (which forkserver/spawn children
do, breaking scripts without a main guard or read from stdin). They only run PIL/numpy code, never
CUDA or Ray. Elsewhere they are spawned; this module imports no torch, so that stays cheap.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import images
from pipeline.errors import UserError

SHARPNESS_SIDE = 224  # sharpness and phash use a greyscale copy with this shorter side (bicubic)
PHASH_REDUCE = 4  # phash hashes that copy box-reduced 4x (56 px): same hash quality, 4x cheaper

_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class ClipInput:
    """open_clip's eval transform split in two: `crop` (PIL → uint8, CPU) and `normalize` (device).

    `crop` reproduces torchvision's Resize(shorter side)+CenterCrop, or Resize((s, s)) for
    ``squash``, on PIL images, so the model receives ready-sized uint8 arrays and the float
    work runs where the model runs.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash"):
            raise UserError(
                f"CLIP preprocess resize_mode {self.resize_mode!r} is not supported (shortest, squash)"
            )
        if self.interpolation not in _INTERP:
            raise UserError(
                f"CLIP preprocess interpolation {self.interpolation!r} is not supported ({', '.join(_INTERP)})"
            )

    def crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image → (size, size, 3) uint8, sized exactly as torchvision's eval transform."""
        s = self.size
        if self.resize_mode == "squash":
            return np.asarray(
                img.resize((s, s), _INTERP[self.interpolation]) if img.size != (s, s) else img
            )
        return self.center(self.resize(img))

    def resize(self, img: Image.Image) -> Image.Image:
        """Shorter side to ``size`` (torchvision ``Resize(int)``: the longer side is truncated)."""
        s, (w, h) = self.size, img.size
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        return img if (nw, nh) == (w, h) else img.resize((nw, nh), _INTERP[self.interpolation])

    def center(self, img: Image.Image) -> np.ndarray:
        """Center ``size``×``size`` crop (torchvision ``CenterCrop``) of an image already resized."""
        s, (w, h) = self.size, img.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return np.asarray(img.crop((left, top, left + s, top + s)))

    def normalize(self, batch, dtype):
        """(N, H, W, 3) uint8 tensor → (N, 3, H, W) normalised ``dtype`` on the same device."""
        import torch

        x = batch.permute(0, 3, 1, 2).to(dtype).div_(255.0)
        mean = torch.tensor(self.mean, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


@dataclass
class Decoded:
    """One image after the CPU side, or the reason it is unusable (``error``)."""

    key: str
    pixels: np.ndarray | None = None  # (S, S, 3) uint8 CLIP input
    error: str | None = None
    width: int | None = None  # stored image size, EXIF orientation applied
    height: int | None = None
    sharpness: float | None = None
    phash: str | None = None


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: low for blurry images, high for crisp detail."""
    g = grey.astype(np.float32)
    if min(g.shape) < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


# The greyscale copy behind sharpness and phash: fixed, so those scores do not depend on the CLIP.
_GREY = ClipInput(SHARPNESS_SIDE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def decode_for_scoring(key: str, data: bytes, clip_input: ClipInput) -> Decoded:
    """Decode once and derive all per-image values. A bad image becomes an error, never an exception.

    JPEGs decode at the smallest DCT scale (libjpeg draft mode) whose shorter side still covers
    both the CLIP input and SHARPNESS_SIDE: several times faster for large photos. With a 224-px
    bicubic CLIP (ViT-L/14, ViT-B/32) one resize serves the crop, the sharpness and the phash.
    """
    import imagehash

    need = max(clip_input.size, SHARPNESS_SIDE)
    try:
        try:
            w, h = Image.open(io.BytesIO(data)).size
            max_side = -(-need * max(w, h) // max(1, min(w, h)))  # ceil: shorter side stays >= need
        except Exception:  # images.decode below names the problem with the header
            max_side = None
        img, info = images.decode(data, max_side=max_side)
    except images.ImageError as e:
        return Decoded(key, error=str(e))
    w, h = info["decoded_size"]
    if info.get("orientation") in (5, 6, 7, 8):
        w, h = h, w
    small = _GREY.resize(img)
    shared = (clip_input.size, clip_input.resize_mode, clip_input.interpolation) == (
        SHARPNESS_SIDE,
        "shortest",
        _GREY.interpolation,
    )
    grey = small.convert("L")
    return Decoded(
        key,
        pixels=clip_input.center(small) if shared else clip_input.crop(img),
        width=w,
        height=h,
        sharpness=laplacian_variance(np.asarray(grey)),
        phash=str(imagehash.phash(grey.reduce(PHASH_REDUCE))),
    )


def decode_chunk(chunk: list[tuple[str, bytes]], clip_input: ClipInput) -> list[Decoded]:
    return [decode_for_scoring(key, data, clip_input) for key, data in chunk]


class DecodePool:
    """A process pool that decodes a stream of ``(key, bytes)`` ahead of its consumer, in order.

    Created once per stage worker (process start-up is paid once, not per shard). ``chunk``
    images travel per task to amortise inter-process overhead; at most ``depth`` images are in
    flight, which bounds memory.
    """

    def __init__(self, clip_input: ClipInput, processes: int, chunk: int = 8):
        if processes < 1:
            raise UserError(f"--decode-workers must be >= 1, got {processes}")
        self.clip_input = clip_input
        self.processes = processes
        self.chunk = chunk
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._pool = ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context(method))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def imap(self, items: Iterable[tuple[str, bytes]], depth: int = 256) -> Iterator[Decoded]:
        """Yield a `Decoded` per item, in input order. A reader thread pulls ``items`` (e.g. a tar
        being read) and submits chunks while the caller consumes; errors in ``items`` re-raise here."""
        done = object()
        q: queue.Queue = queue.Queue(maxsize=max(1, depth // self.chunk))
        stop = threading.Event()

        def put(x: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                chunk: list[tuple[str, bytes]] = []
                for item in items:
                    chunk.append(item)
                    if len(chunk) == self.chunk:
                        if not put(self._pool.submit(decode_chunk, chunk, self.clip_input)):
                            return
                        chunk = []
                if chunk:
                    put(self._pool.submit(decode_chunk, chunk, self.clip_input))
                put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                put(e)

        reader = threading.Thread(target=read, daemon=True, name="shard-reader")
        reader.start()
        try:
            while True:
                x = q.get()
                if x is done:
                    return
                if isinstance(x, BaseException):
                    raise x
                assert isinstance(x, Future)
                yield from x.result()
        finally:
            stop.set()
            reader.join()
