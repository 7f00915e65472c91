"""Fixtures for the app tests: the demo's store (its photos, ingested, captioned, scored, deduped,
with the demo's view) and a tiny diffusers export with a LoRA adapter and a ControlNet for it,
built once per session; one `alphaset app` server on a free loopback port shared by the tests.

The store is built by the demo's own steps (`pipeline.demo.write_demo_photos`, then the stage
functions the demo calls) without Ray; the export is a `PixArtAlphaPipeline` of the tiny DiT preset
with the tiny T5 and VAE, saved with ``save_pretrained`` as `alphaset export` writes one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from ports import free_port

BYTES_COPY = "coffee_copy"  # a byte copy of the coffee photo: an exact duplicate group


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> str:
    from captioning.run import caption_store
    from curation.dedup import DedupConfig, dedup_store
    from curation.score import ScoreConfig, score_store
    from pipeline.demo import DEMO_VIEW, write_demo_photos
    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store
    from pipeline.views import create_view

    root = tmp_path_factory.mktemp("app-demo")
    photos = root / "photos"
    write_demo_photos(photos)
    shutil.copy(photos / "cup" / "coffee.jpg", photos / "cup" / f"{BYTES_COPY}.jpg")
    store = Store(str(root / "store"))
    ingest_folder(
        store, str(photos), label_from_dir=True, progress=False, shard_size=4, max_side=256
    )
    s = caption_store(
        store.root, "tiny", max_new_tokens=8, batch_size=4, use_ray=False, progress=False
    )
    assert s.ok, s.lines()
    s = score_store(
        store, ScoreConfig(clip="tiny", batch_size=8, decode_workers=1), use_ray=False,
        progress=False,
    )  # fmt: skip
    assert s.ok, s.lines()
    dedup_store(store, DedupConfig(semantic=False))
    create_view(store, "best", DEMO_VIEW)
    return store.root


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> dict[str, str]:
    """A tiny 256 px export, a LoRA adapter file (non-zero B, so it changes images) and a
    ControlNet file for it."""
    import torch
    from diffusers import PixArtAlphaPipeline

    from training.controlnet import ControlNetTransformer, save_controlnet
    from training.diffusion import inference_scheduler
    from training.feature_models import load_t5, tiny_vae_model
    from training.lora import LoraOptions, add_lora, lora_state_dict, save_lora
    from training.model import build_transformer, transformer_config

    root = tmp_path_factory.mktemp("app-export")
    text_encoder, tokenizer = load_t5("tiny", torch.float32, "cpu")
    cfg = transformer_config("tiny", resolution=256, caption_channels=text_encoder.config.d_model)
    transformer = build_transformer(cfg, seed=0)
    torch.manual_seed(1)
    for p in transformer.parameters():  # PixArt's init zeroes the output: make it depend on input
        p.data.normal_(0, 0.05)
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae_model(),
        transformer=transformer,
        scheduler=inference_scheduler(),
    )
    export = root / "export"
    pipe.save_pretrained(export)

    opts = LoraOptions(rank=2, alpha=2.0)
    adapted = add_lora(build_transformer(cfg, seed=0), opts)
    for name, p in adapted.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.5)
    lora = save_lora(str(root / "lora.safetensors"), lora_state_dict(adapted), opts)

    net = ControlNetTransformer(transformer, 1)
    for name, p in net.named_parameters():
        if not name.startswith("base."):
            p.data.normal_(0, 0.05)
    controlnet = save_controlnet(str(root / "controlnet.safetensors"), net)
    return {"export": str(export), "lora": lora, "controlnet": controlnet}


@pytest.fixture(scope="session")
def app_server(demo_store, tiny_export, tmp_path_factory):
    """``alphaset app`` on the demo store and the tiny export, as a user starts it, on a free
    loopback port; yields its URL. One process for every test that talks to a server."""
    port = free_port()
    log = tmp_path_factory.mktemp("app-log") / "server.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(log.parent / "gradio"),  # served files stay in the test's tmp
    }
    cmd = [
        sys.executable, "-m", "pipeline.cli", "app", "--store", demo_store, "--checkpoint",
        tiny_export["export"], "--controlnet", tiny_export["controlnet"], "--hed", "tiny",
        "--port", str(port), "--device", "cpu",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"alphaset app exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"alphaset app did not start in 180 s:\n{log.read_text()}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, f"the server logged a traceback:\n{text}"


@pytest.fixture(scope="session")
def client(app_server):
    from gradio_client import Client

    return Client(app_server, verbose=False)


@pytest.fixture(scope="session")
def explorer(demo_store):
    from pipeline.app.explore import Explorer

    return Explorer(demo_store)
