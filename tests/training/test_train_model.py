"""DiT presets and the diffusion loss (no store needed)."""

from __future__ import annotations

import pytest
import torch

from training.diffusion import Diffusion, train_scheduler
from training.model import PRESETS, build_transformer, load_weights, transformer_config


def test_pixart_xl_2_is_pixart_alpha_1024_ms():
    """The preset at 1024 px multi-scale is diffusers' PixArt-XL-2-1024-MS transformer config."""
    from diffusers import PixArtTransformer2DModel

    cfg = transformer_config(
        "pixart-xl-2", resolution=1024, caption_channels=4096, multi_scale=True
    )
    expected = {
        "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2,
        "caption_channels": 4096, "cross_attention_dim": 1152, "in_channels": 4, "out_channels": 8,
        "sample_size": 128, "interpolation_scale": 2.0, "use_additional_conditions": True,
        "norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    }  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    with torch.device("meta"):
        model = PixArtTransformer2DModel(**cfg)
    assert 600e6 < sum(p.numel() for p in model.parameters()) < 620e6  # PixArt-α's 0.6B
    low = transformer_config(
        "pixart-xl-2", resolution=256, caption_channels=4096, learned_sigma=False
    )
    assert (low["sample_size"], low["interpolation_scale"], low["out_channels"]) == (32, 1.0, 4)
    assert low["use_additional_conditions"] is False
    with pytest.raises(
        ValueError, match=r"takes 4096-wide T5 features but the features are 64-wide"
    ):
        transformer_config("pixart-xl-2", resolution=256, caption_channels=64)


def test_pe_interpolation_defaults_to_pixart_alpha_per_resolution():
    """PixArt-α: lewei_scale 1.0 at 256/512, 2.0 at 1024; PixArt-Σ: 0.5 at 256; or a number."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    scale = {
        r: transformer_config("tiny", resolution=r, caption_channels=64)["interpolation_scale"]
        for r in (256, 512, 1024)
    }
    assert scale == {256: 1.0, 512: 1.0, 1024: 2.0}
    sigma = transformer_config("tiny", resolution=256, caption_channels=64, pe_scale="sigma")
    assert sigma["interpolation_scale"] == 0.5
    assert (
        transformer_config("tiny", resolution=512, caption_channels=64, pe_scale=0.75)[
            "interpolation_scale"
        ]
        == 0.75
    )
    # At 256 px with scale 1.0 the grid is PixArt-α's 0..15: the embedding of patch (0, 15).
    model = build_transformer(transformer_config("tiny", resolution=256, caption_channels=64))
    grid = get_2d_sincos_pos_embed(48, 16, base_size=16, interpolation_scale=1.0, output_type="pt")
    assert torch.allclose(model.pos_embed.pos_embed[0], grid.float())
    with pytest.raises(
        ValueError, match=r"pe_interpolation must be a number or one of alpha, sigma"
    ):
        transformer_config("tiny", resolution=256, caption_channels=64, pe_scale="gamma")
    with pytest.raises(ValueError, match=r"pe_interpolation must be a positive number, got 0"):
        transformer_config("tiny", resolution=256, caption_channels=64, pe_scale=0)


def test_tiny_preset_takes_the_features_width_and_pixart_init():
    cfg = transformer_config("tiny", resolution=256, caption_channels=64, multi_scale=True)
    model = build_transformer(cfg)
    assert model.config.caption_channels == 64 and model.config.num_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 1e6
    assert model.proj_out.weight.abs().max() == 0  # zero final layer, as PixArt/DiT
    assert all(b.attn2.to_out[0].weight.abs().max() == 0 for b in model.transformer_blocks)
    x = torch.randn(2, 4, 32, 32)
    out = model(
        x,
        encoder_hidden_states=torch.randn(2, 120, 64),
        encoder_attention_mask=torch.ones(2, 120),
        timestep=torch.tensor([1, 999]),
        added_cond_kwargs={
            "resolution": torch.tensor([[256.0, 256.0]] * 2),
            "aspect_ratio": torch.ones(2, 1),
        },
    ).sample
    assert out.shape == (2, 8, 32, 32)
    assert set(PRESETS) == {"pixart-xl-2", "tiny", "small"}


def test_load_weights_allows_only_new_micro_conditions():
    single = build_transformer(transformer_config("tiny", resolution=256, caption_channels=64))
    multi = build_transformer(
        transformer_config("tiny", resolution=256, caption_channels=64, multi_scale=True)
    )
    fresh = load_weights(multi, single.state_dict(), "single")
    assert fresh and all(k.startswith("adaln_single.emb.") for k in fresh)
    assert torch.equal(multi.proj_out.weight, single.proj_out.weight)
    with pytest.raises(
        ValueError, match=r"weights in multi do not fit the model \(unexpected adaln_single.emb"
    ):
        load_weights(single, multi.state_dict(), "multi")
    other = build_transformer(transformer_config("tiny", resolution=256, caption_channels=32))
    with pytest.raises(ValueError, match=r"shape of caption_projection"):
        load_weights(single, other.state_dict(), "other")


def test_schedule_is_pixarts():
    s = train_scheduler(learned_sigma=True).config
    assert (s.num_train_timesteps, s.beta_schedule, s.beta_start, s.beta_end) == (
        1000,
        "linear",
        1e-4,
        0.02,
    )
    assert s.prediction_type == "epsilon" and s.variance_type == "learned_range"


def test_add_noise_matches_the_scheduler():
    """Same q(x_t | x_0) as diffusers (tables in float64 as IDDPM: ~1e-6 from its float32 cumprod)."""
    d = Diffusion(learned_sigma=False)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(d.add_noise(x0, noise, t), d.scheduler.add_noise(x0, noise, t), atol=2e-5)


def test_loss_without_learned_sigma_is_the_epsilon_mse():
    d = Diffusion(learned_sigma=False)
    x0, noise, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 50, 500])
    loss = d.loss(eps, x0, d.add_noise(x0, noise, t), t, noise)
    assert torch.allclose(loss, (eps - noise).square().mean(dim=(1, 2, 3)))


def test_learned_variance_matches_the_schedulers_learned_range():
    """The model's log-variance is diffusers' DDPMScheduler learned_range variance."""
    d = Diffusion(learned_sigma=True)
    v = torch.rand(1, 4, 2, 2) * 2 - 1
    for t in (1, 30, 700, 999):
        frac = (v + 1) / 2
        ours = frac * d.tables["log_betas"][t] + (1 - frac) * d.tables["post_log_var"][t]
        theirs = d.scheduler._get_variance(t, predicted_variance=v)
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_vlb_term_is_zero_at_the_true_posterior_and_grows_away_from_it():
    d = Diffusion(learned_sigma=True)
    x0, noise = torch.randn(2, 4, 8, 8).clamp(-0.9, 0.9), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    x_t = d.add_noise(x0, noise, t)
    posterior = -torch.ones(2, 4, 8, 8)  # var_values = -1 → the posterior variance
    exact = d.vb_terms(noise, posterior, x0, x_t, t)
    assert torch.allclose(exact, torch.zeros(2), atol=1e-5)
    off = d.vb_terms(noise + 0.3, posterior.abs(), x0, x_t, t)
    assert (off > exact + 1e-4).all()
    # loss = mse + vb, and the vb term trains only the variance channels (mean detached).
    out = torch.cat([noise + 0.1, torch.zeros(2, 4, 8, 8)], 1).requires_grad_(True)
    loss = d.loss(out, x0, x_t, t, noise)
    mse = torch.full((2,), 0.01)
    assert (loss > mse).all()
    loss.sum().backward()
    g_eps = out.grad[:, :4]
    assert torch.allclose(g_eps, torch.full_like(g_eps, 2 * 0.1 / (4 * 8 * 8)), atol=1e-7)
    assert out.grad[:, 4:].abs().sum() > 0


def test_decoder_nll_at_t0():
    d = Diffusion(learned_sigma=True)
    x0 = torch.rand(1, 4, 4, 4) * 1.8 - 0.9
    t = torch.tensor([0])
    good = d.vb_terms(torch.zeros_like(x0), -torch.ones_like(x0), x0, x0, t)
    assert torch.isfinite(good).all() and good.item() > 0  # bits/dim of the discretised decoder
