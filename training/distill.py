"""Latent consistency distillation (PixArt-δ's LCM) of a trained PixArt checkpoint, full or LoRA.

One step: a latent x0 of the features, a DDIM skipping schedule of 50 steps over the 1000 (t_n
every 20), an index n, a guidance scale w ~ U[3, 15]. The student sees x at t_{n+k}; the frozen
teacher takes one DDIM step with classifier-free guidance w from t_{n+k} to t_n; the EMA target
network (decay 0.95) sees that x at t_n. Both predictions go through the consistency function
``f(x, t) = c_skip(t) x + c_out(t) x0_pred`` (LCM's boundary scalings, sigma_data 0.5, timestep
scaling 10, as diffusers' ``LCMScheduler`` samples with) and meet in a pseudo-Huber loss
(c = 0.001).

Guidance: the full student embeds w (LCM's sinusoidal w-embedding of w·1000 → MLP, the last
linear zero-initialised) and adds it to the timestep embedding inside ``adaln_single``. The saved
checkpoint is a plain ``PixArtTransformer2DModel``: the embedding of the guidance ``--guidance``
(default 4.5) is folded into the bias of ``timestep_embedder.linear_2`` (adding a constant there
is exactly adding it to the timestep embedding), and the w-embedding itself is kept in
``guidance_embedding.safetensors``. The LoRA variant (``--lora RANK``, LCM-LoRA) trains adapters
only and, like diffusers' LCM-LoRA scripts, does not embed w.

Output: a checkpoint folder (``state.json`` + ``model.safetensors`` online student +
``ema.safetensors`` target; LoRA: ``lora.safetensors``/``lora_model.safetensors`` with
``lora_base`` = the teacher) that ``alphaset sample --sampler lcm`` and ``alphaset export`` load.
``write_checkpoint`` is shared with training.dreambooth.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from training.config import check_finetune_settings

GUIDANCE_FILE = "guidance_embedding.safetensors"
METRICS_FILE = "metrics.jsonl"


@dataclass
class LcmConfig:
    """PixArt-δ's LCM settings; ``lora`` = adapter rank (None: full distillation)."""

    steps: int = 100
    batch_size: int = 2
    lr: float = 2e-5
    ddim_steps: int = 50
    w_min: float = 3.0
    w_max: float = 15.0
    guidance: float = 4.5  # the w folded into the saved model
    ema: float = 0.95
    huber_c: float = 0.001
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    lora: int | None = None
    seed: int = 0

    def validate(self) -> LcmConfig:
        check_finetune_settings(self.steps, self.batch_size, self.lr, self.lora)
        if not 1 <= self.ddim_steps <= 1000 or 1000 % self.ddim_steps:
            raise ValueError(f"ddim_steps must divide 1000, got {self.ddim_steps}")
        if not 1 <= self.w_min <= self.w_max:
            raise ValueError(
                f"guidance range must satisfy 1 <= w_min <= w_max, got {self.w_min}, {self.w_max}"
            )
        if not self.guidance >= 1:
            raise ValueError(f"--guidance must be >= 1, got {self.guidance}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}")
        return self


def guidance_features(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """LCM's sinusoidal embedding of w·1000: (N,) → (N, dim)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
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

    @torch.no_grad()
    def folded_state_dict(self, w: float) -> dict[str, torch.Tensor]:
        """The transformer's weights with the embedding of ``w`` in the timestep MLP's bias."""
        state = {
            k: v.detach().cpu().clone().contiguous()
            for k, v in self.transformer.state_dict().items()
        }
        g = self.guidance(torch.tensor([w]))[0].cpu()
        state["adaln_single.emb.timestep_embedder.linear_2.bias"] += g
        return state


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


def make_student(base: nn.Module, lora: int | None) -> tuple[nn.Module, nn.Module, Any]:
    """(student, EMA target, LoraOptions or None) from a copy of the teacher: a GuidedStudent
    (all weights train) or the transformer with LoRA adapters (only they train)."""
    from training.lora import LoraOptions, add_lora

    if lora is not None:
        opts = LoraOptions(rank=lora, alpha=float(lora)).validate("--lora")
        student = add_lora(base, opts)
        return student, copy.deepcopy(student).requires_grad_(False), opts
    target = GuidedStudent(copy.deepcopy(base))  # copied before the student's hook is added
    student = GuidedStudent(base.requires_grad_(True))
    target.guidance.load_state_dict(student.guidance.state_dict())
    return student, target.requires_grad_(False), None


@torch.no_grad()
def ema_update(target: nn.Module, student: nn.Module, decay: float) -> None:
    for pt, ps in zip(target.parameters(), student.parameters(), strict=True):
        pt.lerp_(ps, 1.0 - decay)


class LcmObjective:
    """The consistency distillation loss of one batch (see the module docstring)."""

    def __init__(
        self,
        teacher: nn.Module,
        cfg: LcmConfig,
        null_t5: Any,
        null_mask: Any,
        channels: int,
        multi_scale: bool,
    ):
        from training.diffusion import Diffusion

        self.teacher = teacher.requires_grad_(False).eval()
        self.cfg = cfg
        self.null_t5 = torch.as_tensor(null_t5).float()  # (L, D)
        self.null_mask = torch.as_tensor(null_mask)  # (L,)
        self.channels = channels
        self.multi_scale = multi_scale
        self.diffusion = Diffusion(learned_sigma=False)
        self.sqrt_ac = self.diffusion.tables["sqrt_ac"]
        self.sqrt_1m = self.diffusion.tables["sqrt_1m_ac"]
        self.timesteps = ddim_timesteps(cfg.ddim_steps)
        self.skip = 1000 // cfg.ddim_steps

    def _x0(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor,
        added: Any,
        w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 prediction, eps prediction) of an epsilon model (a learned sigma's half dropped)."""
        kw = {"w": w} if w is not None else {}
        eps = model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs=added, **kw).sample[:, : self.channels].float()  # fmt: skip
        a, s = self.sqrt_ac[t].view(-1, 1, 1, 1), self.sqrt_1m[t].view(-1, 1, 1, 1)
        return (x - s * eps) / a, eps

    def loss(
        self, student: nn.Module, target: nn.Module, batch: dict[str, Any], gen: torch.Generator
    ) -> torch.Tensor:
        """Pseudo-Huber distance of f_student(x_{t_{n+k}}) to f_target(DDIM-CFG step to t_n);
        ``gen`` draws n, w and the noise."""
        from training.model import micro_conditions

        cfg = self.cfg
        x0 = batch["latents"].float()
        n = x0.shape[0]
        text, mask = batch["t5"].float(), batch["mask"]
        added = micro_conditions(batch["hw"], torch.float32) if self.multi_scale else None
        t_hi = self.timesteps[torch.randint(0, cfg.ddim_steps, (n,), generator=gen)]
        t_lo = (t_hi - self.skip).clamp(min=0)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(n, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_hi = self.diffusion.add_noise(x0, noise, t_hi)
        ws = w if isinstance(student, GuidedStudent) else None
        x0_s, _ = self._x0(student, x_hi, t_hi, text, mask, added, ws)
        cs, co = boundary_scalings(t_hi, cfg.sigma_data, cfg.timestep_scaling)
        pred = cs * x_hi + co * x0_s
        with torch.no_grad():
            text2 = torch.cat([text, self.null_t5.expand(n, -1, -1)])
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
            x0_tg, _ = self._x0(target, x_lo, t_lo, text, mask, added, ws)
            cs_lo, co_lo = boundary_scalings(t_lo, cfg.sigma_data, cfg.timestep_scaling)
            tgt = cs_lo * x_lo + co_lo * x0_tg
        return pseudo_huber(pred, tgt, cfg.huber_c)


def write_checkpoint(
    out: str,
    base_state: dict[str, Any],
    *,
    stage: str,
    step: int,
    features: dict[str, Any],
    model_sd: dict[str, torch.Tensor] | None = None,
    ema_sd: dict[str, torch.Tensor] | None = None,
    lora: tuple[Any, nn.Module, nn.Module, str] | None = None,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
    info: dict[str, Any] | None = None,
) -> str:
    """Write ``out`` as a training checkpoint folder (atomically: temp folder + rename).

    Full weights (``model_sd``/``ema_sd``) or ``lora`` = (LoraOptions, online model, EMA model,
    base checkpoint) for adapter files with ``lora_base``."""
    from safetensors.torch import save_file

    from training.export import check_new_output
    from training.lora import LORA_FILE, LORA_MODEL_FILE, lora_state_dict, save_lora
    from training.train import EMA_FILE, MODEL_FILE, STATE_FILE

    check_new_output(out, "--out ")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(
        parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{uuid.uuid4().hex[:8]}"
    )
    os.makedirs(tmp)
    try:
        lora_base = None
        if lora is None:
            assert model_sd is not None and ema_sd is not None
            save_file(model_sd, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
            save_file(ema_sd, os.path.join(tmp, EMA_FILE), metadata={"format": "pt"})
        else:
            opts, online, target, lora_base = lora
            meta = {"base": lora_base, "stage": stage, "step": step}
            save_lora(os.path.join(tmp, LORA_MODEL_FILE), lora_state_dict(online), opts, **meta)
            save_lora(os.path.join(tmp, LORA_FILE), lora_state_dict(target), opts, **meta)
        for name, sd in (extra_files or {}).items():
            save_file(sd, os.path.join(tmp, name), metadata={"format": "pt"})
        state = {
            "step": step,
            "stage": stage,
            "config": base_state.get("config"),
            "transformer_config": base_state["transformer_config"],
            "features": features,
            "lora_base": lora_base,
            stage: info or {},
            "tool_version": base_state.get("tool_version"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1, default=str)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_metrics(out: str, losses: list[float]) -> None:
    with open(os.path.join(out, METRICS_FILE), "w") as f:
        for i, v in enumerate(losses):
            f.write(json.dumps({"step": i + 1, "loss": v}) + "\n")


def distill_lcm(
    teacher: str,
    store: str,
    features: str,
    out: str,
    *,
    view: str | None = None,
    config: LcmConfig | None = None,
    progress: bool = False,
) -> tuple[str, list[float]]:
    """Distil ``teacher`` (run / stage / step-N folder) into an LCM student at ``out``; return
    (checkpoint folder, per-step losses)."""
    from training.data import FeatureBatches, make_loader, open_features
    from training.export import load_transformer, open_base
    from training.train import step_generator

    cfg = (config or LcmConfig()).validate()
    ckpt, state = open_base(teacher, "--teacher", out)
    tsettings = state["features"]["settings"]
    multi_scale = bool(tsettings.get("multi_scale"))
    fset = open_features(
        store, features, resolution=int(tsettings["resolution"]), multi_scale=multi_scale, view=view
    )
    teacher_model = load_transformer(ckpt, "ema")
    student, target, opts = make_student(load_transformer(ckpt, "ema"), cfg.lora)
    params = [p for p in student.parameters() if p.requires_grad]
    objective = LcmObjective(
        teacher_model, cfg, fset.null_t5, fset.null_mask, fset.latent_channels, multi_scale
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    data = FeatureBatches(
        fset, cfg.batch_size, seed=cfg.seed, shuffle_buffer=64, caption_dropout=0.0
    )
    batches = iter(make_loader(data))
    losses: list[float] = []
    student.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        gen = step_generator(cfg.seed, 0, step, torch.device("cpu"))
        loss = objective.loss(student, target, next(batches), gen)
        if not torch.isfinite(loss):
            raise RuntimeError(f"LCM loss is not finite at step {step + 1} ({loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(target, student, cfg.ema)
        losses.append(loss.item())
        if progress:
            print(f"[lcm] step {step + 1}/{cfg.steps} loss {losses[-1]:.5f}", flush=True)
    info = {"teacher": os.path.abspath(ckpt), **asdict(cfg),
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    fmeta = {"store": fset.store, "tag": fset.tag, "view": fset.view, "settings": fset.settings}
    if cfg.lora is not None:
        path = write_checkpoint(
            out, state, stage="lcm", step=cfg.steps, features=fmeta, info=info,
            lora=(opts, student, target, os.path.abspath(ckpt)),
        )  # fmt: skip
    else:
        assert isinstance(student, GuidedStudent) and isinstance(target, GuidedStudent)
        guidance = {
            k: v.detach().cpu().contiguous() for k, v in target.guidance.state_dict().items()
        }
        path = write_checkpoint(
            out, state, stage="lcm", step=cfg.steps, features=fmeta, info=info,
            model_sd=student.folded_state_dict(cfg.guidance),
            ema_sd=target.folded_state_dict(cfg.guidance),
            extra_files={GUIDANCE_FILE: guidance},
        )  # fmt: skip
    write_metrics(path, losses)
    return path, losses
