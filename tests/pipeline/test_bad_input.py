"""Bad input, each a real file: a correct result or an error row with a reason; the ingest finishes.

One folder holds every case and is ingested once (module fixture) through the CLI; each test
then checks its own rows. Tar members and the unreadable folder have their own ingests.
"""

import contextlib
import ctypes
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from pipeline.cli import main
from pipeline.store import Store, iter_tar_samples

DATA = Path(__file__).parent.parent / "data"
REPO = Path(__file__).parent.parent.parent
MAX_SIDE = 600


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of side×side zeros: ~110 KB on disk, 900 MP decoded."""
    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, **kw) -> bytes:
    img.save(path, **kw)
    return path.read_bytes()


@pytest.fixture(scope="module")
def bad_store(tmp_path_factory):
    """Write every case into one folder, ingest it once; yield (rows by path, stdout, src)."""
    src = tmp_path_factory.mktemp("bad")
    astronaut = Image.fromarray(skdata.astronaut())
    chelsea = Image.fromarray(skdata.chelsea())
    truck = (DATA / "photos" / "sam_truck.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(truck[: len(truck) * 6 // 10])
    png = _save(chelsea, src / "full.png")
    (src / "truncated.png").write_bytes(png[: len(png) // 2])
    os.remove(src / "full.png")
    webp = _save(chelsea, src / "full.webp", quality=90)
    (src / "truncated.webp").write_bytes(webp[: len(webp) // 2])
    os.remove(src / "full.webp")
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("this is a text file, not a photo\n")
    shutil.copy(DATA / "edge_cases" / "rembg_plants-1_is_png_named_jpg.jpg", src / "png_named.jpg")
    (src / "bomb.png").write_bytes(bomb_png())
    astronaut.convert("CMYK").save(src / "cmyk.jpg", quality=95)
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))  # (64, 256)
    Image.fromarray(ramp).save(src / "grey16.png")
    Image.fromarray(skdata.camera()).save(src / "grey.png")
    chelsea.quantize(64).save(src / "palette.png")
    # Palette index 63 (black in the palette) is transparent and fills the top-left 64x64 block.
    idx = np.asarray(chelsea.quantize(63)).copy()
    idx[:64, :64] = 63
    pal = Image.fromarray(idx, "P")
    pal.putpalette(chelsea.quantize(63).getpalette()[: 63 * 3] + [0, 0, 0])
    pal.save(src / "palette_transparent.png", transparency=63)
    shutil.copy(DATA / "photos" / "rembg_animal-2.out.png", src / "alpha.png")
    for name in ("exif_Landscape_6.jpg", "exif_Portrait_8.jpg", "exif_Portrait_1.jpg"):
        shutil.copy(DATA / "photos" / name, src / name)
    dog = (DATA / "photos" / "sam_dog.jpg").read_bytes()
    (src / "motion_photo.jpg").write_bytes(dog + os.urandom(20000))  # data after the JPEG end
    for sub, photo in (("a", "sam_dog.jpg"), ("b", "rembg_girl-1.jpg")):
        (src / sub).mkdir()
        shutil.copy(DATA / "photos" / photo, src / sub / "dup.jpg")
    (src / "sidecars").mkdir()
    for name, caption, meta in (
        ("captioned", b"a cat on a rug\n", b'{"source": "unit"}'),
        ("bad_json", None, b'{"source": '),
        ("list_json", None, b"[1, 2]"),
        ("latin1", b"caf\xe9 au lait", None),
        ("no_sidecar", None, None),
    ):
        astronaut.save(src / "sidecars" / f"{name}.jpg", quality=80)
        if caption is not None:
            (src / "sidecars" / f"{name}.txt").write_bytes(caption)
        if meta is not None:
            (src / "sidecars" / f"{name}.json").write_bytes(meta)
    # A file name that is not valid UTF-8 (POSIX names are bytes).
    with open(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), "wb") as f:
        f.write(dog)

    store_dir = tmp_path_factory.mktemp("bad-store")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            ["ingest", "folder", str(src), "--store", str(store_dir), "--no-progress"]
            + ["--max-side", str(MAX_SIDE), "--workers", "2"]
        )
    assert rc == 0
    rows = {r["path"]: r for r in pq.read_table(str(store_dir / "meta")).to_pylist()}
    store = Store(str(store_dir))
    images = {k: b for sh in store.shards() for k, _, b in store.iter_images(sh)}
    return rows, images, out.getvalue()


def _img(bad_store, path) -> np.ndarray:
    rows, images, _ = bad_store
    row = rows[path]
    assert row["status"] == "ok", row["error"]
    img = Image.open(io.BytesIO(images[row["key"]]))
    assert img.mode == "RGB" and img.size == (row["width"], row["height"])
    return np.asarray(img).astype(np.int16)


def _error(bad_store, path) -> str:
    row = bad_store[0][path]
    assert row["status"] == "error" and row["key"] not in bad_store[1]
    return row["error"]


@pytest.mark.parametrize("path", ["truncated.jpg", "truncated.png", "truncated.webp"])
def test_truncated_images_are_error_rows(bad_store, path):
    # Never a half-grey image: the decoder ran out of data, so the sample is refused.
    assert _error(bad_store, path).startswith("truncated image")


def test_empty_and_text_files(bad_store):
    assert _error(bad_store, "empty.jpg") == "empty file"
    assert _error(bad_store, "notes.jpg") == "not an image (unidentified format)"


def test_png_named_jpg_decodes_by_content(bad_store):
    row = bad_store[0]["png_named.jpg"]
    assert (row["orig_width"], row["orig_height"]) == (987, 1481)
    assert row["height"] == MAX_SIDE and row["format"] == "jpg"
    assert _img(bad_store, "png_named.jpg").shape == (MAX_SIDE, 400, 3)


def test_decompression_bomb_is_refused_from_the_header(bad_store):
    assert _error(bad_store, "bomb.png").startswith("decompression bomb: 30000x30000 exceeds")


def test_cmyk_jpeg_becomes_rgb_with_the_same_colours(bad_store):
    got = _img(bad_store, "cmyk.jpg")
    want = skdata.astronaut().astype(np.int16)  # 512x512: below --max-side
    assert np.abs(got - want).mean() < 12  # not inverted, not channel-swapped


def test_16bit_png_keeps_its_full_range(bad_store):
    ramp = _img(bad_store, "grey16.png")[32]  # (256, 3): a 0..65535 ramp scaled to 0..255
    assert ramp[:3].max() <= 6 and ramp[-3:].min() >= 249
    assert abs(int(ramp[128, 0]) - 128) <= 6
    assert (ramp[:, 0] == ramp[:, 1]).all()


def test_greyscale_becomes_three_equal_channels(bad_store):
    grey = _img(bad_store, "grey.png")
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 2
    assert bad_store[0]["grey.png"]["width"] == 512  # 512 px: below --max-side, never upsized


def test_palette_images_and_transparency_on_white(bad_store):
    pal = _img(bad_store, "palette.png")
    want = np.asarray(Image.fromarray(skdata.chelsea())).astype(np.int16)
    assert pal.shape == want.shape and np.abs(pal - want).mean() < 12
    transparent = _img(bad_store, "palette_transparent.png")
    assert transparent[4:60, 4:60].min() >= 245  # composited on white, not the black entry
    assert np.abs(transparent[100:] - want[100:]).mean() < 12


def test_alpha_png_composited_on_white(bad_store):
    rgba = np.asarray(Image.open(DATA / "photos" / "rembg_animal-2.out.png"))
    got = _img(bad_store, "alpha.png")
    assert got.shape == (600, 523, 3)  # 610x700 fitted to --max-side 600
    # Transparent pixels hold RGB (0, 0, 0): dropping alpha would make them black.
    alpha = np.asarray(Image.fromarray(rgba[..., 3]).resize((523, 600), Image.Resampling.BOX))
    clear, solid = alpha == 0, alpha == 255
    assert clear.mean() > 0.6 and got[clear].mean() > 252 and np.percentile(got[clear], 1) >= 240
    assert got[solid].mean() < 200  # the animal itself is still there


def test_exif_orientation_applied(bad_store):
    rows = bad_store[0]
    land = rows["exif_Landscape_6.jpg"]  # stored 1200x1800, orientation 6: shown 1800x1200
    assert (land["orig_width"], land["orig_height"]) == (1800, 1200)
    assert (land["width"], land["height"]) == (600, 400)
    port = rows["exif_Portrait_8.jpg"]  # stored 1800x1200, orientation 8: shown 1200x1800
    assert (port["orig_width"], port["orig_height"]) == (1200, 1800)
    # Rotated right, the pixels match the same photo stored upright (orientation 1).
    rotated, upright = (
        _img(bad_store, "exif_Portrait_8.jpg"),
        _img(bad_store, "exif_Portrait_1.jpg"),
    )
    assert rotated.shape == upright.shape == (600, 400, 3)
    assert np.abs(rotated - upright).mean() < 10
    assert np.abs(np.rot90(rotated, 2) - upright).mean() > 30


def test_trailing_data_after_jpeg_is_not_truncation(bad_store):
    row = bad_store[0]["motion_photo.jpg"]
    assert row["status"] == "ok" and (row["width"], row["height"]) == (600, 400)


def test_same_name_in_two_folders_gives_two_keys(bad_store):
    a, b = bad_store[0]["a/dup.jpg"], bad_store[0]["b/dup.jpg"]
    assert a["status"] == b["status"] == "ok" and a["key"] != b["key"]
    assert (a["orig_width"], b["orig_width"]) == (800, 600)


def test_missing_and_malformed_sidecars_keep_the_image(bad_store):
    rows = bad_store[0]
    ok = {p: r for p, r in rows.items() if p.startswith("sidecars/")}
    assert all(r["status"] == "ok" for r in ok.values())
    assert rows["sidecars/captioned.jpg"]["alt_text"] == "a cat on a rug"
    assert json.loads(rows["sidecars/captioned.jpg"]["source_meta"]) == {"source": "unit"}
    bad = json.loads(rows["sidecars/bad_json.jpg"]["source_meta"])
    assert bad["sidecar_problem"].startswith("malformed json sidecar: ")
    assert json.loads(rows["sidecars/list_json.jpg"]["source_meta"]) == {"value": [1, 2]}
    assert rows["sidecars/latin1.jpg"]["alt_text"] == "caf\ufffd au lait"
    assert rows["sidecars/no_sidecar.jpg"]["alt_text"] is None
    assert rows["sidecars/no_sidecar.jpg"]["source_meta"] is None


def test_non_utf8_file_name(bad_store):
    row = bad_store[0]["caf\ufffd.jpg"]
    assert row["status"] == "ok" and row["key"].startswith("caf-")


def test_summary_counts_every_case(bad_store):
    rows, _, out = bad_store
    errors = sum(r["status"] == "error" for r in rows.values())
    assert errors == 6 and len(rows) == 25
    assert f"({len(rows) - errors} ok, {errors} errors)" in out
    assert "error        3  truncated image" in out
    for reason in ("empty file", "not an image (unidentified format)", "decompression bomb"):
        assert f"error        1  {reason}" in out
    assert "note         1  malformed json sidecar (image kept)" in out


def test_tar_members_with_absolute_or_dotdot_paths(tmp_path, make_tar, capsys):
    """Unsafe members are error rows, never extracted; the rest of the tar is ingested."""
    jpg = (DATA / "photos" / "sam_dog.jpg").read_bytes()
    canary = f"alphaset-canary-{uuid.uuid4().hex}.jpg"
    (tmp_path / "in").mkdir()  # "../x" would land in tmp_path if anything extracted it
    tar = make_tar(
        tmp_path / "in" / "evil.tar",
        [
            ("0001.jpg", jpg),
            (f"../{canary}", jpg),
            (f"/tmp/{canary}", jpg),
            ("sub/../../0002.jpg", jpg),
            ("0003.jpg", jpg),
        ],
    )
    with tarfile.open(tar, "a") as tf:  # a link member: never followed, never a sample
        link = tarfile.TarInfo("0004.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    assert main(["ingest", "wds", str(tar), "--store", str(tmp_path / "s"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "6 new samples in 1 shard(s) (2 ok, 4 errors)" in out
    assert "error        4  unsafe tar member" in out
    rows = Store(str(tmp_path / "s")).read_meta("000000").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "ok", "error"]
    assert all("absolute or '..'" in r["error"] for r in rows[1:4])
    assert rows[5]["error"] == "unsafe tar member: link '0004.jpg' -> '/etc/passwd'"
    assert not (tmp_path / canary).exists() and not Path("/tmp", canary).exists()
    names = [k for k, _ in iter_tar_samples(str(tmp_path / "s" / "images" / "000000.tar"))]
    assert len(names) == 2 and all("/" not in k and ".." not in k for k in names)


def _without_dac_override() -> None:
    """preexec_fn: the child keeps uid 0 but loses the capabilities that let root ignore
    permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so chmod 000 stops it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


def test_unreadable_directory_and_file_are_error_rows(tmp_path):
    src = tmp_path / "src"
    # "zz_locked" is the last folder the walk visits: its error must not be lost at the end.
    locked = [src / "a_locked", src / "zz_locked"]
    for d in [*locked, src / "open"]:
        d.mkdir(parents=True)
        shutil.copy(DATA / "photos" / "rembg_girl-1.jpg", d / "photo.jpg")
    shutil.copy(DATA / "photos" / "rembg_girl-1.jpg", src / "secret.jpg")
    for d in locked:
        d.chmod(0)
    (src / "secret.jpg").chmod(0)
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "folder", str(src)]
    cmd += ["--store", str(tmp_path / "store"), "--no-progress"]
    # Tests run as root, which reads anything: run the CLI without that power.
    drop = {"preexec_fn": _without_dac_override} if os.geteuid() == 0 else {}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, **drop)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop root's permission override (CAP_DAC_OVERRIDE): {e}")
    finally:
        for d in locked:
            d.chmod(0o755)
        (src / "secret.jpg").chmod(0o644)
    assert proc.returncode == 0, proc.stderr
    assert "4 new samples in 1 shard(s) (1 ok, 3 errors)" in proc.stdout
    rows = {r["path"]: r for r in pq.read_table(str(tmp_path / "store" / "meta")).to_pylist()}
    assert rows["open/photo.jpg"]["status"] == "ok"
    for d in ("a_locked/", "zz_locked/"):
        assert rows[d]["error"] == "unreadable directory: Permission denied"
    assert rows["secret.jpg"]["error"] == "unreadable file: Permission denied"
    assert "error        2  unreadable directory" in proc.stdout
    assert "error        1  unreadable file" in proc.stdout
