"""captioning: dense captions from vision-language models (LLaVA and any transformers
image-text-to-text model), run as Ray actors over store shards → STORE/captions/<tag>/.

`models` presets and the random-weight LLaVA builders, `captioner` the model wrapper (load, batch
generate, clean), `worker` the shard worker, `run` the library entry `caption_store`, `cli` the
`alphaset caption` command.
"""
