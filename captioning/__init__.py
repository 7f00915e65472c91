"""captioning: dense captions from vision-language models (LLaVA and any transformers
image-text-to-text model), run as Ray actors over store shards → STORE/captions/<tag>/."""
