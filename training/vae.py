"""VAE encoding: batches of uint8 RGB crops in, the posterior's mean and std (fp16) out.

We store the *unscaled* diagonal-Gaussian posterior ``[mean, std]`` (as PixArt-α's feature
extraction does), not a sample: the trainer draws ``z = (mean + std * eps) * scale_factor`` each
time it sees the image, so augmentation noise is not frozen into the dataset. The scale factor
(0.18215 for the SD VAE) is read from the VAE's config and recorded with the features.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class VaeEncoder:
    """An ``AutoencoderKL`` that encodes (B, H, W, 3) uint8 batches to (B, 2, C, H/8, W/8) fp16."""

    def __init__(self, vae: Any):
        self.vae = vae
        self.scale_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> Any:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> Any:
        return next(self.vae.parameters()).dtype

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``images`` (B, H, W, 3) uint8, H and W multiples of the downsample factor."""
        import torch

        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected (B, H, W, 3) uint8 images, got {images.shape} {images.dtype}"
            )
        _, h, w, _ = images.shape
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {w}x{h} is not a multiple of the VAE's {self.downsample}")
        x = torch.from_numpy(images)
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            x = (x.float() / 127.5 - 1.0).to(self.dtype)  # [-1, 1] as the SD VAE was trained
            dist = self.vae.encode(x).latent_dist
            moments = torch.stack([dist.mean, dist.std], dim=1)  # (B, 2, C, H/8, W/8)
            return moments.to(torch.float16).cpu().numpy()

    def decode(self, mean: np.ndarray) -> np.ndarray:
        """Decode unscaled latent means (B, C, h, w) to (B, H, W, 3) uint8: for checks and previews."""
        import torch

        with torch.inference_mode():
            z = torch.from_numpy(np.asarray(mean)).to(self.device, self.dtype)
            x = self.vae.decode(z).sample  # (B, 3, H, W) in [-1, 1]
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return x.permute(0, 2, 3, 1).cpu().numpy()
