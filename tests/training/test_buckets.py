import numpy as np
import pytest
from PIL import Image

from training.buckets import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    TABLES,
    buckets,
    nearest_bucket,
    resize_cover_crop,
    target_size,
)


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_tables_are_pixarts(resolution):
    table = TABLES[resolution]
    assert len(table) == 40
    keys = [float(k) for k in table]
    assert keys == sorted(keys) and keys[0] == 0.25 and keys[-1] == 4.0
    for key, (h, w) in table.items():
        assert h % 16 == 0 and w % 16 == 0  # VAE /8, then DiT patch 2
        assert abs(float(key) - h / w) < 0.02, key
        assert 0.85 < h * w / resolution**2 <= 1.0, key
    # The three tables are one table at three scales.
    scale = resolution // 256
    assert all(table[k] == (h * scale, w * scale) for k, (h, w) in ASPECT_RATIO_256.items())


def _diffusers_bins() -> dict[str, dict]:
    """diffusers' ASPECT_RATIO_*_BIN tables, read from its source (importing the pipeline module
    pulls in all of transformers: half a minute on a busy CI machine)."""
    import ast
    import importlib.util
    from pathlib import Path

    origin = importlib.util.find_spec("diffusers").origin
    src = Path(origin).parent / "pipelines" / "pixart_alpha" / "pipeline_pixart_alpha.py"
    out = {}
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("ASPECT_RATIO_") and name.endswith("_BIN"):
                out[name] = ast.literal_eval(node.value)
    return out


def test_diffusers_inference_bins_are_a_subset():
    """diffusers' pipeline bins are PixArt's 33-bucket test tables: every one must match ours."""
    bins = _diffusers_bins()
    for ours, name in (
        (ASPECT_RATIO_256, "ASPECT_RATIO_256_BIN"),
        (ASPECT_RATIO_512, "ASPECT_RATIO_512_BIN"),
        (ASPECT_RATIO_1024, "ASPECT_RATIO_1024_BIN"),
    ):
        theirs = bins[name]
        assert len(theirs) == 33
        for key, (h, w) in theirs.items():
            assert ours[key] == (int(h), int(w))


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (100, 400, (128, 512)),  # ratio 0.25: the widest bucket
        (400, 100, (512, 128)),  # ratio 4.0: the tallest bucket
        (100, 1000, (128, 512)),  # 10:1 wide, beyond the table: clamps to 0.25
        (1000, 100, (512, 128)),  # 1:10 tall: clamps to 4.0
        (500, 500, (256, 256)),
        (1080, 1920, (192, 336)),  # 16:9 → 0.5625 → "0.57"
        (1920, 1080, (336, 192)),  # 9:16 → 1.78 → "1.75"
        (768, 1024, (208, 288)),  # 4:3 = 0.75 ties "0.72" and "0.78": the first wins, as in PixArt
    ],
)
def test_nearest_bucket(height, width, expected):
    assert nearest_bucket(height, width, 256) == expected


def test_nearest_bucket_scales_with_resolution():
    assert nearest_bucket(100, 1000, 1024) == (512, 2048)
    assert nearest_bucket(1000, 100, 512) == (1024, 256)


def test_single_scale_is_the_square():
    assert buckets(512, multi_scale=False) == [(512, 512)]
    assert target_size(100, 1000, 512, multi_scale=False) == (512, 512)
    assert len(buckets(512, multi_scale=True)) == 40


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="--resolution must be one of 256, 512, 1024, got 300"):
        nearest_bucket(10, 10, 300)
    with pytest.raises(ValueError, match="image size must be positive, got 10x0"):
        nearest_bucket(0, 10, 256)


def test_resize_cover_crop_keeps_the_centre():
    # 400×100 (w×h): left half red, right half blue, a green 20-px column in the middle.
    arr = np.zeros((100, 400, 3), np.uint8)
    arr[:, :200] = (255, 0, 0)
    arr[:, 200:] = (0, 0, 255)
    arr[:, 190:210] = (0, 255, 0)
    out = resize_cover_crop(Image.fromarray(arr), 256, 256)
    assert out.size == (256, 256)
    px = np.asarray(out)
    # Scaled ×2.56 to 1024×256, the crop is x 384..640: the stripe (486..538) sits in its middle.
    assert px[128, 128, 1] > 200 and px[128, 128, 0] < 50
    assert px[128, 20, 0] > 200 and px[128, 240, 2] > 200


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (17, 900), (3000, 31), (128, 512)])
def test_resize_cover_crop_gives_the_bucket(size):
    img = Image.new("RGB", size, (10, 20, 30))
    for multi_scale in (False, True):
        h, w = target_size(size[1], size[0], 512, multi_scale)
        out = resize_cover_crop(img, h, w)
        assert out.size == (w, h)
        assert np.asarray(out)[h // 2, w // 2].tolist() == [10, 20, 30]


def test_bucket_ratio_is_pixarts_ratio_key():
    """The aspect micro-condition PixArt trains with is the table's key (closest_ratio)."""
    from training.buckets import bucket_ratio

    assert bucket_ratio(768, 1344, 1024) == 0.57  # not 768 / 1344 = 0.5714
    assert bucket_ratio(256, 256, 256) == 1.0
    assert bucket_ratio(300, 200, 256) == 1.5  # off the table: h / w
