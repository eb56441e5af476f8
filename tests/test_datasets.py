"""Latent cache round trip, cached-latent and video datasets through the sampler (data/cache.py, data/dataset.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cinedit.configs.data import BucketConfig, DataConfig
from cinedit.data.cache import CacheReader, CacheWriter
from cinedit.data.dataset import CachedLatentDataset, VideoDataset, collate
from cinedit.data.meta import write_meta
from cinedit.data.sampler import BucketBatchSampler, SampleItem, build_dataloader, build_sampler
from cinedit.data.video import write_video


def sample_tensors(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "latent": torch.randn(4, 2, 2, 3, generator=g).to(torch.bfloat16),
        "txt": torch.randn(5 + i % 3, 16, generator=g),
        "vec": torch.randn(16, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, 1000, (7,), generator=g),
    }


def test_cache_round_trip_across_shards(tmp_path):
    out = tmp_path / "cache"
    # Views of one batched tensor share storage, which safetensors refuses unless the writer copies.
    batch = torch.randn(10, 4, 8)
    with CacheWriter(out, shard_size_mb=0.002) as w:
        for i in range(10):
            w.add(f"clip/{i}", {**sample_tensors(i), "row": batch[i]}, {"i": i, "fps": np.float32(24.0)})
        assert len(w) == 10
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert len(shards) >= 3
    assert not list(out.glob(".*.tmp"))
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 1 and set(index["entries"]) == {f"clip/{i}" for i in range(10)}
    assert {e["shard"] for e in index["entries"].values()} == set(shards)
    r = CacheReader(out)
    assert r.keys() == [f"clip/{i}" for i in range(10)]
    for i in reversed(range(10)):
        got = r.get(f"clip/{i}")
        want = {**sample_tensors(i), "row": batch[i]}
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])
        assert r.meta(f"clip/{i}") == {"i": i, "fps": 24.0}
    assert set(r.get("clip/3", ["vec"])) == {"vec"}


def test_cache_errors_and_append(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CacheReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        CacheReader(tmp_path / "empty")
    out = tmp_path / "cache"
    with CacheWriter(out) as w:
        w.add("a", {"x": torch.ones(2)}, {})
        with pytest.raises(KeyError, match="unique"):
            w.add("a", {"x": torch.ones(2)}, {})
        with pytest.raises(TypeError, match="torch.Tensor"):
            w.add("b", {"x": np.ones(2)}, {})
        with pytest.raises(TypeError, match="JSON"):
            w.add("c", {"x": torch.ones(2)}, {"bad": object()})
    r = CacheReader(out)
    with pytest.raises(KeyError, match="not in the cache"):
        r.get("b")
    with pytest.raises(KeyError, match="no tensors"):
        r.get("a", ["y"])
    with pytest.raises(FileExistsError, match="append=True"):
        CacheWriter(out)
    with CacheWriter(out, append=True) as w:
        w.add("b", {"x": torch.zeros(3)}, {"k": 1})
    r = CacheReader(out)
    assert r.keys() == ["a", "b"] and torch.equal(r.get("b")["x"], torch.zeros(3))
    assert len(list(out.glob("shard-*.safetensors"))) == 2


def test_cached_latent_dataset_through_sampler(tmp_path):
    shapes = [(1, 64, 64), (8, 64, 64), (8, 128, 128), (1, 96, 160)]
    written = {}
    with CacheWriter(tmp_path / "lat", shard_size_mb=0.01) as w:
        for i in range(24):
            t, h, wd = shapes[i % 4]
            tensors = {"latent": torch.randn(4, (t + 3) // 4, h // 32, wd // 32), "txt": torch.randn(6, 8)}
            written[f"k{i}"] = tensors
            w.add(f"k{i}", tensors, {"num_frames": t, "height": h, "width": wd, "fps": 24.0, "text": f"t{i}"})
    ds = CachedLatentDataset(tmp_path / "lat")
    assert len(ds) == 24 and list(ds.meta["key"]) == [f"k{i}" for i in range(24)]
    buckets = BucketConfig(table={"128px": {1: (1.0, 3), 8: (1.0, 2)}, "64px": {1: (1.0, 2), 8: (1.0, 3)}})
    seen = set()
    for batch in build_dataloader(ds, BucketBatchSampler(ds, buckets, seed=1), num_workers=0):
        for k, i in enumerate(batch["index"]):
            want = written[f"k{i}"]
            assert torch.equal(batch["latent"][k], want["latent"]) and torch.equal(batch["txt"][k], want["txt"])
            assert batch["text"][k] == f"t{i}"
            assert (batch["num_frames"][k], batch["height"][k], batch["width"][k]) == shapes[i % 4]
            seen.add(i)
    assert seen == set(range(24))  # every shape is a bucket shape and every bucket fills whole batches
    with pytest.raises(ValueError, match="encoded at"):
        ds[SampleItem(0, 8, 64, 64, 0)]
    with pytest.raises(TypeError, match="BucketBatchSampler"):
        ds[0]


def test_cached_latents_at_a_non_bucket_shape_are_dropped(tmp_path):
    with CacheWriter(tmp_path / "lat") as w:
        for i in range(4):
            meta = {"num_frames": 1, "height": 64, "width": 64 if i % 2 else 80}  # 64x80 buckets to 64x96
            w.add(str(i), {"latent": torch.zeros(4, 1, 2, 2), "txt": torch.zeros(2, 8)}, meta)
    ds = CachedLatentDataset(tmp_path / "lat")
    s = BucketBatchSampler(ds, BucketConfig(table={"64px": {1: (1.0, 1)}}))
    assert sorted(it.index for b in s for it in b) == [1, 3]


def gradient_video(n: int, h: int, w: int) -> np.ndarray:
    """uint8 (T, H, W, 3) whose frame k is uniformly 8 * k grey: the frame index reads back from the mean."""
    return np.broadcast_to((8 * np.arange(n, dtype=np.uint8))[:, None, None, None], (n, h, w, 3)).copy()


@pytest.fixture(scope="module")
def video_meta(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a.mp4", gradient_video(20, 64, 96), fps=24)
    write_video(root / "b.mp4", gradient_video(30, 96, 64), fps=60)
    Image.fromarray(np.full((80, 80, 3), 200, dtype=np.uint8)).save(root / "c.png")
    rows = [
        ("a.mp4", "a grey ramp", 20, 64, 96, 24.0),
        ("b.mp4", "a fast ramp", 30, 96, 64, 60.0),
        ("c.png", "a grey square", 1, 80, 80, 0.0),
    ]
    df = pd.DataFrame(rows, columns=["path", "text", "num_frames", "height", "width", "fps"])
    df["aspect_ratio"] = df["height"] / df["width"]
    df["resolution"] = df["height"] * df["width"]
    write_meta(df, root / "meta.csv")
    return root / "meta.csv"


VIDEO_BUCKETS = BucketConfig(table={"64px": {1: (1.0, 1), 4: (1.0, 1), 8: (1.0, 1)}})


def test_video_dataset_shapes_stride_and_crop(video_meta):
    ds = VideoDataset(video_meta, DataConfig(buckets=VIDEO_BUCKETS))
    items = {b[0].index: b[0] for b in BucketBatchSampler(ds, VIDEO_BUCKETS, seed=0)}
    assert sorted(items) == [0, 1, 2]
    a, b, c = (ds[items[i]] for i in range(3))
    assert a["video"].shape == (3, 8, 64, 96) and a["fps"] == 24.0
    # 60 fps -> stride 3: 30 frames give 10, so the 8-frame bucket; effective fps 20.
    assert b["video"].shape == (3, 8, 96, 64) and b["fps"] == 20.0
    assert c["video"].shape == (3, 1, 64, 64) and c["num_frames"] == 1 and c["text"] == "a grey square"
    for s in (a, b, c):
        assert s["video"].min() >= -1 and s["video"].max() <= 1
        assert s["video"].shape[1:] == (s["num_frames"], s["height"], s["width"])
    # Frame k of the source is 8 * k grey: consecutive sampled frames step by 8 * stride.
    # The crop starts anywhere that leaves room: 20 - 8 = 12 for a; 30 - (7 * 3 + 1) = 8 for b.
    for s, stride, last_start in ((a, 1, 12), (b, 3, 8)):
        level = ((s["video"].mean(dim=(0, 2, 3)) + 1) * 127.5 / 8).round()
        assert torch.all(level.diff() == stride)
        assert 0 <= level[0] <= last_start


def test_video_dataset_is_deterministic_per_seed(video_meta):
    ds = VideoDataset(pd.read_csv(video_meta).assign(path=lambda d: [str(video_meta.parent / p) for p in d["path"]]))
    item = SampleItem(0, 8, 64, 64, 1234)
    x, y = ds[item]["video"], ds[item]["video"]
    assert torch.equal(x, y)
    starts = {int(((ds[SampleItem(0, 8, 64, 64, s)]["video"].mean() + 1) * 127.5 / 8).round()) for s in range(12)}
    assert len(starts) > 1  # the seed moves the temporal crop
    batch = collate([ds[SampleItem(0, 4, 64, 64, s)] for s in range(3)])
    assert batch["video"].shape == (3, 3, 4, 64, 64) and batch["index"] == [0, 0, 0]
    with pytest.raises(ValueError, match="one bucket"):
        collate([ds[SampleItem(0, 4, 64, 64, 0)], ds[SampleItem(0, 8, 64, 64, 0)]])


def test_video_dataset_through_loader_with_workers(video_meta):
    cfg = DataConfig(buckets=VIDEO_BUCKETS, seed=3)
    ds = VideoDataset(video_meta, cfg)
    runs = []
    for workers in (0, 2):
        batches = list(build_dataloader(ds, build_sampler(ds, cfg), num_workers=workers))
        runs.append(batches)
    assert [b["index"] for b in runs[0]] == [b["index"] for b in runs[1]]
    for b0, b1 in zip(*runs):
        assert torch.equal(b0["video"], b1["video"])
