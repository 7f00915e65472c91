"""PixArt-δ's ControlNet-Transformer: train it on (latent, HED edge map, caption) and sample with it.

diffusers 0.42.1 ships no PixArt ControlNet (only Sana's), so this module implements PixArt-δ's
design on diffusers' ``PixArtTransformer2DModel``: the base is frozen; trainable copies of its
first N blocks take the control signal — the VAE latent of the edge map, embedded by the base's
own (frozen) patch embedding, plus the base's hidden state through a zero-initialised
``before_proj`` — and each copy's output joins the base after its block i through a
zero-initialised ``after_proj[i]``. At step 0 both projections are zero, so the model's output
equals the base's exactly.

Files: ``OUT/controlnet.safetensors`` (the copies and projections only; the header's
``alphaset`` entry records ``blocks`` and the base checkpoint) and ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

CONTROLNET_FILE = "controlnet.safetensors"


class ControlNetTransformer(nn.Module):
    """A frozen PixArt transformer + N trainable block copies joined through zero linears."""

    def __init__(self, base: nn.Module, blocks: int):
        super().__init__()
        n_base = len(base.transformer_blocks)
        if not 1 <= blocks <= n_base:
            raise ValueError(f"--blocks must be 1-{n_base} (the base has {n_base}), got {blocks}")
        self.base = base.requires_grad_(False)
        self.blocks = blocks
        inner = base.config.num_attention_heads * base.config.attention_head_dim
        self.copies = nn.ModuleList(
            copy.deepcopy(base.transformer_blocks[i]) for i in range(blocks)
        )
        self.copies.requires_grad_(True)
        self.before_proj = nn.Linear(inner, inner)
        self.after_proj = nn.ModuleList(nn.Linear(inner, inner) for _ in range(blocks))
        for lin in [self.before_proj, *self.after_proj]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def control_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("base.")
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        return_dict: bool = True,
        **_: Any,
    ) -> Any:
        """diffusers' PixArtTransformer2DModel.forward with the control branch; ``control``:
        (N, C, h, w) latents of the edge maps (None: the base model alone)."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        b = self.base
        p = b.config.patch_size
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
            encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
        n = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        x = b.pos_embed(hidden_states)  # (N, T, D)
        t, embedded_t = b.adaln_single(
            timestep, added_cond_kwargs, batch_size=n, hidden_dtype=x.dtype
        )
        text = encoder_hidden_states
        if b.caption_projection is not None:
            text = b.caption_projection(text).view(n, -1, x.shape[-1])
        kw = {
            "attention_mask": None,
            "encoder_hidden_states": text,
            "encoder_attention_mask": encoder_attention_mask,
            "timestep": t,
            "class_labels": None,
        }
        c = None
        if control is not None:
            c = b.pos_embed(control.to(x.dtype).expand(n, -1, -1, -1))  # (N, T, D)
        for i, block in enumerate(b.transformer_blocks):
            if c is not None and i < self.blocks:
                if i == 0:
                    c = self.before_proj(x) + c
                c = self.copies[i](c, **kw)
                x = block(x, **kw) + self.after_proj[i](c)
            else:
                x = block(x, **kw)
        shift, scale = (b.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        x = b.norm_out(x) * (1 + scale) + shift
        x = b.proj_out(x).reshape(-1, height, width, p, p, b.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        out = x.reshape(-1, b.out_channels, height * p, width * p)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class ControlledTransformer(nn.Module):
    """What a ``PixArtAlphaPipeline`` calls: the ControlNet with fixed control latents."""

    def __init__(self, net: ControlNetTransformer, control: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("control", control, persistent=False)

    config = property(lambda self: self.net.config)
    dtype = property(lambda self: self.net.dtype)
    device = property(lambda self: self.net.device)

    def forward(self, hidden_states: torch.Tensor, **kw: Any) -> Any:
        return self.net(hidden_states, control=self.control, **kw)


def save_controlnet(path: str, net: ControlNetTransformer, **info: Any) -> str:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    meta = {"format": "pt", "alphaset": json.dumps({"blocks": net.blocks, **info})}
    save_file(net.control_state_dict(), tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def load_controlnet(base: nn.Module, path: str) -> ControlNetTransformer:
    """A ControlNetTransformer on ``base`` with the weights of ``path`` (file or its folder)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if os.path.isdir(path):
        path = os.path.join(path, CONTROLNET_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--controlnet {path}: no such file")
    with safe_open(path, "pt") as f:
        info = json.loads((f.metadata() or {}).get("alphaset", "{}"))
    if "blocks" not in info:
        raise ValueError(f"--controlnet {path}: not an alphaset ControlNet file (no 'blocks')")
    net = ControlNetTransformer(base, int(info["blocks"]))
    missing, unexpected = net.load_state_dict(load_file(path), strict=False)
    bad = [k for k in missing if not k.startswith("base.")] + list(unexpected)
    if bad:
        raise ValueError(f"--controlnet {path}: weights do not fit the base model ({bad[0]} …)")
    return net.to(base.dtype).eval()


def control_image(path_or_array: str | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A control image (an edge map file or (H, W[, 3]) uint8) → (1, 3, H, W) in [-1, 1] at
    ``size`` = (width, height)."""
    from PIL import Image

    if isinstance(path_or_array, str):
        if not os.path.isfile(path_or_array):
            raise FileNotFoundError(f"--control-image {path_or_array}: no such file")
        try:
            img = Image.open(path_or_array).convert("RGB")
        except OSError as e:
            raise ValueError(f"--control-image {path_or_array}: not an image ({e})") from e
    else:
        img = Image.fromarray(path_or_array).convert("RGB")
    img = img.resize(size, Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)[None]


@torch.no_grad()
def encode_control(vae: nn.Module, image: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → scaled VAE latents (the posterior mode), as PixArt-δ encodes HED."""
    dist = vae.encode(image.to(vae.device, vae.dtype)).latent_dist
    return dist.mode() * scale_factor


def train_controlnet(
    store: str,
    base: str,
    features: str,
    edges: str,
    out: str,
    *,
    view: str | None = None,
    blocks: int = 1,
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 2e-5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[str, list[float]]:
    """Train a ControlNet on a frozen base checkpoint; return (controlnet file, per-step losses)."""
    from training.config import check_finetune_settings
    from training.data import FeatureBatches, make_loader, open_features
    from training.diffusion import Diffusion
    from training.export import load_transformer, resolve_checkpoint
    from training.feature_models import load_vae
    from training.hed import read_edges
    from training.train import read_state, step_generator

    check_finetune_settings(steps, batch_size, lr, lora=None)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--base {base}: no such folder")
    ckpt = resolve_checkpoint(base)
    res = int(read_state(ckpt)["features"]["settings"]["resolution"])
    fset = open_features(store, features, resolution=res, multi_scale=False, view=view)
    edge_png = read_edges(store, edges)
    net = ControlNetTransformer(load_transformer(ckpt, "ema"), blocks)
    vae = load_vae(str(fset.settings["vae"]), torch.float32, "cpu")
    learned_sigma = net.config.out_channels == 2 * net.config.in_channels
    diffusion = Diffusion(learned_sigma)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = FeatureBatches(fset, batch_size, seed=seed, shuffle_buffer=64, caption_dropout=0.0)
    batches = iter(make_loader(data))
    cache: dict[str, torch.Tensor] = {}
    os.makedirs(out, exist_ok=True)
    losses: list[float] = []
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        x0 = batch["latents"].float()
        ctrl = torch.cat(
            [_control_latent(k, edge_png, cache, vae, fset, edges) for k in batch["keys"]]
        )
        gen = step_generator(seed, 0, step, torch.device("cpu"))
        t = diffusion.sample_timesteps(x0.shape[0], gen, x0.device)
        noise = torch.randn(x0.shape, generator=gen)
        out_ = net(
            diffusion.add_noise(x0, noise, t),
            encoder_hidden_states=batch["t5"].float(),
            encoder_attention_mask=batch["mask"],
            timestep=t,
            control=ctrl,
        ).sample
        loss = diffusion.loss(out_, x0, diffusion.add_noise(x0, noise, t), t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress:
            print(f"[controlnet] step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for i, v in enumerate(losses):
            f.write(json.dumps({"step": i + 1, "loss": v}) + "\n")
    path = save_controlnet(
        os.path.join(out, CONTROLNET_FILE), net, base=os.path.abspath(ckpt), features=features,
        edges=edges, view=view, steps=steps, seconds=round(time.perf_counter() - start, 2),
    )  # fmt: skip
    return path, losses


def _control_latent(
    key: str, pngs: dict[str, bytes], cache: dict[str, torch.Tensor], vae: Any, fset: Any, tag: str
) -> torch.Tensor:
    from training.hed import read_png

    if key not in cache:
        if key not in pngs:
            raise ValueError(f"sample {key} has no edge map in edges/{tag}; run 'alphaset edges'")
        gray = read_png(pngs[key])
        x = control_image(gray, (gray.shape[1], gray.shape[0]))
        cache[key] = encode_control(vae, x, fset.scale_factor)
    return cache[key]


def controlled_pipeline(pipe: Any, controlnet: str, image: str, width: int, height: int) -> Any:
    """Swap ``pipe.transformer`` for the ControlNet conditioned on ``image`` at this size."""
    base = pipe.transformer
    net = load_controlnet(base, controlnet)
    x = control_image(image, (width, height))
    latents = encode_control(pipe.vae, x, pipe.vae.config.scaling_factor).to(base.dtype)
    pipe.__dict__["transformer"] = ControlledTransformer(net, latents)  # not a registered change
    return pipe
