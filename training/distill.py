"""Latent consistency distillation (PixArt-δ's LCM) as an objective of the one training loop.

One step: a latent x0 of the features, a DDIM skipping schedule of 50 steps over the 1000 (t_n
every 20), an index n, a guidance scale w ~ U[3, 15]. The student sees x at t_{n+k}; the frozen
teacher (the stage's init weights) takes one DDIM step with classifier-free guidance w from
t_{n+k} to t_n; the EMA target network (the loop's EMA, decay ``[stage.lcm] target_ema`` 0.95)
sees that x at t_n. Both predictions go through the consistency function
``f(x, t) = c_skip(t) x + c_out(t) x0_pred`` (LCM's boundary scalings, sigma_data 0.5, timestep
scaling 10, as diffusers' ``LCMScheduler`` samples with) and meet in a pseudo-Huber loss
(c = 0.001). Validation grids are 4-step LCM samples.

Guidance, by default PixArt-δ's recipe (``train_scripts/train_pixart_lcm.py``,
``configs/pixart_config/PixArt_xl2_img1024_lcm.py``): the teacher guides with a fixed
``[stage.lcm] teacher_guidance`` w = 4.5 in PixArt's form ``cond + w·(cond − uncond)``, which is
diffusers' ``uncond + 5.5·(cond − uncond)``; the student is the plain transformer (no
w-embedding) and its checkpoints are plain weights; grad clip 0.01 (``alphaset distill lcm``).

With ``guidance_embedding = true`` (the LCM paper; ``--guidance-embedding``) w ~ U[3, 15] per
sample and the full student embeds w (LCM's sinusoidal w-embedding of w·1000 → MLP, the last
linear zero-initialised) and adds it to the timestep embedding inside ``adaln_single``. The
checkpoint's ``model.safetensors``/``ema.safetensors`` are plain ``PixArtTransformer2DModel``
weights: the embedding of ``[stage.lcm] guidance`` (4.5) is folded into the bias of
``timestep_embedder.linear_2`` (adding a constant there is exactly adding it to the timestep
embedding); ``guidance_embedding.safetensors`` keeps the w-embedding (target's at the top level,
``student.*`` the online one) and both unfolded biases, so ``--resume`` restores the exact
weights. With ``lora`` (LCM-LoRA) only adapters train and, like diffusers' LCM-LoRA scripts,
w is not embedded.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from torch import nn

from training import checkpoint as ck
from training.lora import add_lora
from training.objective import Objective

BIAS = "adaln_single.emb.timestep_embedder.linear_2.bias"  # where the guidance is folded in


def guidance_features(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """LCM's sinusoidal embedding of w·1000: (N,) → (N, dim)."""
    w = w.float() * 1000.0
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=w.device)
    freqs = torch.exp(-math.log(10000.0) * steps / (half - 1))
    args = w[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GuidanceEmbedding(nn.Module):
    """w → a vector added to the timestep embedding (zero at init: the student = the teacher)."""

    def __init__(self, dim: int, features: int = 256):
        super().__init__()
        self.features = features
        self.linear_1 = nn.Linear(features, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(guidance_features(w, self.features))))


class GuidedStudent(nn.Module):
    """A PixArt transformer whose timestep embedding gets ``GuidanceEmbedding(w)`` added (a
    forward hook on ``adaln_single.emb.timestep_embedder``)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        dim = transformer.adaln_single.emb.timestep_embedder.linear_2.out_features
        self.guidance = GuidanceEmbedding(dim)
        self._w: torch.Tensor | None = None
        transformer.adaln_single.emb.timestep_embedder.register_forward_hook(self._add)

    def _add(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._w is None:
            return output
        return output + self.guidance(self._w).to(output.dtype)

    def forward(self, *args: Any, w: torch.Tensor | None = None, **kw: Any) -> Any:
        self._w = w
        try:
            return self.transformer(*args, **kw)
        finally:
            self._w = None

    def folded_state_dict(self, w: float) -> dict[str, torch.Tensor]:
        """The transformer's weights with the embedding of ``w`` in the timestep MLP's bias."""
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return fold(sd, w)[0]


@torch.no_grad()
def fold(
    sd: dict[str, torch.Tensor], w: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """A GuidedStudent state dict (CPU) → (plain transformer weights with the embedding of ``w``
    added to the timestep MLP's bias, the guidance embedding's weights, the unfolded bias)."""
    t = {
        k[len("transformer.") :]: v.contiguous()
        for k, v in sd.items()
        if k.startswith("transformer.")
    }
    g = {k[len("guidance.") :]: v.contiguous() for k, v in sd.items() if k.startswith("guidance.")}
    emb = GuidanceEmbedding(t[BIAS].shape[0]).to(t[BIAS].dtype)
    emb.load_state_dict(g)
    bias = t[BIAS]
    t[BIAS] = (bias + emb(torch.tensor([w], dtype=bias.dtype))[0]).contiguous()
    return t, g, bias.clone()


def ddim_timesteps(ddim_steps: int = 50, train_steps: int = 1000) -> torch.Tensor:
    """The skipping schedule's t_{n+k}: 19, 39, …, 999 for 50 of 1000 (diffusers' DDIMSolver)."""
    ratio = train_steps // ddim_steps
    return torch.arange(1, ddim_steps + 1) * ratio - 1


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at integer timesteps t (as diffusers' LCMScheduler)."""
    s = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).mean()


class LcmObjective(Objective):
    """The consistency distillation loss of one batch (see the module docstring)."""

    name = "lcm"
    init_weights = "ema"  # the teacher is the base's EMA, as PixArt-δ distils
    resume_replaces_base = False  # the teacher is the init checkpoint, always

    def __init__(self, cfg: Any, stage: Any, device: torch.device):
        super().__init__(cfg, stage, device)
        s = self.settings
        self.timesteps = ddim_timesteps(s.ddim_steps).to(device)  # (ddim_steps,)
        self.skip = 1000 // s.ddim_steps
        self.sqrt_ac = self.diffusion.tables["sqrt_ac"]
        self.sqrt_1m = self.diffusion.tables["sqrt_1m_ac"]
        self.teacher: nn.Module | None = None
        # The LCM paper's w-embedding, or PixArt-δ's fixed teacher guidance (the default).
        self.random_w = s.guidance_embedding
        self.embed_w = s.guidance_embedding and self.lora is None

    def prepare(self, fset: Any, sdir: str, init: str, dist: Any) -> Any:
        self.null_t5 = torch.from_numpy(fset.null_t5).to(self.device).float()  # (L, D)
        self.null_mask = torch.from_numpy(fset.null_mask).to(self.device)  # (L,)
        return fset

    def build(self, base: nn.Module) -> nn.Module:
        self.teacher = copy.deepcopy(base).requires_grad_(False).eval()
        if self.lora is not None:
            return add_lora(base, self.lora)
        if not self.embed_w:
            return base.requires_grad_(True)
        return GuidedStudent(base.requires_grad_(True))

    def frozen(self) -> list[nn.Module]:
        return [self.teacher] if self.teacher is not None else []

    @property
    def ema_decay(self) -> float:
        return self.settings.target_ema

    def _x0(
        self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
        mask: torch.Tensor, added: Any, w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(x0 prediction, eps prediction) of an epsilon model (a learned sigma's half dropped)."""
        kw = {"w": w} if w is not None else {}
        c = x.shape[1]
        eps = model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs=added, **kw).sample[:, :c].float()  # fmt: skip
        a, s = self.sqrt_ac[t].view(-1, 1, 1, 1), self.sqrt_1m[t].view(-1, 1, 1, 1)
        return (x - s * eps) / a, eps

    def guidance_scales(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """The teacher's CFG scale per sample, diffusers' form: PixArt-δ's fixed 1 + w (5.5),
        or w ~ U[w_min, w_max] with ``guidance_embedding``."""
        s = self.settings
        if not self.random_w:
            return torch.full((n,), 1.0 + s.teacher_guidance, device=self.device)
        return s.w_min + (s.w_max - s.w_min) * torch.rand(n, generator=gen, device=self.device)

    def loss(
        self, net: nn.Module, ema: nn.Module, batch: dict[str, Any], gen: torch.Generator
    ) -> torch.Tensor:
        """Pseudo-Huber distance of f_student(x_{t_{n+k}}) to f_target(DDIM-CFG step to t_n);
        ``gen`` draws n, w and the noise."""
        assert self.teacher is not None
        cfg, dev = self.settings, self.device
        x0 = batch["latents"].float()  # (N, C, h, w)
        n = x0.shape[0]
        text, mask = batch["t5"], batch["mask"]  # (N, L, D), (N, L)
        added = self.added(batch)
        idx = torch.randint(0, cfg.ddim_steps, (n,), generator=gen, device=dev)
        t_hi = self.timesteps[idx]  # (N,)
        t_lo = (t_hi - self.skip).clamp(min=0)
        w = self.guidance_scales(n, gen)  # (N,) in diffusers' form: uncond + w (cond - uncond)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        x_hi = self.diffusion.add_noise(x0, noise, t_hi)
        ws = w if self.embed_w else None
        x0_s, _ = self._x0(net, x_hi, t_hi, text, mask, added, ws)
        cs, co = boundary_scalings(t_hi, cfg.sigma_data, cfg.timestep_scaling)
        pred = cs * x_hi + co * x0_s
        with torch.no_grad():
            text2 = torch.cat([text, self.null_t5.expand(n, -1, -1)])  # (2N, L, D)
            mask2 = torch.cat([mask, self.null_mask.expand(n, -1)])
            added2 = None if added is None else {k: torch.cat([v, v]) for k, v in added.items()}
            x0_t, eps_t = self._x0(
                self.teacher, torch.cat([x_hi, x_hi]), torch.cat([t_hi, t_hi]), text2, mask2, added2
            )
            wv = w.view(-1, 1, 1, 1)
            x0_g = x0_t[n:] + wv * (x0_t[:n] - x0_t[n:])  # CFG: uncond + w (cond - uncond)
            eps_g = eps_t[n:] + wv * (eps_t[:n] - eps_t[n:])
            a, s = self.sqrt_ac[t_lo].view(-1, 1, 1, 1), self.sqrt_1m[t_lo].view(-1, 1, 1, 1)
            x_lo = a * x0_g + s * eps_g  # one DDIM step t_{n+k} → t_n
            x0_tg, _ = self._x0(ema, x_lo, t_lo, text, mask, added, ws)
            cs_lo, co_lo = boundary_scalings(t_lo, cfg.sigma_data, cfg.timestep_scaling)
            tgt = cs_lo * x_lo + co_lo * x0_tg
        return pseudo_huber(pred, tgt, cfg.huber_c)

    @torch.no_grad()
    def sample(self, ema: nn.Module, v: Any, gen: torch.Generator) -> torch.Tensor:
        """Few-step LCM sampling (diffusers' ``LCMScheduler``, as ``alphaset sample --sampler
        lcm``), no CFG: the full student gets w = ``guidance`` through its embedding."""
        from diffusers import LCMScheduler

        from training.diffusion import inference_scheduler
        from training.sample import SAMPLERS

        scheduler = LCMScheduler.from_config(
            inference_scheduler().config, **SAMPLERS["lcm"].settings
        )
        scheduler.set_timesteps(self.settings.sample_steps, device=self.device)
        n = v.embeds.shape[0]
        shape = (n, v.latent_channels, *v.latent_hw)
        latents = torch.randn(shape, generator=gen, device=self.device) * scheduler.init_noise_sigma
        kw = {}
        if self.embed_w:
            kw["w"] = torch.full((n,), self.settings.guidance, device=self.device)
        for t in scheduler.timesteps:
            eps = ema(latents, encoder_hidden_states=v.embeds, encoder_attention_mask=v.mask,
                      timestep=t.expand(n), added_cond_kwargs=v.micro, **kw).sample  # fmt: skip
            latents = scheduler.step(
                eps[:, : v.latent_channels].float(), t, latents, generator=gen
            ).prev_sample
        return latents

    def files(self, model: nn.Module, ema: nn.Module, gather: Any, info: dict[str, Any]) -> Any:
        if not self.embed_w:
            return super().files(model, ema, gather, info)
        w = self.settings.guidance
        model_t, model_g, model_bias = fold(gather(model), w)
        ema_t, ema_g, ema_bias = fold(gather(ema), w)
        guidance = {**ema_g, **{f"student.{k}": v for k, v in model_g.items()},
                    "unfolded_bias.model": model_bias, "unfolded_bias.ema": ema_bias}  # fmt: skip
        return {
            ck.MODEL_FILE: (model_t, {}),
            ck.EMA_FILE: (ema_t, {}),
            ck.GUIDANCE_FILE: (guidance, {"guidance": str(w)}),
        }

    def state(self, init: str) -> dict[str, Any]:
        return {**super().state(init), "lcm_teacher": init}

    def load(self, model: nn.Module, ema: nn.Module, ckpt: str) -> None:
        if not self.embed_w:
            return super().load(model, ema, ckpt)
        g = ck.load_safetensors(os.path.join(ckpt, ck.GUIDANCE_FILE))
        for which, module, name in (("model", model, ck.MODEL_FILE), ("ema", ema, ck.EMA_FILE)):
            t = ck.load_safetensors(os.path.join(ckpt, name))
            t[BIAS] = g[f"unfolded_bias.{which}"]
            prefix = "student." if which == "model" else ""
            gsd = {k[len(prefix) :]: v for k, v in g.items() if k.startswith(prefix) and k[len(prefix) :].startswith("linear_")}  # fmt: skip
            module.transformer.load_state_dict(t)
            module.guidance.load_state_dict(gsd)
        return None
