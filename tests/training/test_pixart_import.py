"""PixArt-α/δ ``.pth`` → diffusers: tiny random checkpoints in PixArt's own key layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.model import load_weights, transformer_from_config
from training.pixart_import import PixArtCheckpointError, import_pixart, read_pth


def pixart_layout(
    layers=2, hidden=48, patch=2, caption=64, out=8, res=256, ms=False, token_num=120
) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of PixArt's ``PixArt`` / ``PixArtMS`` modules (diffusion/model/nets),
    written from its module tree: PatchEmbed, TimestepEmbedder, t_block, CaptionEmbedder (with the
    ``y_embedding`` buffer), PixArtBlock × N, T2IFinalLayer, the ``pos_embed`` buffer, and for MS
    the csize/ar SizeEmbedders (hidden/3 each)."""
    d = hidden
    side = res // 8 // patch
    shapes = {
        "pos_embed": (1, side * side, d),
        "x_embedder.proj.weight": (d, 4, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "t_block.1.weight": (6 * d, d),
        "t_block.1.bias": (6 * d,),
        "y_embedder.y_embedding": (token_num, caption),
        "y_embedder.y_proj.fc1.weight": (d, caption),
        "y_embedder.y_proj.fc1.bias": (d,),
        "y_embedder.y_proj.fc2.weight": (d, d),
        "y_embedder.y_proj.fc2.bias": (d,),
        "final_layer.scale_shift_table": (2, d),
        "final_layer.linear.weight": (patch * patch * out, d),
        "final_layer.linear.bias": (patch * patch * out,),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "scale_shift_table": (6, d),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "cross_attn.q_linear.weight": (d, d), b + "cross_attn.q_linear.bias": (d,),
            b + "cross_attn.kv_linear.weight": (2 * d, d), b + "cross_attn.kv_linear.bias": (2 * d,),
            b + "cross_attn.proj.weight": (d, d), b + "cross_attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
        })  # fmt: skip
    if ms:
        for name in ("csize_embedder", "ar_embedder"):
            shapes.update({
                f"{name}.mlp.0.weight": (d // 3, 256), f"{name}.mlp.0.bias": (d // 3,),
                f"{name}.mlp.2.weight": (d // 3, d // 3), f"{name}.mlp.2.bias": (d // 3,),
            })  # fmt: skip
    return shapes


def random_pth(path, key="state_dict", seed=0, **layout) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in pixart_layout(**layout).items()}
    torch.save({key: sd} if key else sd, path)
    return sd


def pixart_cross_attention(x, cond, sd, i, heads):
    """PixArt's MultiHeadCrossAttention on its fused weights: q, kv = kv_linear(c).view(…, 2, H, hd)."""
    b = f"blocks.{i}.cross_attn."
    B, N, C = x.shape
    q = F.linear(x, sd[b + "q_linear.weight"], sd[b + "q_linear.bias"]).view(B, N, heads, -1)
    kv = F.linear(cond, sd[b + "kv_linear.weight"], sd[b + "kv_linear.bias"])
    k, v = kv.view(B, cond.shape[1], 2, heads, -1).unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    o = o.transpose(1, 2).reshape(B, N, C)
    return F.linear(o, sd[b + "proj.weight"], sd[b + "proj.bias"])


def pixart_self_attention(x, sd, i, heads):
    """PixArt's WindowAttention on its fused weights: qkv(x).reshape(B, N, 3, H, hd)."""
    b = f"blocks.{i}.attn."
    B, N, C = x.shape
    qkv = F.linear(x, sd[b + "qkv.weight"], sd[b + "qkv.bias"]).reshape(B, N, 3, heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    return F.linear(o, sd[b + "proj.weight"], sd[b + "proj.bias"])


@pytest.mark.parametrize(
    "res, ms, pe", [(256, False, 1.0), (512, False, 1.0), (512, True, 1.0), (1024, True, 2.0)]
)
def test_pixart_pth_converts_and_loads_strictly(tmp_path, res, ms, pe):
    path = tmp_path / "PixArt-tiny.pth"
    sd = random_pth(path, res=res, ms=ms)
    got = import_pixart(read_pth(str(path)))
    assert (got.resolution, got.multi_scale) == (res, ms)
    cfg = got.config
    assert cfg["interpolation_scale"] == pe and cfg["sample_size"] == res // 8
    assert cfg["use_additional_conditions"] is ms and cfg["out_channels"] == 8
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["caption_channels"]) == (2, 2, 64)
    assert torch.equal(got.y_embedding, sd["y_embedder.y_embedding"])  # PixArt's null, kept
    model = transformer_from_config(cfg).eval()
    assert load_weights(model, got.state_dict, "tiny .pth") == []  # every tensor, no extras
    blk = model.transformer_blocks[1]
    x, c = torch.randn(2, 9, 48), torch.randn(2, 7, 48)
    with torch.no_grad():
        assert torch.allclose(blk.attn2(x, encoder_hidden_states=c), pixart_cross_attention(x, c, sd, 1, 2), atol=1e-5)  # fmt: skip
        assert torch.allclose(blk.attn1(x), pixart_self_attention(x, sd, 1, 2), atol=1e-5)
    assert torch.equal(model.scale_shift_table, sd["final_layer.scale_shift_table"])
    assert torch.equal(model.adaln_single.linear.weight, sd["t_block.1.weight"])
    if ms:
        emb = model.adaln_single.emb
        assert torch.equal(
            emb.aspect_ratio_embedder.linear_2.weight, sd["ar_embedder.mlp.2.weight"]
        )
        assert torch.equal(emb.resolution_embedder.linear_1.bias, sd["csize_embedder.mlp.0.bias"])
    out = model(
        torch.randn(1, 4, res // 8, res // 8),
        encoder_hidden_states=torch.randn(1, 120, 64),
        timestep=torch.tensor([10]),
        added_cond_kwargs={
            "resolution": torch.tensor([[res, res]]),
            "aspect_ratio": torch.ones(1, 1),
        },
    ).sample
    assert out.shape == (1, 8, res // 8, res // 8) and torch.isfinite(out).all()


def test_ema_weights_bare_dicts_and_overrides(tmp_path):
    path = tmp_path / "train.pth"
    sd = random_pth(path, key="ema", seed=1)
    with pytest.raises(PixArtCheckpointError, match="not a PixArt transformer checkpoint"):
        read_pth(str(path))  # the file holds only "ema": no "state_dict", not a bare dict
    assert torch.equal(read_pth(str(path), "ema")["t_block.1.bias"], sd["t_block.1.bias"])
    bare = tmp_path / "bare.pth"
    sd = random_pth(bare, key=None)
    del sd["pos_embed"]
    torch.save(sd, bare)
    with pytest.raises(PixArtCheckpointError, match="give its resolution"):
        import_pixart(read_pth(str(bare)))
    got = import_pixart(read_pth(str(bare)), resolution=256, pe_scale="sigma")
    assert got.config["interpolation_scale"] == 0.5


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(PixArtCheckpointError, match="no such checkpoint file"):
        read_pth(str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(PixArtCheckpointError, match="not a loadable .pth"):
        read_pth(str(junk))
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, other)
    with pytest.raises(PixArtCheckpointError, match="not a PixArt transformer checkpoint"):
        read_pth(str(other))
    sd = pixart_layout()
    odd = {k: torch.zeros(s) for k, s in sd.items()} | {"blocks.0.attn.rel_pos_h": torch.zeros(3)}
    with pytest.raises(
        PixArtCheckpointError, match=r"unknown PixArt tensor\(s\) blocks.0.attn.rel_pos_h"
    ):
        import_pixart(odd)
    wide = {k: torch.zeros(s) for k, s in pixart_layout(hidden=60).items()}
    with pytest.raises(PixArtCheckpointError, match="no preset has 2 layers of width 60"):
        import_pixart(wide)
