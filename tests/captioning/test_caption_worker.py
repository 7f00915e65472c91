import hashlib
import threading

import pyarrow.parquet as pq
import pytest

from captioning.captioner import CaptionConfig, Captioner
from captioning.worker import CAPTION_SCHEMA, CaptionWorker
from pipeline import fs
from pipeline.errors import UserError
from pipeline.store import meta_table, write_tar


class ThreadRecordingCaptioner(Captioner):
    """The real captioner, noting which thread prepares and which generates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = {"prepare": set(), "generate": set()}

    def prepare(self, *args, **kwargs):
        self.threads["prepare"].add(threading.current_thread().name)
        return super().prepare(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self.threads["generate"].add(threading.current_thread().name)
        return super().generate(*args, **kwargs)


def _worker(store, tiny_loaded, tag="tiny", cls=Captioner, **cfg):
    model, processor = tiny_loaded
    cfg = {"max_new_tokens": 5, "batch_size": 2, **cfg}
    return CaptionWorker.from_captioner(
        store.root, cls(model, processor, CaptionConfig(**cfg)), tag, "tiny"
    )


def test_worker_writes_exactly_the_ok_keys_in_order_with_a_status_record(photo_store, tiny_loaded):
    worker = _worker(photo_store, tiny_loaded, cls=ThreadRecordingCaptioner)
    for shard in photo_store.shards():
        rec = worker(shard)
        path = photo_store.url("captions", "tiny", f"{shard}.parquet")
        table = pq.read_table(path)
        assert table.schema.equals(CAPTION_SCHEMA)
        assert table["key"].to_pylist() == photo_store.ok_keys(shard)
        assert table["error"].null_count == table.num_rows == rec["rows"] == rec["ok"] == 3
        assert all(table["caption"].to_pylist()) and set(table["n_tokens"].to_pylist()) == {5}
        assert rec["checksum"] == hashlib.sha256(fs.read_bytes(path)).hexdigest()
        assert (
            rec["output"] == f"{shard}.parquet" and rec["model"] == "tiny" and rec["truncated"] == 3
        )
        assert photo_store.status("captions/tiny", shard) == rec
    # decode + preprocessing ran on the prefetch thread, generation on the caller's thread
    threads = worker.captioner.threads
    assert threads["generate"] == {threading.current_thread().name}
    assert threads["prepare"] and not threads["prepare"] & threads["generate"]


def test_an_undecodable_image_is_an_error_row_not_a_crash(tmp_path, photos_dir, tiny_loaded):
    from pipeline.store import Store

    store = Store(str(tmp_path / "s"))
    store.create()
    good = (photos_dir / "astronaut.jpg").read_bytes()
    samples = [
        ("a", {"jpg": good}),
        ("b", {"jpg": good[: len(good) // 2]}),
        ("c", {"jpg": b"not an image"}),
        ("d", {"jpg": good}),
    ]
    write_tar(store.image_url("000000"), samples)
    rows = [{"key": k, "shard": "000000", "status": "ok", "format": "jpg"} for k, _ in samples]
    fs.write_parquet(
        store.meta_url("000000"),
        meta_table(rows + [{"key": "e", "shard": "000000", "status": "ok"}]),
    )
    store.write_status("ingest", "000000", {"rows": 5, "ok": 5, "errors": 0})
    rec = _worker(store, tiny_loaded, batch_size=3)("000000")
    table = pq.read_table(store.url("captions/tiny/000000.parquet")).to_pylist()
    assert [r["key"] for r in table] == ["a", "b", "c", "d", "e"]
    errors = {r["key"]: r["error"] for r in table}
    assert errors["a"] is None and errors["d"] is None
    assert errors["b"].startswith("truncated image") and errors["c"].startswith("not an image")
    assert errors["e"] == "missing from image shard"
    assert table[1]["caption"] is None and table[0]["caption"]
    assert rec["ok"] == 2 and rec["errors"] == 3
    reasons = rec["errors_by_reason"]
    assert sum(reasons.values()) == 3 and reasons["missing from image shard"] == 1
    assert {r.split(" (")[0] for r in reasons} == {
        "truncated image",
        "not an image",
        "missing from image shard",
    }


def test_prompt_with_alt_uses_each_images_alt_text(store_factory, tiny_loaded):
    store = store_factory(alts={"chelsea": "a tabby cat"})
    worker = _worker(store, tiny_loaded, prompt_with_alt=True)
    worker("000000")
    rows = {
        r["key"].split("-")[0]: r["prompt"]
        for r in pq.read_table(store.url("captions/tiny/000000.parquet")).to_pylist()
    }
    assert (
        rows["chelsea_0"]
        == 'Given the caption of this image "a tabby cat", describe this image in a very detailed manner'
    )
    assert rows["astronaut_0"] == "Describe this image and its style in a very detailed manner."


def test_a_failing_input_pipeline_fails_the_shard_without_hanging(photo_store, tiny_loaded):
    fs.remove(photo_store.image_url("000001"))
    worker = _worker(photo_store, tiny_loaded)
    with pytest.raises(FileNotFoundError):
        worker("000001")
    assert photo_store.status("captions/tiny", "000001") is None
    assert not fs.exists(photo_store.url("captions/tiny/000001.parquet"))


def test_unknown_worker_setting_is_refused(photo_store):
    with pytest.raises(UserError, match="unknown caption setting.*temperature"):
        CaptionWorker(photo_store.root, "tiny", "tiny", temperature=0.7)


@pytest.mark.parametrize("tag", ["_x", "a/b", ".hidden", ""])
def test_bad_tag_is_refused(photo_store, tiny_loaded, tag):
    with pytest.raises(UserError, match="--tag"):
        _worker(photo_store, tiny_loaded, tag=tag)


def test_length_bucketing_cuts_padding_and_keeps_shard_order(store_factory, tiny_loaded):
    """Alt-texts of very different lengths (--prompt-with-alt): batching a window of samples by
    prompt length pads far less than shard order, and the output is the same rows in order."""
    words = {"astronaut": 2, "camera": 60, "chelsea": 5, "coffee": 40, "immunohistochemistry": 10}
    words["rocket"] = 80
    alts = {stem: " ".join(["word"] * n) for stem, n in words.items()}
    store = store_factory(shard_size=24, copies=4, alts=alts)
    shard = store.shards()[0]
    records, tables = {}, {}
    for window in (1, 8):
        worker = _worker(
            store, tiny_loaded, tag=f"w{window}", prompt_with_alt=True, batch_size=3,
            sort_window=window, max_new_tokens=2,
        )  # fmt: skip
        records[window] = worker(shard)
        tables[window] = pq.read_table(store.url(f"captions/w{window}/{shard}.parquet"))
    for window in (1, 8):
        assert tables[window]["key"].to_pylist() == store.ok_keys(shard)
        assert tables[window]["error"].null_count == 24
    assert tables[1]["prompt"].to_pylist() == tables[8]["prompt"].to_pylist()
    assert records[1]["prompt_tokens"] == records[8]["prompt_tokens"]  # the same prompts
    # shard order mixes long and short alt-texts in a batch; sorted neighbours are alike
    assert records[1]["prompt_padding"] > 0.1  # measured 0.157; sorted 0.042
    assert records[8]["prompt_padding"] < records[1]["prompt_padding"] / 2


def test_sort_window_must_be_positive():
    with pytest.raises(UserError, match="--sort-window must be >= 1 batch"):
        CaptionConfig(sort_window=0)
