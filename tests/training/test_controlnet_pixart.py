"""ControlNet as PixArt-δ's ControlPixArtHalf wires it, and its released weights' key layout."""

from __future__ import annotations

import pytest
import torch

from pipeline.cli import UserError
from training.controlnet import ControlNetTransformer, load_control_state
from training.model import build_transformer, load_weights, transformer_config
from training.pixart_import import pixart_controlnet_state_dict

pytest_plugins = ["conftest_train"]


def _base(layers: int = 4):
    cfg = transformer_config("tiny", resolution=256, caption_channels=64)
    cfg["num_layers"] = layers
    base = build_transformer(cfg).eval()
    for p in base.parameters():  # non-zero everywhere, so every path shows in the output
        p.data.normal_(0, 0.05)
    return base


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 120, 64, generator=g),
        encoder_attention_mask=torch.ones(2, 120),
        timestep=torch.tensor([10, 700]),
    ), torch.randn(2, 4, 16, 16, generator=g)


@torch.no_grad()
def pixart_half_forward(
    net: ControlNetTransformer, inp: dict, control: torch.Tensor
) -> torch.Tensor:
    """ControlPixArtHalf.forward, step by step: base block 0; copy 0 on (its output +
    before_proj(embedded control)); base block i+1 on (x + after_proj[i](copy i)); the rest."""
    b = net.base
    x = b.pos_embed(inp["hidden_states"])
    t, emb = b.adaln_single(inp["timestep"], None, batch_size=2, hidden_dtype=x.dtype)
    y = b.caption_projection(inp["encoder_hidden_states"])
    mask = ((1 - inp["encoder_attention_mask"]) * -10000.0).unsqueeze(1)
    kw = dict(encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t)
    x = b.transformer_blocks[0](x, **kw)
    c = b.pos_embed(control)  # the base's own x_embedder + positional embedding
    for i in range(net.blocks):
        c = net.copies[i](x + net.before_proj(c) if i == 0 else c, **kw)
        x = b.transformer_blocks[i + 1](x + net.after_proj[i](c), **kw)
    for block in b.transformer_blocks[net.blocks + 1 :]:
        x = block(x, **kw)
    shift, scale = (b.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
    x = b.proj_out(b.norm_out(x) * (1 + scale) + shift)
    x = x.reshape(2, 8, 8, 2, 2, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(2, -1, 16, 16)


def test_wiring_is_pixart_deltas_and_zero_init_is_the_base():
    base = _base()
    net = ControlNetTransformer(base, blocks=2).eval()
    inp, control = _inputs()
    with torch.no_grad():
        assert torch.allclose(net(**inp, control=control).sample, base(**inp).sample, atol=1e-6)
        for p in [*net.before_proj.parameters(), *net.after_proj.parameters()]:
            p.normal_(0, 0.2)
        got = net(**inp, control=control).sample
        assert not torch.allclose(got, base(**inp).sample, atol=1e-3)
    assert torch.allclose(got, pixart_half_forward(net, inp, control), atol=1e-5)
    with pytest.raises(UserError, match=r"blocks must be 1-3 \(the base has 4 blocks\), got 4"):
        ControlNetTransformer(_base(), blocks=4)


def test_released_controlnet_weights_map_onto_the_module():
    from test_pixart_import import pixart_layout

    g = torch.Generator().manual_seed(1)
    base_sd = {k: torch.randn(s, generator=g) for k, s in pixart_layout(layers=4).items()}
    sd = {f"base_model.{k}": v for k, v in base_sd.items()}
    for i in range(2):  # ControlT2IDitBlockHalf i: copied_block (a PixArtBlock), projections
        for k, v in base_sd.items():
            if k.startswith("blocks.0."):
                sd[f"controlnet.{i}.copied_block.{k[len('blocks.0.') :]}"] = torch.randn(
                    v.shape, generator=g
                )
        sd[f"controlnet.{i}.after_proj.weight"] = torch.randn(48, 48, generator=g)
        sd[f"controlnet.{i}.after_proj.bias"] = torch.randn(48, generator=g)
    sd["controlnet.0.before_proj.weight"] = torch.randn(48, 48, generator=g)
    sd["controlnet.0.before_proj.bias"] = torch.randn(48, generator=g)
    base_state, control, n = pixart_controlnet_state_dict(sd)
    assert n == 2
    base = _base()
    assert load_weights(base, base_state, "base_model") == []
    net = ControlNetTransformer(base, blocks=n)
    load_control_state(net, control, "pixart-delta")  # raises on any missing / unexpected tensor
    q, k, v = sd["controlnet.1.copied_block.attn.qkv.weight"].chunk(3)
    assert torch.equal(net.copies[1].attn1.to_v.weight, v)
    kv = sd["controlnet.0.copied_block.cross_attn.kv_linear.bias"].chunk(2)
    assert torch.equal(net.copies[0].attn2.to_k.bias, kv[0])
    assert torch.equal(net.before_proj.weight, sd["controlnet.0.before_proj.weight"])
    assert torch.equal(net.after_proj[1].bias, sd["controlnet.1.after_proj.bias"])
    bad = dict(sd, **{"controlnet.1.before_proj.bias": torch.zeros(48)})
    with pytest.raises(ValueError, match="before_proj on copy 1"):
        pixart_controlnet_state_dict(bad)


def test_control_latent_is_a_posterior_sample_and_the_recipe_is_pixart_deltas(
    trained_run, train_store, kit, tmp_path
):
    import io

    import numpy as np
    from PIL import Image

    from training.controlnet import ControlNetObjective
    from training.feature_models import load_vae
    from training.recipes import controlnet_config

    cfg = controlnet_config(
        train_store, str(trained_run / "align"), kit.TAG, "hed", str(tmp_path / "cn"), blocks=1
    )
    stage = cfg.stages[0]
    assert (stage.caption_dropout, stage.grad_clip, stage.weight_decay) == (0.5, 0.01, 0.03)
    obj = ControlNetObjective(cfg, stage, torch.device("cpu"))
    png = io.BytesIO()
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).save(png, format="PNG")
    obj.pngs, obj.cache = {"k": png.getvalue()}, {}
    obj.vae, obj.scale, obj.factor = load_vae("tiny", torch.float32, "cpu"), 0.18215, 8
    mean = obj.control(["k"], (32, 32))  # no generator: the posterior mean
    a = obj.control(["k"], (32, 32), torch.Generator().manual_seed(0))
    b = obj.control(["k"], (32, 32), torch.Generator().manual_seed(1))
    again = obj.control(["k"], (32, 32), torch.Generator().manual_seed(0))
    assert torch.equal(a, again) and not torch.equal(a, b) and not torch.equal(a, mean)
    std = obj.cache["k", 32, 32][1] * 0.18215
    assert torch.allclose((a - mean).abs().mean(), (std * 0.7979).mean(), rtol=0.2)  # E|N(0,σ)|


def test_hed_has_the_controlnet_hed_apache2_layout(tmp_path):
    """A state dict in ControlNetHED.pth's layout (norm, block1-5 convs + projection) loads with
    --hed FILE (torch.load weights_only) and gives sigmoid(mean of the five side maps)."""
    import numpy as np

    from training.hed import HED, edge_map, load_hed

    widths, convs = (64, 128, 256, 512, 512), (2, 2, 3, 3, 3)
    g = torch.Generator().manual_seed(0)
    sd = {"norm": torch.rand(1, 3, 1, 1, generator=g) * 120}
    c_in = 3
    for b, (w, n) in enumerate(zip(widths, convs, strict=True), start=1):
        for j in range(n):
            sd[f"block{b}.convs.{j}.weight"] = (
                torch.randn(w, c_in if j == 0 else w, 3, 3, generator=g) * 0.01
            )
            sd[f"block{b}.convs.{j}.bias"] = torch.randn(w, generator=g) * 0.01
        sd[f"block{b}.projection.weight"] = torch.randn(1, w, 1, 1, generator=g) * 0.1
        sd[f"block{b}.projection.bias"] = torch.randn(1, generator=g)
        c_in = w
    assert set(sd) == set(HED().state_dict())
    torch.save(sd, tmp_path / "ControlNetHED.pth")
    hed = load_hed(str(tmp_path / "ControlNetHED.pth"))
    assert torch.equal(hed.block4.convs[2].weight, sd["block4.convs.2.weight"])
    rgb = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    sides, h = [], x - sd["norm"]  # the annotator's forward, written out
    for b in range(1, 6):
        if b > 1:
            h = torch.nn.functional.max_pool2d(h, 2, 2)
        for j in range(convs[b - 1]):
            h = torch.relu(
                torch.nn.functional.conv2d(
                    h, sd[f"block{b}.convs.{j}.weight"], sd[f"block{b}.convs.{j}.bias"], padding=1
                )
            )
        p = torch.nn.functional.conv2d(
            h, sd[f"block{b}.projection.weight"], sd[f"block{b}.projection.bias"]
        )
        sides.append(
            torch.nn.functional.interpolate(p, (64, 48), mode="bilinear", align_corners=False)
        )
    want = (torch.sigmoid(torch.cat(sides, 1).mean(1))[0] * 255).round().byte().numpy()
    assert np.abs(edge_map(hed, rgb).astype(int) - want.astype(int)).max() <= 1


def test_import_a_pixart_delta_controlnet_pth(tmp_path):
    """`alphaset import pixart` on a ControlNet .pth: the base folder + controlnet.safetensors,
    which `load_controlnet` puts on the imported base."""
    from diffusers import PixArtTransformer2DModel
    from test_pixart_import import pixart_layout

    from pipeline.cli import main
    from training.controlnet import load_controlnet

    g = torch.Generator().manual_seed(2)
    base_sd = {k: torch.randn(s, generator=g) for k, s in pixart_layout(layers=4).items()}
    sd = {f"base_model.{k}": v for k, v in base_sd.items()}
    for k, v in base_sd.items():
        if k.startswith("blocks.0."):
            sd[f"controlnet.0.copied_block.{k[len('blocks.0.') :]}"] = torch.randn(
                v.shape, generator=g
            )
    sd |= {"controlnet.0.before_proj.weight": torch.randn(48, 48, generator=g),
           "controlnet.0.before_proj.bias": torch.randn(48, generator=g),
           "controlnet.0.after_proj.weight": torch.randn(48, 48, generator=g),
           "controlnet.0.after_proj.bias": torch.randn(48, generator=g)}  # fmt: skip
    torch.save({"state_dict": sd}, tmp_path / "PixArt-XL-2-512-ControlNet.pth")
    out = tmp_path / "imported"
    assert (
        main(
            [
                "import",
                "pixart",
                str(tmp_path / "PixArt-XL-2-512-ControlNet.pth"),
                "--out",
                str(out),
                "--heads",
                "2",
            ]
        )
        == 0
    )
    base = PixArtTransformer2DModel.from_pretrained(str(out))
    net = load_controlnet(base, str(out / "controlnet.safetensors"))
    assert net.blocks == 1
    assert torch.equal(net.after_proj[0].weight, sd["controlnet.0.after_proj.weight"])
    assert torch.equal(base.proj_out.bias, sd["base_model.final_layer.linear.bias"])
