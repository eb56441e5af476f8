"""`data.decode_cache_mb` (`MediaCache`): decoded files kept in memory give the same pixels as reading the files,
stay within their budget, and start empty in every DataLoader worker."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from cinedit.configs import ConfigError
from cinedit.configs.data import DataConfig
from cinedit.configs.tokenizer import debug, f32t4c128
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta
from cinedit.data.video import ClipReader, MediaCache, MediaError, read_video


@pytest.fixture(scope="module")
def meta(sample_data):
    return read_meta(sample_data[1])


def test_cached_reads_are_the_same_pixels(meta):
    plain = VideoDataset(meta, DataConfig())
    cached = VideoDataset(meta, DataConfig(decode_cache_mb=512))
    videos = [i for i in range(len(meta)) if meta["num_frames"][i] > 1][:3]
    images = [i for i in range(len(meta)) if meta["num_frames"][i] == 1][:3]
    items = [(i, t, h, w, seed) for i in videos for (t, h, w) in ((8, 64, 64), (4, 96, 160)) for seed in (0, 7, 123)]
    items += [(i, 1, h, w, seed) for i in images for (h, w) in ((64, 64), (128, 96)) for seed in (0, 5)]
    for item in items + items[::-1]:  # the second pass reads from memory
        a, b = plain[item]["video"], cached[item]["video"]
        assert torch.equal(a, b), item
    assert len(cached.cache) == len(videos) + len(images)
    files = len(videos) + len(images)
    assert cached.cache.misses == files and cached.cache.hits == 2 * len(items) - files


def test_a_cached_clip_is_decoded_once(meta):
    path = meta["path"][next(i for i in range(len(meta)) if meta["num_frames"][i] > 1)]
    cache = MediaCache(512 * 2**20)
    reader = cache.clip(path)
    decoded = reader.frames_decoded
    assert decoded >= 30 and reader.nbytes > 0
    for start in (0, 9, 20):
        read_video(path, num_frames=8, stride=1, size=(64, 64), start=start, cache=cache)
    assert cache.clip(path) is reader and reader.frames_decoded == decoded  # no decoding after the first read
    with ClipReader(path) as fresh:
        assert (fresh.read([3, 4, 5], (32, 32)) == reader.read([3, 4, 5], (32, 32))).all()


def test_the_budget_evicts_the_least_recently_used(meta):
    paths = [meta["path"][i] for i in range(len(meta)) if meta["num_frames"][i] > 1][:3]
    sizes = [MediaCache(2**30).clip(p).nbytes for p in paths]
    cache = MediaCache(sizes[0] + sizes[1] + sizes[2] // 2)
    cache.clip(paths[0]), cache.clip(paths[1])
    cache.clip(paths[0])  # most recent now: paths[1] goes first
    cache.clip(paths[2])
    assert cache.nbytes <= cache.max_bytes
    assert paths[0] in cache._items and paths[2] in cache._items and paths[1] not in cache._items
    tiny = MediaCache(sizes[0] // 2)  # a file larger than the budget is read, not kept
    assert tiny.clip(paths[0]).nbytes == sizes[0] and len(tiny) == 0 and tiny.nbytes == 0


def test_a_pickled_cache_starts_empty(meta):
    ds = VideoDataset(meta, DataConfig(decode_cache_mb=64))
    ds[(0, 1, 64, 64, 0)]
    assert len(ds.cache) == 1
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert len(copy.cache) == 0 and copy.cache.max_bytes == 64 * 2**20
    assert torch.equal(copy[(0, 1, 64, 64, 0)]["video"], ds[(0, 1, 64, 64, 0)]["video"])


def test_a_truncated_clip_fails_the_same_way_cached(meta, tmp_path):
    i = max(range(len(meta)), key=lambda k: meta["num_frames"][k])
    src = meta["path"][i]
    bad = tmp_path / "cut.mp4"
    data = open(src, "rb").read()
    bad.write_bytes(data[: len(data) * 2 // 5])
    n = int(meta["num_frames"][i])
    outcomes = []
    for cache in (None, MediaCache(2**30), MediaCache(2**30)):
        try:
            got = read_video(bad, num_frames=n, stride=1, start=0, total_frames=n, cache=cache)
            outcomes.append(("ok", got.shape))
        except MediaError as e:
            outcomes.append(("error", str(e)))
    assert outcomes[0][0] == "error" and "truncated" in outcomes[0][1]
    assert outcomes[1] == outcomes[0] == outcomes[2]
    missing = tmp_path / "gone.png"
    shutil.copy(meta["path"][0], missing)
    cache = MediaCache(2**30)
    read_video(missing, size=(64, 64), cache=cache)
    missing.unlink()
    read_video(missing, size=(64, 64), cache=cache)  # kept in memory: the first read's pixels
    with pytest.raises(MediaError, match="no such file"):
        read_video(missing, size=(64, 64), cache=MediaCache(2**30))


def test_config_checks_and_presets():
    with pytest.raises(ConfigError, match="decode_cache_mb"):
        DataConfig(decode_cache_mb=-1).validate()
    assert debug().data.decode_cache_mb > 0 and f32t4c128().data.decode_cache_mb == 0
