"""training: the PixArt DiT trainer on feature shards (stage after stage), sampling, fine-tuning
and export to diffusers."""
