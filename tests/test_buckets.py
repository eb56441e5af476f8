"""Bucket assignment rules on hand-made rows (data/buckets.py)."""

import math

import numpy as np
import pandas as pd
import pytest

from cinedit.configs.core import ConfigError
from cinedit.configs.data import BucketConfig, debug_buckets, stage1_buckets, stage3_buckets
from cinedit.data.buckets import ASPECT_RATIOS, Bucket, Bucketer, aspect_sizes, assign


def image(h: int, w: int) -> dict:
    return {"height": h, "width": w, "num_frames": 1, "fps": 0.0}


def video(h: int, w: int, n: int, fps: float = 24.0) -> dict:
    return {"height": h, "width": w, "num_frames": n, "fps": fps}


TWO_RES = BucketConfig(
    table={
        "256px": {1: (1.0, 8), 8: (1.0, 4), 16: (1.0, 2)},
        "128px": {1: (1.0, 16), 8: (1.0, 8), 16: (1.0, 4)},
    }
)


@pytest.mark.parametrize("side", [256, 512, 768, 1024])
def test_aspect_tables_are_multiples_of_32_near_side_squared(side):
    sizes = aspect_sizes(side)
    assert len(sizes) == 2 * len(ASPECT_RATIOS) - 1  # 1:1 is its own transpose
    for ratio, (h, w) in sizes.items():
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h * w / side**2 - 1) < 0.11
        assert abs(math.log(h / w / ratio)) < 0.2
    assert sizes[1.0] == (side, side)
    assert sizes[9 / 16][::-1] == sizes[16 / 9]


def test_all_bucket_sizes_are_multiples_of_32():
    for cfg in (debug_buckets(), stage1_buckets(), stage3_buckets()):
        for b in Bucketer(cfg).buckets:
            assert b.height % 32 == 0 and b.width % 32 == 0


def test_highest_resolution_within_tolerance():
    b = Bucketer(TWO_RES)
    # 236^2 is 15% below 256^2: still 256px. 222^2 is 25% below: falls to 128px.
    assert 0.84 < 236 * 236 / 256**2 < 0.86 and 0.74 < 222 * 222 / 256**2 < 0.76
    assert b.assign(image(236, 236)) == Bucket("256px", 1, 256, 256)
    assert b.assign(image(222, 222)) == Bucket("128px", 1, 128, 128)
    assert b.assign(image(1080, 1920)) == Bucket("256px", 1, 192, 352)  # larger samples use the top resolution
    assert b.assign(image(1920, 1080)) == Bucket("256px", 1, 352, 192)  # the transpose for portrait
    # Too small for the lowest resolution (more than 20% below 128^2): dropped.
    assert b.assign(image(100, 100)) is None
    assert b.assign(image(116, 116)) == Bucket("128px", 1, 128, 128)


def test_tolerance_comes_from_config():
    cfg = BucketConfig(table=TWO_RES.table, tolerance=0.3)
    assert Bucketer(cfg).assign(image(222, 222)).resolution == "256px"


def test_largest_covered_frame_count_with_stride_from_fps():
    b = Bucketer(TWO_RES)
    assert b.assign(video(256, 256, 16)).num_frames == 16
    assert b.assign(video(256, 256, 15)).num_frames == 8
    assert b.assign(video(256, 256, 100)).num_frames == 16
    # 60 fps -> stride 3: 30 frames give (30 - 1) // 3 + 1 = 10 frames -> 8; 46 give 16 -> 16.
    assert b.assign(video(256, 256, 30, fps=60)).num_frames == 8
    assert b.assign(video(256, 256, 45, fps=60)).num_frames == 8
    assert b.assign(video(256, 256, 46, fps=60)).num_frames == 16
    # 30 fps -> stride 2.
    assert b.assign(video(256, 256, 31, fps=30)).num_frames == 16
    assert b.assign(video(256, 256, 30, fps=30)).num_frames == 8
    # Too short for every video entry: dropped (never an image bucket).
    assert b.assign(video(256, 256, 7)) is None


def test_configured_stride_overrides_fps():
    b = Bucketer(TWO_RES, frame_stride=4)
    assert b.assign(video(256, 256, 61, fps=24)).num_frames == 16
    assert b.assign(video(256, 256, 60, fps=24)).num_frames == 8
    assert assign(video(256, 256, 60, fps=24), TWO_RES, frame_stride=1).num_frames == 16


def test_images_only_in_frame_1_and_videos_never():
    cfg = BucketConfig(table={"256px": {1: (1.0, 8)}, "128px": {8: (1.0, 4)}})
    b = Bucketer(cfg)
    # A 256px video finds no video entry at 256px and goes to 128px; a 128px-sized image has no image entry.
    assert b.assign(video(256, 256, 40)) == Bucket("128px", 8, 128, 128)
    assert b.assign(image(256, 256)) == Bucket("256px", 1, 256, 256)
    assert b.assign(image(128, 128)) is None
    cfg = BucketConfig(table={"256px": {8: (1.0, 4)}, "128px": {1: (1.0, 4)}})
    assert Bucketer(cfg).assign(image(512, 512)) == Bucket("128px", 1, 128, 128)


def test_keep_prob_falls_through_deterministically():
    cfg = BucketConfig(table={"256px": {1: (0.3, 8), 8: (1.0, 4)}, "128px": {1: (1.0, 8)}})
    b = Bucketer(cfg)
    n = 4000
    meta = pd.DataFrame([image(256, 256)] * n)
    codes = b.assign_meta(meta, seed=7)
    res = np.array([b.buckets[c].resolution for c in codes])
    kept = (res == "256px").mean()
    assert abs(kept - 0.3) < 0.04  # binomial sd ~ 0.007
    assert set(res) == {"256px", "128px"}  # not kept -> next lower resolution, none dropped
    # Same (seed, index, bucket) -> same draw; per-row assign agrees with the vectorised path.
    assert np.array_equal(codes, b.assign_meta(meta, seed=7))
    for i in range(0, n, 397):
        assert b.assign(meta.iloc[i], index=i, seed=7) == b.buckets[codes[i]]
    assert not np.array_equal(codes, b.assign_meta(meta, seed=8))
    # keep 1.0 always keeps: videos in the same resolution never fall.
    vcodes = b.assign_meta(pd.DataFrame([video(256, 256, 20)] * n), seed=7)
    assert {b.buckets[c] for c in vcodes} == {Bucket("256px", 8, 256, 256)}


def test_keep_prob_at_lowest_resolution_drops():
    b = Bucketer(BucketConfig(table={"128px": {1: (0.25, 8)}}))
    codes = b.assign_meta(pd.DataFrame([image(128, 128)] * 4000), seed=0)
    assert abs((codes >= 0).mean() - 0.25) < 0.04
    assert set(codes[codes < 0]) == {-1}


def test_aspect_ratio_is_closest_in_log_space_and_bucket_shapes_are_fixed_points():
    b = Bucketer(TWO_RES)
    for h, w in [(720, 1280), (1080, 1440), (800, 1920), (1000, 1010), (1280, 544)]:
        got = b.assign(image(h, w))
        table = sorted(set(aspect_sizes(256).values()))
        best = min(table, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(h / w)))
        assert (got.height, got.width) == best
    # Cached latents are encoded at bucket shapes and re-bucketed from them: each shape maps to itself.
    for bucket in Bucketer(stage3_buckets()).buckets:
        assert assign(video(bucket.height, bucket.width, bucket.num_frames), stage3_buckets()) == bucket


def test_invalid_config_is_rejected():
    with pytest.raises(ConfigError, match="keep_prob"):
        Bucketer(BucketConfig(table={"256px": {1: (0.0, 8)}}))
    with pytest.raises(ConfigError, match="multiples of 4"):
        Bucketer(BucketConfig(table={"256px": {6: (1.0, 8)}}))
    with pytest.raises(ValueError, match="lacks columns"):
        Bucketer(TWO_RES).assign_meta(pd.DataFrame({"height": [1], "width": [1]}))
