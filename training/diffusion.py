"""The noise schedule and the training loss, on diffusers' schedulers; a small sampler for
validation images.

The schedule is diffusers' ``DDPMScheduler`` with PixArt's settings (1000 steps, linear betas
1e-4 … 0.02, epsilon prediction). With ``learned_sigma`` the DiT outputs 8 channels: 4 for the
noise and 4 interpolating the log-variance between the posterior variance and beta_t (IDDPM's
"learned range"), and the loss adds IDDPM's variational bound term with the mean detached, as
PixArt and DiT train (``loss = mse(eps) + vb``, vb in bits per dimension, the decoder NLL at
t = 0). All the quantities come from the scheduler's betas, computed in float64 as IDDPM does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def train_scheduler(learned_sigma: bool) -> Any:
    """PixArt's training noise schedule as a diffusers DDPMScheduler (also what IDDPM samples with)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=BETA_START,
        beta_end=BETA_END,
        prediction_type="epsilon",
        variance_type="learned_range" if learned_sigma else "fixed_small",
        clip_sample=False,
    )


def inference_scheduler() -> Any:
    """PixArt-α's default sampler as its diffusers release configures it: DPM-Solver++ (2M)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=BETA_START,
        beta_end=BETA_END,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
    )


class Diffusion:
    """Forward process and per-sample loss for a batch; tables live on ``device``."""

    def __init__(self, learned_sigma: bool, device: torch.device | str = "cpu"):
        self.learned_sigma = learned_sigma
        self.scheduler = train_scheduler(learned_sigma)
        betas = self.scheduler.betas.to(torch.float64)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "sqrt_ac": ac.sqrt(),
            "sqrt_1m_ac": (1.0 - ac).sqrt(),
            "sqrt_recip_ac": (1.0 / ac).sqrt(),
            "sqrt_recipm1_ac": (1.0 / ac - 1.0).sqrt(),
            # log of the posterior variance, clipped at t=0 where it is 0 (IDDPM)
            "post_log_var": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "log_betas": betas.log(),
            "post_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "post_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        self.tables = {k: v.to(device=device, dtype=torch.float32) for k, v in tables.items()}
        self.num_timesteps = NUM_TRAIN_TIMESTEPS

    def _at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.tables[name][t].view(-1, *([1] * (ndim - 1)))  # (N, 1, 1, 1)

    def sample_timesteps(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (the scheduler's add_noise, fp32)."""
        return self._at("sqrt_ac", t, x0.ndim) * x0 + self._at("sqrt_1m_ac", t, x0.ndim) * noise

    def loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample loss (N,): MSE on ε, plus the VLB term when the variance is learned."""
        c = x0.shape[1]
        model_output = model_output.float()
        eps = model_output[:, :c]  # (N, C, H, W)
        mse = (noise - eps).square().mean(dim=(1, 2, 3))
        if not self.learned_sigma:
            return mse
        if model_output.shape[1] != 2 * c:
            raise ValueError(
                f"learned sigma needs {2 * c} output channels, the model gives {model_output.shape[1]}"
            )
        # The VLB term trains only the variance: the mean comes from a detached ε.
        return mse + self.vb_terms(eps.detach(), model_output[:, c:], x0, x_t, t)

    def vb_terms(
        self,
        eps: torch.Tensor,
        var_values: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) in bits/dim, the decoder NLL at t = 0: (N,)."""
        n = x0.ndim
        # p(x_{t-1} | x_t): learned-range log variance, mean through the predicted x_0
        min_log = self._at("post_log_var", t, n)
        max_log = self._at("log_betas", t, n)
        frac = (var_values + 1.0) / 2.0
        model_log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_ac", t, n) * x_t - self._at("sqrt_recipm1_ac", t, n) * eps
        model_mean = self._at("post_coef1", t, n) * pred_x0 + self._at("post_coef2", t, n) * x_t
        # q(x_{t-1} | x_t, x_0)
        true_mean = self._at("post_coef1", t, n) * x0 + self._at("post_coef2", t, n) * x_t
        true_log_var = self._at("post_log_var", t, n)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(
            dim=(1, 2, 3)
        ) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL divergence between two diagonal Gaussians, elementwise (nats)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2).square() * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of data discretised to 256 bins on [-1, 1] under N(means, exp(log_scales)²) (nats)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    latent_hw: tuple[int, int],
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    micro: dict[str, torch.Tensor] | None = None,
    latent_channels: int = 4,
) -> torch.Tensor:
    """Classifier-free-guided DPM-Solver++ sampling for validation images: latents (N, C, h, w)."""
    scheduler = inference_scheduler()
    device = embeds.device
    n = embeds.shape[0]
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn((n, latent_channels, *latent_hw), generator=generator, device=device)
    latents = latents * scheduler.init_noise_sigma
    cond = torch.cat([null_embeds.expand(n, -1, -1), embeds])  # (2N, L, D)
    cond_mask = torch.cat([null_mask.expand(n, -1), mask])  # (2N, L)
    added = {k: torch.cat([v, v]) for k, v in micro.items()} if micro else None
    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents])
        out = transformer(
            x_in,
            encoder_hidden_states=cond,
            encoder_attention_mask=cond_mask,
            timestep=t.expand(2 * n),
            added_cond_kwargs=added,
        ).sample[:, :latent_channels]
        uncond, text = out.float().chunk(2)
        eps = uncond + guidance_scale * (text - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents
