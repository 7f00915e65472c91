"""Real-size architectures (random weights) the GPU benchmarks build, and their tiny CPU twins."""

T5_XXL = dict(
    d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, feed_forward_proj="gated-gelu",
    vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215,
)  # fmt: skip
TINY_T5 = dict(T5_XXL, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128)
TINY_VAE = dict(SD_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
