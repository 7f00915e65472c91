"""PixArt-δ's ControlNet-Transformer: the model, its objective in the one training loop, and
controlled sampling.

diffusers 0.42.1 ships no PixArt ControlNet (only Sana's), so this module implements PixArt-δ's
``ControlPixArtHalf`` (``diffusion/model/nets/pixart_controlnet.py``) on diffusers'
``PixArtTransformer2DModel``. The base is frozen; copy i is a trainable copy of base block i
(N = 13 of them for PixArt-XL-2). The control latent (the edge map's VAE latent) is embedded by
the base's own patch embedding and positional embedding, passed through a zero-initialised
``before_proj`` and added to the *output of base block 0*: that is copy 0's input. Copy i feeds
copy i + 1, and its output, through a zero-initialised ``after_proj[i]``, is added to the input
of base block i + 1. At step 0 the projections are zero, so the output equals the base's
exactly. `training.pixart_import.pixart_controlnet_state_dict` maps PixArt-δ's released
ControlNet weights onto it.

Training follows PixArt-δ's config (``PixArt_xl2_img1024_controlHed.py``, via ``alphaset
finetune controlnet``): the control latent is a posterior *sample* drawn each step (PixArt-δ
encodes HED maps with ``latent_dist.sample()``), 50% caption dropout, clip 0.01, weight decay
0.03.

Training (``objective = "controlnet"``, ``[stage.controlnet] edges, blocks``): each batch's HED
maps (``edges/<tag>``) are encoded by the features' VAE at the size of the batch's latent bucket
(one image at a time, cached), so a multi-scale base gets its micro-conditions and edges of the
same bucket as the image latent. Validation grids use the first edge map as the control image.

Checkpoint files: ``controlnet.safetensors`` (EMA) / ``controlnet_model.safetensors`` (raw), the
copies and projections only; the header's ``alphaset`` entry records ``blocks`` and the base,
``state.json`` records ``controlnet_base``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.cli import UserError
from training import checkpoint as ck
from training.diffusion import sample_latents
from training.objective import Objective


class ControlNetTransformer(nn.Module):
    """A frozen PixArt transformer + N trainable block copies joined through zero linears."""

    def __init__(self, base: nn.Module, blocks: int):
        super().__init__()
        n_base = len(base.transformer_blocks)
        if not 1 <= blocks <= n_base - 1:  # copy i feeds base block i + 1
            raise UserError(
                f"blocks must be 1-{n_base - 1} (the base has {n_base} blocks), got {blocks}"
            )
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
        run = self._checkpointed if b.gradient_checkpointing and torch.is_grad_enabled() else _call
        x = run(b.transformer_blocks[0], x, kw)  # (N, T, D)
        if control is not None:
            c = b.pos_embed(control.to(x.dtype).expand(n, -1, -1, -1))  # (N, T, D)
            c = x + self.before_proj(c)  # copy 0's input: base block 0's output + control
            for i in range(self.blocks):
                c = run(self.copies[i], c, kw)  # copy i → copy i + 1
                x = x + self.after_proj[i](c)  # into the input of base block i + 1
                x = run(b.transformer_blocks[i + 1], x, kw)
            rest = range(self.blocks + 1, len(b.transformer_blocks))
        else:
            rest = range(1, len(b.transformer_blocks))
        for i in rest:
            x = run(b.transformer_blocks[i], x, kw)
        shift, scale = (b.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        x = b.norm_out(x) * (1 + scale) + shift
        x = b.proj_out(x).reshape(-1, height, width, p, p, b.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        out = x.reshape(-1, b.out_channels, height * p, width * p)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    @staticmethod
    def _checkpointed(block: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        """A block with activation checkpointing (the base's ``enable_gradient_checkpointing``
        is bypassed here, as the blocks are called one by one)."""
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda h: block(h, **kw), x, use_reentrant=False)


def _call(block: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    return block(x, **kw)


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
    """A standalone ControlNet file (atomically), as a checkpoint's ``controlnet.safetensors``."""
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

    if os.path.isdir(path):  # a ControlNet run / stage / step-N folder
        path = os.path.join(ck.resolve_step(path, "--controlnet"), ck.CONTROLNET_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--controlnet {path}: no such file")
    with safe_open(path, "pt") as f:
        info = json.loads((f.metadata() or {}).get("alphaset", "{}"))
    if "blocks" not in info:
        raise UserError(f"--controlnet {path}: not an alphaset ControlNet file (no 'blocks')")
    net = ControlNetTransformer(base, int(info["blocks"]))
    load_control_state(net, load_file(path), f"--controlnet {path}")
    return net.to(base.dtype).eval()


def load_control_state(
    net: ControlNetTransformer, sd: dict[str, torch.Tensor], source: str
) -> None:
    missing, unexpected = net.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith("base.")] + list(unexpected)
    if bad:
        raise UserError(f"{source}: weights do not fit the base model ({bad[0]} …)")


def control_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The copies and projections of a full ControlNetTransformer state dict (no base)."""
    return {k: v.contiguous() for k, v in sd.items() if not k.startswith("base.")}


def control_image(path_or_array: str | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A control image (an edge map file or (H, W[, 3]) uint8) → (1, 3, H, W) in [-1, 1] at
    ``size`` = (width, height)."""
    from PIL import Image

    if isinstance(path_or_array, str):
        if not os.path.isfile(path_or_array):
            raise UserError(f"--control-image {path_or_array}: no such file")
        try:
            img = Image.open(path_or_array).convert("RGB")
        except OSError as e:
            raise UserError(f"--control-image {path_or_array}: not an image ({e})") from e
    else:
        img = Image.fromarray(path_or_array).convert("RGB")
    img = img.resize(size, Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)[None]


@torch.no_grad()
def encode_control(vae: nn.Module, image: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → scaled VAE latents, the posterior mode (deterministic sampling
    with ``alphaset sample --controlnet``; training draws posterior samples, `encode_posterior`)."""
    dist = vae.encode(image.to(vae.device, vae.dtype)).latent_dist
    return dist.mode() * scale_factor


@torch.no_grad()
def encode_posterior(vae: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → the unscaled posterior (N, 2, C, h, w) = [mean, std]."""
    dist = vae.encode(image.to(vae.device, vae.dtype)).latent_dist
    return torch.stack([dist.mean, dist.std], dim=1)


class ControlNetObjective(Objective):
    """ControlNet training on a frozen base (see the module docstring)."""

    name = "controlnet"
    init_weights = "ema"
    resume_replaces_base = False  # the frozen base is not in the checkpoint

    @classmethod
    def open_data(cls, cfg: Any, stage: Any) -> Any:
        from training.hed import read_edges

        fset = super().open_data(cfg, stage)
        edges = stage.settings.edges
        try:
            read_edges(cfg.store, edges)
        except FileNotFoundError as e:
            raise UserError(f"stage {stage.name!r}: {e}") from None
        return fset

    def prepare(self, fset: Any, sdir: str, init: str, dist: Any) -> Any:
        from training.feature_models import load_vae
        from training.hed import read_edges

        self.pngs = read_edges(self.cfg.store, self.settings.edges)
        self.vae = load_vae(str(fset.settings["vae"]), torch.float32, str(self.device))
        self.scale = fset.scale_factor
        self.factor = fset.vae_downsample
        self.cache: dict[tuple[str, int, int], torch.Tensor] = {}  # unscaled [mean, std]
        return fset

    def build(self, base: nn.Module) -> nn.Module:
        return ControlNetTransformer(base, self.settings.blocks)

    def control(
        self, keys: list[str], latent_hw: tuple[int, int], gen: torch.Generator | None = None
    ) -> torch.Tensor:
        """Edge latents (N, C, h, w) of the batch's keys at its latent bucket (h, w): posterior
        samples drawn from ``gen`` (PixArt-δ's ``latent_dist.sample()``; None: the mean). The
        posteriors are encoded one at a time (so a value never depends on the batch it came in)
        and cached on the CPU."""
        from training.hed import read_png

        h, w = latent_hw
        out = []
        for key in keys:
            if (key, h, w) not in self.cache:
                if key not in self.pngs:
                    raise UserError(
                        f"sample {key} has no edge map in edges/{self.settings.edges}; run "
                        "'alphaset edges' on the same store"
                    )
                gray = read_png(self.pngs[key])
                x = control_image(gray, (w * self.factor, h * self.factor)).to(self.device)
                with torch.autocast(self.device.type, enabled=False):
                    self.cache[key, h, w] = encode_posterior(self.vae, x)[0].cpu()
            out.append(self.cache[key, h, w])
        post = torch.stack(out).to(self.device)  # (N, 2, C, h, w)
        mean, std = post[:, 0], post[:, 1]
        if gen is None:
            return mean * self.scale
        eps = torch.randn(mean.shape, generator=gen, device=self.device)
        return (mean + std * eps) * self.scale

    def loss(
        self, net: nn.Module, ema: nn.Module, batch: dict[str, Any], gen: torch.Generator
    ) -> torch.Tensor:
        ctrl = self.control(batch["keys"], tuple(batch["latents"].shape[-2:]), gen)  # (N, C, h, w)
        return self.per_sample_loss(net, batch, gen, control=ctrl).mean()

    @torch.no_grad()
    def sample(self, ema: nn.Module, v: Any, gen: torch.Generator) -> torch.Tensor:
        """The validation prompts under the first edge map of the store (at the grid's size)."""
        ctrl = self.control([sorted(self.pngs)[0]], v.latent_hw)  # (1, C, h, w)
        return sample_latents(
            ControlledTransformer(ema, ctrl), v.embeds, v.mask, v.null, v.null_mask, v.latent_hw,
            self.stage.sample_steps, self.stage.guidance_scale, gen, v.micro, v.latent_channels,
        )  # fmt: skip

    def files(self, model: nn.Module, ema: nn.Module, gather: Any, info: dict[str, Any]) -> Any:
        header = {"alphaset": json.dumps({"blocks": self.settings.blocks, **info})}
        return {
            ck.CONTROLNET_MODEL_FILE: (control_state(gather(model)), header),
            ck.CONTROLNET_FILE: (control_state(gather(ema)), header),
        }

    def state(self, init: str) -> dict[str, Any]:
        return {"objective": self.name, "lora_base": None, "controlnet_base": init}

    def load(self, model: nn.Module, ema: nn.Module, ckpt: str) -> None:
        for module, name in ((model, ck.CONTROLNET_MODEL_FILE), (ema, ck.CONTROLNET_FILE)):
            path = os.path.join(ckpt, name)
            load_control_state(module, ck.load_safetensors(path), path)  # type: ignore[arg-type]


def controlled_pipeline(pipe: Any, controlnet: str, image: str, width: int, height: int) -> Any:
    """Swap ``pipe.transformer`` for the ControlNet conditioned on ``image`` at this size."""
    base = pipe.transformer
    net = load_controlnet(base, controlnet)
    x = control_image(image, (width, height))
    latents = encode_control(pipe.vae, x, pipe.vae.config.scaling_factor).to(base.dtype)
    pipe.__dict__["transformer"] = ControlledTransformer(net, latents)  # not a registered change
    return pipe
