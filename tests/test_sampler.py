"""Distributed bucket batch sampler: disjoint ranks, equal steps, CP sharing, exact resume (data/sampler.py)."""

import numpy as np
import pandas as pd
import pytest
import torch

from cinedit.configs.data import BucketConfig, DataConfig
from cinedit.data.buckets import mix_seed
from cinedit.data.cache import CacheWriter
from cinedit.data.dataset import CachedLatentDataset
from cinedit.data.sampler import (
    BucketBatchSampler,
    PackingSampler,
    SampleItem,
    build_dataloader,
    build_sampler,
    warn_never_batched,
)
from cinedit.runtime.layout import dist_dp_rank_size, dp_rank_size

BUCKETS = BucketConfig(
    table={
        "128px": {1: (0.5, 4), 8: (1.0, 2), 16: (1.0, 1)},
        "64px": {1: (1.0, 6), 4: (1.0, 3), 8: (1.0, 2)},
    }
)


def make_meta(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    side = rng.choice([60, 64, 100, 128, 200], size=n)
    ratio = rng.choice([0.5, 0.75, 1.0, 1.5], size=n)
    frames = rng.choice([1, 1, 5, 12, 20, 40], size=n)
    return pd.DataFrame(
        {
            "path": [f"clip{i}.mp4" for i in range(n)],
            "text": [f"caption {i}" for i in range(n)],
            "num_frames": frames,
            "height": (side * np.sqrt(ratio)).astype(int),
            "width": (side / np.sqrt(ratio)).astype(int),
            "fps": np.where(frames > 1, rng.choice([24.0, 30.0, 60.0], size=n), 0.0),
        }
    )


def run(sampler: BucketBatchSampler, steps: int | None = None) -> list[list[SampleItem]]:
    out = []
    for batch in sampler:
        out.append(batch)
        if steps is not None and len(out) == steps:
            break
    return out


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    return make_meta()


def test_batches_are_full_and_homogeneous(meta):
    s = BucketBatchSampler(meta, BUCKETS, seed=3)
    batches = run(s)
    assert len(batches) == len(s) == s.num_batches > 20
    for batch in batches:
        shapes = {(it.num_frames, it.height, it.width) for it in batch}
        assert len(shapes) == 1
        shape = shapes.pop()
        bucket = next(b for b in s.bucketer.buckets if b.shape == shape)
        assert len(batch) == s.bucketer.batch_size(bucket)
    # Bucket shapes really depend on the sample (images and videos both present).
    assert {it.num_frames for b in batches for it in b} >= {1, 4, 8, 16}
    indices = [it.index for b in batches for it in b]
    assert len(indices) == len(set(indices))
    assert s.epoch == 1  # a finished epoch moves on


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_are_disjoint_and_have_equal_steps(meta, dp_size):
    samplers = [BucketBatchSampler(meta, BUCKETS, dp_rank=r, dp_size=dp_size, seed=5) for r in range(dp_size)]
    expected = len(samplers[0])
    assert expected == samplers[0].num_batches // dp_size
    per_rank = [run(s) for s in samplers]
    assert {len(b) for b in per_rank} == {expected}
    seen = [{it.index for b in batches for it in b} for batches in per_rank]
    for i in range(dp_size):
        for j in range(i + 1, dp_size):
            assert not seen[i] & seen[j]
    # Rank r's step s is global batch s * dp_size + r of the one seeded order.
    glob = samplers[0].global_batches(epoch=0)
    for r, batches in enumerate(per_rank):
        assert batches == [glob[s * dp_size + r] for s in range(len(batches))]


def test_order_depends_on_seed_and_epoch(meta):
    a, b = BucketBatchSampler(meta, BUCKETS, seed=1), BucketBatchSampler(meta, BUCKETS, seed=1)
    assert run(a) == run(b)
    assert a.epoch == 1
    assert run(a) != run(BucketBatchSampler(meta, BUCKETS, seed=1))
    c = BucketBatchSampler(meta, BUCKETS, seed=1)
    c.set_epoch(1)
    assert run(c) == b.global_batches(epoch=1)
    assert run(BucketBatchSampler(meta, BUCKETS, seed=2)) != b.global_batches(epoch=0)


def test_per_sample_seed_depends_on_epoch_not_rank(meta):
    s = BucketBatchSampler(meta, BUCKETS, seed=1)
    seeds0 = {it.index: it.seed for b in s.global_batches(0) for it in b}
    seeds1 = {it.index: it.seed for b in s.global_batches(1) for it in b}
    common = seeds0.keys() & seeds1.keys()
    assert common and all(seeds0[i] != seeds1[i] for i in common)
    s2 = BucketBatchSampler(meta, BUCKETS, dp_rank=1, dp_size=2, seed=1)
    assert all(seeds0[it.index] == it.seed for b in run(s2) for it in b)


def test_context_parallel_members_share_batches(meta):
    world, cp = 4, 2
    ranks = [dp_rank_size(r, world, cp) for r in range(world)]
    assert ranks == [(0, 2), (0, 2), (1, 2), (1, 2)]
    per_rank = [run(BucketBatchSampler(meta, BUCKETS, *ranks[r], seed=9)) for r in range(world)]
    assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]
    assert not {it.index for b in per_rank[0] for it in b} & {it.index for b in per_rank[2] for it in b}
    with pytest.raises(ValueError, match="multiple"):
        dp_rank_size(0, 6, 4)
    with pytest.raises(ValueError, match="out of range"):
        dp_rank_size(4, 4, 2)
    assert dist_dp_rank_size(2) == (0, 1)  # not initialised: a single process


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_mid_epoch_same_dp(meta, dp_size):
    for r in range(dp_size):
        full = run(BucketBatchSampler(meta, BUCKETS, r, dp_size, seed=4))
        s = BucketBatchSampler(meta, BUCKETS, r, dp_size, seed=4)
        head = run(s, steps=7)
        state = s.state_dict()
        assert state["consumed"] == 7 * dp_size and state["epoch"] == 0
        resumed = BucketBatchSampler(meta, BUCKETS, r, dp_size, seed=123)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # a training loop calls this after loading; the position must survive it
        assert resumed.remaining_steps() == len(full) - 7
        assert head + run(resumed) == full


def test_resume_with_other_dp_size_covers_remaining_global_order(meta):
    old = BucketBatchSampler(meta, BUCKETS, dp_rank=0, dp_size=2, seed=4)
    run(old, steps=5)
    state = old.state_dict()
    glob = old.global_batches(epoch=0)
    new_dp = 3
    per_rank = []
    for r in range(new_dp):
        s = BucketBatchSampler(meta, BUCKETS, dp_rank=r, dp_size=new_dp)
        s.load_state_dict(state)
        per_rank.append(run(s))
    steps = (len(glob) - 10) // new_dp
    assert all(len(b) == steps for b in per_rank)
    interleaved = [per_rank[r][s] for s in range(steps) for r in range(new_dp)]
    assert interleaved == glob[10 : 10 + steps * new_dp]


def test_state_for_other_dataset_is_rejected(meta):
    state = BucketBatchSampler(meta, BUCKETS).state_dict()
    with pytest.raises(ValueError, match="same metadata"):
        BucketBatchSampler(meta.iloc[:100], BUCKETS).load_state_dict(state)


def make_cache(path, n: int = 48) -> CachedLatentDataset:
    """A latent cache whose stored shapes are bucket shapes of `LOADER_BUCKETS`."""
    shapes = [(1, 64, 64), (4, 64, 64), (8, 128, 128), (1, 128, 128)]
    with CacheWriter(path, shard_size_mb=0.01) as w:
        for i in range(n):
            t, h, wd = shapes[i % len(shapes)]
            latent = torch.full((4, (t + 3) // 4, h // 32, wd // 32), float(i))
            txt = torch.full((3 + i % 5, 8), float(i))
            meta = {"num_frames": t, "height": h, "width": wd, "fps": 24.0, "text": f"c{i}"}
            w.add(f"s{i}", {"latent": latent, "txt": txt, "vec": torch.full((8,), float(i))}, meta)
    return CachedLatentDataset(path)


LOADER_BUCKETS = BucketConfig(table={"128px": {1: (1.0, 2), 8: (1.0, 2)}, "64px": {1: (1.0, 3), 4: (1.0, 2)}})


def loader_indices(loader, steps: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch["index"])
        if steps is not None and len(out) == steps:
            break
    return out


@pytest.mark.parametrize("workers", [(2, 0), (0, 2)])
def test_loader_resume_with_other_worker_count(tmp_path, workers):
    ds = make_cache(tmp_path / "cache")
    cfg = DataConfig(buckets=LOADER_BUCKETS, seed=11)
    full = loader_indices(build_dataloader(ds, build_sampler(ds, cfg), num_workers=0))
    assert len(full) == 12 // 3 + 3 * (12 // 2)  # 12 samples per shape; batch 3 for 64px images, else 2
    before, after = workers
    sampler = build_sampler(ds, cfg)
    loader = build_dataloader(ds, sampler, num_workers=before, prefetch_factor=2)
    head = loader_indices(loader, steps=5)
    state = loader.state_dict()
    assert state["consumed"] == 5
    if before:
        assert sampler.state_dict()["consumed"] > 5  # workers read ahead: the bare sampler state would skip batches
    resumed = build_dataloader(ds, build_sampler(ds, cfg), num_workers=after)
    resumed.load_state_dict(state)
    assert head + loader_indices(resumed) == full
    # The interrupted loader itself continues from what it yielded, not from where its workers read.
    assert loader_indices(loader) == full[5:]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["consumed"] == 0


def test_loader_batches_collate_by_bucket(tmp_path):
    ds = make_cache(tmp_path / "cache")
    loader = build_dataloader(ds, build_sampler(ds, DataConfig(buckets=LOADER_BUCKETS)), num_workers=0)
    assert len(loader) == len(loader.sampler)
    for batch in loader:
        b = len(batch["index"])
        assert batch["latent"].shape[0] == b and batch["vec"].shape == (b, 8)
        assert batch["txt"].shape[:2] == batch["txt_mask"].shape
        for k, i in enumerate(batch["index"]):
            assert torch.all(batch["latent"][k] == i)
            assert batch["txt_mask"][k].sum() == 3 + i % 5


# ---------------------------------------------------------------------------------------------------- packing


def latent_tokens(t: int, h: int, w: int) -> int:
    """The debug DC-AE's tokens (4x temporal, 32x spatial, patch 1) plus 8 text tokens."""
    return max(1, t // 4) * (h // 32) * (w // 32) + 8


def packer(meta, budget: int = 100, dp_rank: int = 0, dp_size: int = 1, seed: int = 3):
    return PackingSampler(meta, BUCKETS, budget, latent_tokens, dp_rank, dp_size, seed)


def test_packs_fill_the_token_budget_with_mixed_shapes(meta):
    s = packer(meta)
    packs = run(s)
    assert packs and all(s.pack_tokens(p) <= 100 for p in packs)
    # Greedy filling: adding the next sample would pass the budget, so packs are mostly full.
    assert np.mean([s.pack_tokens(p) for p in packs]) > 75
    shapes = [{(i.num_frames, i.height, i.width) for i in p} for p in packs]
    assert max(len(x) for x in shapes) > 1  # a pack mixes images, clips and sizes
    used = [i.index for p in packs for i in p]
    assert len(used) == len(set(used))  # each sample at most once an epoch
    # Every sample goes to its bucket's shape, as the bucket sampler would load it.
    codes = s.bucketer.assign_meta(meta, seed=mix_seed(3, 0))
    assert all(s.bucketer.buckets[codes[i.index]].shape == (i.num_frames, i.height, i.width) for p in packs for i in p)


def test_packs_are_seeded_split_over_ranks_and_resume_exactly(meta):
    whole = packer(meta).global_batches()
    assert whole == packer(meta).global_batches() and whole != packer(meta, seed=4).global_batches()
    r0, r1 = run(packer(meta, dp_rank=0, dp_size=2)), run(packer(meta, dp_rank=1, dp_size=2))
    assert r0 == whole[0 : 2 * len(r0) : 2] and r1 == whole[1 : 2 * len(r1) : 2]
    first = packer(meta)
    head = run(first, 5)
    resumed = packer(meta)
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed) == run(packer(meta))


def test_a_budget_below_one_sample_is_refused(meta):
    with pytest.raises(ValueError, match="tokens_per_batch=10 is smaller than one sample"):
        packer(meta, budget=10)


def test_samples_alone_in_their_bucket_are_named_as_never_batched(capsys):
    # Four 8-frame 64px clips at one aspect ratio, and one at another: with a batch of 2 the lone clip never fills
    # a batch (issue 16: the sample data's only 16:9 clip was never trained on), and the trainers warn about it.
    meta = pd.DataFrame(
        {
            "path": [f"wide{i}.mp4" for i in range(4)] + ["tall.mp4"],
            "text": ["x"] * 5,
            "num_frames": [8] * 5,
            "height": [64, 64, 64, 64, 128],
            "width": [64, 64, 64, 64, 32],
            "fps": [24.0] * 5,
        }
    )
    sampler = BucketBatchSampler(meta, BucketConfig(table={"64px": {8: (1.0, 2)}}), seed=0)
    assert sampler.never_batched() == [4]
    assert warn_never_batched(sampler, "training video") == 1
    err = capsys.readouterr().err
    assert "1 of 5 training video samples are in no batch of the first 4 epochs" in err and "tall.mp4" in err
    # Batches of one take every sample, and nothing is printed.
    one = BucketBatchSampler(meta, BucketConfig(table={"64px": {8: (1.0, 1)}}), seed=0)
    assert one.never_batched() == [] and warn_never_batched(one) == 0 and capsys.readouterr().err == ""
