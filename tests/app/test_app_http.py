"""`alphaset app` over HTTP (gradio_client), no browser: the Generate handlers give the images
`alphaset sample` gives, the Explore handlers give the rows of the store, and every bad input is
a one-line message while the server keeps serving."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.sample import SAMPLERS, sample

PROMPT = "a photo of a cat"
ALL = "(every row)"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The server runs with one intra-op thread; the reference images here too, so float sums
    are reduced in the same order and the images are bit-identical."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(client, sampler="dpm", steps=2, seed=3, lora=None, scale=1.0, control=None,
         kind="edge map", prompt=PROMPT, more="", n=1, cfg=None, size="256x256"):  # fmt: skip
    from gradio_client import handle_file

    return client.predict(
        prompt, more, sampler, steps, SAMPLERS[sampler].cfg if cfg is None else cfg, seed,
        size, n, handle_file(lora) if lora else None, scale,
        handle_file(control) if control else None, kind, api_name="/generate",
    )  # fmt: skip


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generate_is_alphaset_sample(client, tiny_export, name):
    """Each sampler: the image the app shows is the image `alphaset sample` makes with the same
    seed and settings (the same code path), with its settings beside it."""
    steps = 2
    gallery, edges, record = _gen(client, name, steps=steps, seed=11)
    assert len(gallery) == 1 and edges is None
    assert gallery[0]["caption"] == f"{PROMPT} · {name} {steps} steps · cfg {SAMPLERS[name].cfg:g} · seed 11 · 256x256"  # fmt: skip
    assert record["sampler"] == name and record["seed"] == 11 and record["size"] == [256, 256]
    ref = sample(tiny_export["export"], [PROMPT], sampler=name, steps=steps, seed=11,
                 size="256x256", device="cpu")  # fmt: skip
    assert np.array_equal(_pixels(gallery[0]["image"]), np.asarray(ref.images[0]))


def test_sampler_defaults_and_several_prompts(client):
    for name, s in SAMPLERS.items():
        assert client.predict(name, api_name="/sampler_defaults") == (s.steps, s.cfg)
    gallery, _, record = _gen(client, more="a red car\n\n a boat ", n=2, seed=5)
    assert [g["caption"].split(" · ")[0] for g in gallery] == [
        PROMPT, PROMPT, "a red car", "a red car", "a boat", "a boat"
    ]  # fmt: skip
    assert [i["seed"] for i in record["images"]] == [5, 6, 7, 8, 9, 10]
    first = _pixels(gallery[0]["image"])
    assert not np.array_equal(first, _pixels(gallery[1]["image"]))  # seed 5 vs 6
    again, _, _ = _gen(client, seed=5)
    assert np.array_equal(first, _pixels(again[0]["image"]))  # the seed reproduces it


def test_requests_are_queued_not_concurrent(client):
    """A second request while one runs waits in the queue: never two on the model at once."""
    from pipeline.app.ui import build_app

    fns = build_app(None, None).fns.values()
    assert [(f.concurrency_limit, f.concurrency_id) for f in fns if f.api_name == "generate"] == [
        (1, "model")
    ]
    args = (PROMPT, "", "dpm", 4, 4.5)
    rest = ("256x256", 1, None, 1.0, None, "edge map")
    jobs = [client.submit(*args, seed, *rest, api_name="/generate") for seed in (1, 2)]
    records = sorted((j.result()[2] for j in jobs), key=lambda r: r["started"])
    assert sorted(r["seed"] for r in records) == [1, 2]
    assert records[0]["finished"] <= records[1]["started"]  # one after the other


def test_low_vram_is_passed_through(tiny_export):
    """--low-vram: `generate`'s path that frees T5; the next request loads the model again and
    gives the same image (the one `alphaset sample --low-vram` gives)."""
    from pipeline.app.generate import Studio, settings_from_form

    studio = Studio(tiny_export["export"], device="cpu", low_vram=True)
    settings = settings_from_form("dpm", 2, None, 4, "256x256", 1, studio.low_vram)
    first = studio.run([PROMPT], settings).images[0]
    assert studio.model.pipe.text_encoder is None  # freed, as sample --low-vram does
    second = studio.run([PROMPT], settings).images[0]
    ref = sample(tiny_export["export"], [PROMPT], steps=2, seed=4, size="256x256", device="cpu",
                 low_vram=True)  # fmt: skip
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert np.array_equal(np.asarray(first), np.asarray(ref.images[0]))


def test_lora_and_controlnet_apply_per_request(client, tiny_export):
    base, _, _ = _gen(client, seed=2)
    lora, _, rec = _gen(client, seed=2, lora=tiny_export["lora"], scale=0.8)
    assert rec["lora"].endswith(":0.8")
    ref = sample(tiny_export["export"], [PROMPT], steps=2, seed=2, size="256x256", device="cpu",
                 lora=f"{tiny_export['lora']}:0.8")  # fmt: skip
    assert np.array_equal(_pixels(lora[0]["image"]), np.asarray(ref.images[0]))
    assert not np.array_equal(_pixels(lora[0]["image"]), _pixels(base[0]["image"]))
    # An uploaded photo becomes an HED edge map, which conditions the ControlNet.
    photo = Path(tiny_export["export"]).parent / "photo.png"
    Image.fromarray((np.indices((96, 128)).sum(0) % 32 * 8).astype(np.uint8)).save(photo)
    ctl, edges, rec = _gen(client, seed=2, control=str(photo), kind="photo → HED edges")
    assert rec["controlnet"] == tiny_export["controlnet"]
    assert Image.open(edges).size == (128, 96)
    assert not np.array_equal(_pixels(ctl[0]["image"]), _pixels(base[0]["image"]))
    after, _, rec = _gen(client, seed=2)  # neither stays on the model
    assert rec["lora"] is None and rec["controlnet"] is None
    assert np.array_equal(_pixels(after[0]["image"]), _pixels(base[0]["image"]))


def test_generate_bad_input_is_one_line(client, tmp_path):
    from gradio_client.exceptions import AppError

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        ({"seed": 2**70}, "seed must be 0"),
        ({"seed": -1}, "seed must be 0"),
        ({"prompt": "  "}, "type a prompt"),
        ({"steps": 1}, "--steps must be 2-1000 for dpm"),
        ({"n": 9, "more": "b"}, "more than 16 images"),
        ({"control": str(text)}, "the edge image 'notes.png' is not an image"),
        ({"control": str(text), "kind": "photo → HED edges"}, "the photo 'notes.png' is not an image"),
        ({"lora": str(text)}, "not a safetensors file"),
    ]  # fmt: skip
    for kw, message in cases:
        with pytest.raises(AppError, match=message) as e:
            _gen(client, **kw)
        assert "Traceback" not in str(e.value) and "\n" not in str(e.value).strip()
    assert len(_gen(client)[0]) == 1  # still serving


def test_explore_grid_filter_and_pages(client, explorer):
    from gradio_client.exceptions import AppError

    grid, page, info = client.predict(ALL, "", api_name="/explore")
    assert len(grid) == explorer.total_rows == 14 and page == 1
    assert "every row: 14 rows" in info
    error_cells = [g for g in grid if "error: truncated" in g["caption"]]
    assert len(error_cells) == 1  # the demo's truncated JPEG, with its reason
    cat = [g for g in grid if g["caption"].startswith("chelsea-")][0]["caption"]
    assert "aesthetic" in cat and "[tiny]" in cat and "x" in cat.split(" · ")[1]

    grid, _, info = client.predict(ALL, "label = 'cat'", api_name="/explore")
    assert [g["caption"].split(" · ")[0].split("-")[0] for g in grid] == ["chelsea"]
    grid, _, info = client.predict("best", "", api_name="/explore")
    best = pq.read_table(Path(explorer.store.root) / "views" / "best.parquet")
    assert len(grid) == best.num_rows and f"view best: {best.num_rows} rows" in info
    with pytest.raises(AppError, match="unknown column 'nope'.*columns: key, shard"):
        client.predict(ALL, "nope > 1", api_name="/explore")
    with pytest.raises(AppError, match="bad --where expression"):
        client.predict(ALL, "width >>> 3", api_name="/explore")
    grid, _, info = client.predict(ALL, "width > 100000", api_name="/explore")
    assert grid == [] and "nothing matches" in info


def test_explore_pages_are_row_ranges(explorer):
    sel = explorer.select()
    pages = [explorer.page(sel, p, size=5) for p in (1, 2, 3)]
    keys = [i.key for p in pages for i in p]
    every = [k for s in explorer.shards for k in explorer.store.read_meta(s, ["key"])["key"].to_pylist()]  # fmt: skip
    assert keys == every and [len(p) for p in pages] == [5, 5, 4]
    assert explorer.pages(sel, 5) == 3 and explorer.page(sel, 99, size=5)[0].key == every[10]


def test_detail_search_and_duplicates(client, explorer):
    grid, _, _ = client.predict(ALL, "label = 'cat'", api_name="/explore")
    key = grid[0]["caption"].split(" · ")[0]
    image, table = client.predict(key, api_name="/detail")
    assert Image.open(image).size == (256, 170)
    rows = {(t, c): v for t, c, v in table["data"]}
    assert {t for t, _ in rows} == {"meta", "captions/tiny", "scores/tiny", "scores/dedup", "embeddings/tiny"}  # fmt: skip
    assert rows[("meta", "key")] == key and rows[("meta", "path")] == "cat/chelsea.jpg"
    assert rows[("captions/tiny", "caption")] and rows[("scores/dedup", "dup_of")] == ""
    assert rows[("embeddings/tiny", "embedding")] == "32-d vector"

    grid, _, info = client.predict("a tabby cat", "tiny", api_name="/search")
    assert "search 'a tabby cat' (exhaustive, embeddings/tiny)" in info and len(grid) == 13
    sims = [float(g["caption"].split(" · ")[1].removeprefix("cos ")) for g in grid]
    assert sims == sorted(sims, reverse=True)
    # Nearest by cosine, as numpy computes it over the stored embeddings.
    idx = explorer.search_index("tiny")
    like = explorer.search_like(key)
    cos = idx.vectors @ idx.vector(key)  # (N,)
    assert like.keys["key"][0] == key and like.total == len(cos)
    assert np.allclose(like.keys["score"].to_numpy(), np.sort(cos)[::-1], atol=1e-5)

    strips, text = client.predict(1, api_name="/duplicates")
    assert text.startswith("1 groups") and len(strips) == 1
    assert (
        strips[0]["caption"].startswith("kept coffee-") and "coffee_copy-" in strips[0]["caption"]
    )


def test_save_view_writes_what_manifest_view_create_writes(client, demo_store, capsys):
    from gradio_client.exceptions import AppError

    from pipeline.cli import main

    where = "clip_aesthetic > 6 and min(width, height) >= 170"
    msg, _ = client.predict("from_app", where, False, api_name="/save_view")
    assert msg.startswith("saved views/from_app.parquet")
    assert main(["manifest", "view", "create", "from_cli", "--where", where, "--store", demo_store]) == 0  # fmt: skip
    app = pq.read_table(Path(demo_store) / "views" / "from_app.parquet")
    cli = pq.read_table(Path(demo_store) / "views" / "from_cli.parquet")
    assert app.schema.equals(cli.schema, check_metadata=False) and app.equals(cli)
    a, c = (json.loads(t.schema.metadata[b"alphaset.view"]) for t in (app, cli))
    for d in (a, c):
        d.pop("name"), d.pop("created")
    assert a == c and a["where"] == where
    with pytest.raises(AppError, match="already exists"):
        client.predict("from_app", where, False, api_name="/save_view")
    with pytest.raises(AppError, match="type a --where expression"):
        client.predict("empty", "", False, api_name="/save_view")
    with pytest.raises(AppError, match="bad view name"):
        client.predict("../x", where, False, api_name="/save_view")


@pytest.fixture
def serve(tmp_path):
    """Start a `build_app(...)` in this process on a free port; yield (client, config)."""
    import urllib.request

    from gradio_client import Client

    apps = []

    def start(**kw):
        from pipeline.app.ui import build_app

        app = build_app(**kw)
        apps.append(app)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                   quiet=True, show_error=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "config") as r:
            config = json.load(r)
        text = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
        return Client(url, verbose=False), text

    yield start
    for app in apps:
        app.close()


def test_bad_stores_and_checkpoints_say_why_in_the_page(serve, demo_store, tmp_path):
    from gradio_client.exceptions import AppError

    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store

    missing = str(tmp_path / "nowhere")
    notckpt = tmp_path / "notckpt"
    notckpt.mkdir()
    (notckpt / "readme.txt").write_text("hello")
    client, page = serve(store=missing, checkpoint=str(notckpt))
    assert f"Explore is off:** --store {missing}: no such folder" in page
    assert f"Generate is off:** --checkpoint {notckpt}: not a training checkpoint" in page
    with pytest.raises(AppError, match="no such folder"):
        client.predict(ALL, "", api_name="/explore")
    with pytest.raises(AppError, match="not a training checkpoint"):
        _gen(client, size=None)  # no model: no size buckets to choose from

    empty = Store(str(tmp_path / "empty"))
    empty.create()
    client, page = serve(store=empty.root, checkpoint=None)
    assert f"store {empty.root} is empty: no ingested shards yet" in page
    assert "Generate is off:** no model: start the app with --checkpoint DIR" in page

    photos = tmp_path / "photos"
    shutil.copytree(Path(demo_store).parent / "photos" / "cat", photos)
    plain = Store(str(tmp_path / "plain"))
    ingest_folder(plain, str(photos), progress=False)
    client, page = serve(store=plain.root, checkpoint=None)
    assert "Semantic search is off: the store has no embeddings/<tag>" in page
    with pytest.raises(AppError, match="semantic search needs embeddings"):
        client.predict("a cat", None, api_name="/search")
    grid, _, _ = client.predict(ALL, "", api_name="/explore")
    assert len(grid) == 1  # the rest of the tab works
    strips, text = client.predict(1, api_name="/duplicates")
    assert strips == [] and "no duplicate groups (run `alphaset dedup`)" in text


def test_cli_binds_loopback_unless_asked(app_server, capsys):
    """--host defaults to 127.0.0.1; a port already in use is a one-line error (exit 2)."""
    from urllib.parse import urlparse

    from pipeline.cli import build_parser, main

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.store, args.checkpoint) == ("127.0.0.1", 7860, None, None)
    port = urlparse(app_server).port  # taken by the test server
    assert main(["app", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"alphaset app: error: cannot serve on 127.0.0.1:{port}") and "\n" not in err
    )


def test_photo_edges_use_the_stores_hed(demo_store, tmp_path):
    """Without --hed, a photo becomes edges with the HED the store's edges/<tag> were made with."""
    from pipeline.app.explore import Explorer
    from pipeline.app.ui import store_hed
    from pipeline.store import Store

    root = tmp_path / "store"
    shutil.copytree(demo_store, root)
    assert store_hed(Explorer(str(root))) is None  # no edges stage: the tab asks for --hed
    Store(str(root)).claim_stage("edges/hed-256", {"hed": "tiny", "resolution": 256})
    assert store_hed(Explorer(str(root))) == "tiny"


def test_local_tars_read_by_headers_give_the_streamed_bytes(explorer):
    """The grid reads a local tar by member headers, seeking over other images: the same bytes
    as streaming it through `Store.iter_images`."""
    from pipeline.app.explore import _local_members

    for shard in explorer.shards:
        streamed = {k: data for k, _ext, data in explorer.store.iter_images(shard)}
        path = explorer.store.image_url(shard)
        assert dict(_local_members(path, set(streamed))) == streamed
        last = list(streamed)[-1:]
        assert list(_local_members(path, set(last))) == [(k, streamed[k]) for k in last]
