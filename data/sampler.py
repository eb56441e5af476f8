"""Distributed bucket batch sampler with exact resume, and a DataLoader wrapper that tracks consumed batches.

One epoch's plan, identical on every rank because it depends only on (seed, epoch):

1. assign every sample to a bucket (`Bucketer`, keep draws seeded by (seed, epoch));
2. shuffle the samples of each bucket and chunk them into batches of the bucket's batch size,
   dropping each bucket's incomplete last batch (so every batch has its bucket's full size);
3. shuffle the list of batches globally.

Step s of data-parallel rank r takes global batch ``consumed_at_start + s * dp_size + r``; the tail
that cannot give every rank a batch is dropped, so all ranks run the same number of steps. The
position is stored as the global number of batches consumed, so a run resumed with another dp_size
re-splits exactly the remaining batches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from cinedit.configs.data import BucketConfig, DataConfig
from cinedit.data.buckets import Bucket, Bucketer, mix_seed
from cinedit.data.dataset import collate


class SampleItem(NamedTuple):
    """What the sampler hands the dataset: a sample and the bucket shape to load it at."""

    index: int
    num_frames: int
    height: int
    width: int
    seed: int  # per (seed, epoch, index): the random temporal crop, reproducible on resume


@dataclass
class _Plan:
    flat: np.ndarray  # sample indices, batch after batch (in bucket order)
    starts: np.ndarray  # (num_batches,) offset of each batch in `flat`, in the shuffled global order
    sizes: np.ndarray  # (num_batches,)
    codes: np.ndarray  # (num_batches,) bucket code of each batch


class BucketBatchSampler:
    """Yields this data-parallel rank's batches (lists of `SampleItem`) of one epoch, bucket by bucket.

    `data` is a metadata DataFrame or a dataset with a `.meta` one; row positions are sample indices.
    With `exact_shape` (default: the dataset's `exact_shape` attribute, set by cached-latent datasets)
    a sample whose bucket shape differs from its stored (num_frames, height, width) is dropped, since
    cached latents cannot be resized.
    """

    def __init__(
        self,
        data: pd.DataFrame | Any,
        buckets: BucketConfig | Bucketer,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        frame_stride: int = 0,
        exact_shape: bool | None = None,
    ):
        self.meta: pd.DataFrame = data if isinstance(data, pd.DataFrame) else data.meta
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        self.bucketer = buckets if isinstance(buckets, Bucketer) else Bucketer(buckets, frame_stride)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.exact_shape = getattr(data, "exact_shape", False) if exact_shape is None else exact_shape
        self.epoch = 0
        self._consumed = 0  # global batches of this epoch handed out
        self._plan_cache: tuple[tuple[int, int], _Plan] | None = None

    def _codes(self, epoch: int) -> np.ndarray:
        """Every sample's bucket code this epoch (-1: dropped), seeded by (seed, epoch); with `exact_shape`, a sample
        whose bucket shape is not its stored shape is dropped."""
        codes = self.bucketer.assign_meta(self.meta, seed=mix_seed(self.seed, epoch))
        if self.exact_shape:
            shapes = np.array([b.shape for b in self.bucketer.buckets] + [(-1, -1, -1)])
            stored = self.meta[["num_frames", "height", "width"]].to_numpy()
            codes = np.where((shapes[codes] == stored).all(axis=1), codes, -1)
        return codes

    def _plan(self, epoch: int) -> _Plan:
        key = (self.seed, epoch)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        codes = self._codes(epoch)
        rng = np.random.default_rng(mix_seed(self.seed, epoch, 1))
        flat, sizes, batch_codes = [], [], []
        # Group sample indices by bucket in one sort (buckets x samples comparisons would not scale).
        by_code = np.argsort(codes, kind="stable")
        by_code = by_code[codes[by_code] >= 0]
        uniq, counts = np.unique(codes[by_code], return_counts=True)
        for code, group in zip(uniq, np.split(by_code, np.cumsum(counts)[:-1])):
            members = rng.permutation(group)
            bs = self.bucketer.batch_size(self.bucketer.buckets[code])
            nb = len(members) // bs
            flat.append(members[: nb * bs])
            sizes += [bs] * nb
            batch_codes += [int(code)] * nb
        sizes_arr = np.array(sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes_arr)[:-1]]).astype(np.int64) if sizes else sizes_arr
        order = rng.permutation(len(sizes_arr))
        plan = _Plan(
            flat=np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64),
            starts=starts[order],
            sizes=sizes_arr[order],
            codes=np.array(batch_codes, dtype=np.int64)[order],
        )
        self._plan_cache = (key, plan)
        return plan

    def _batch(self, plan: _Plan, b: int, epoch: int) -> list[SampleItem]:
        bucket: Bucket = self.bucketer.buckets[plan.codes[b]]
        idx = plan.flat[plan.starts[b] : plan.starts[b] + plan.sizes[b]]
        t, h, w = bucket.shape
        return [SampleItem(int(i), t, h, w, mix_seed(self.seed, epoch, int(i))) for i in idx]

    def never_batched(self, epochs: int = 4) -> list[int]:
        """Sample indices (row positions) that no batch of epochs 0..epochs-1 holds: a sample that fits no bucket, or
        whose bucket's members this epoch do not fill a batch, is not trained on. Bucket draws are seeded per epoch,
        so a sample can miss some epochs only; one missing every epoch checked is most likely never read."""
        seen = np.zeros(len(self.meta), dtype=bool)
        for epoch in range(epochs):
            seen[self._plan(epoch).flat] = True
        return np.flatnonzero(~seen).tolist()

    @property
    def num_batches(self) -> int:
        """Global batches in the current epoch's plan, before the tail is dropped."""
        return len(self._plan(self.epoch).codes)

    def __len__(self) -> int:
        """Steps per (full) epoch for each rank."""
        return self.num_batches // self.dp_size

    def remaining_steps(self) -> int:
        """Steps left in the current epoch from the current position."""
        return max(0, self.num_batches - self._consumed) // self.dp_size

    def global_batches(self, epoch: int | None = None) -> list[list[SampleItem]]:
        """All batches of an epoch in the global order, every rank's interleaved (for inspection and tests)."""
        epoch = self.epoch if epoch is None else epoch
        plan = self._plan(epoch)
        return [self._batch(plan, b, epoch) for b in range(len(plan.codes))]

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; the current epoch keeps its position (so resume, then set_epoch, works)."""
        if epoch != self.epoch:
            self.epoch, self._consumed = epoch, 0

    def __iter__(self) -> Iterator[list[SampleItem]]:
        epoch = self.epoch
        plan = self._plan(epoch)
        while self._consumed + self.dp_size <= len(plan.codes):
            b = self._consumed + self.dp_rank
            self._consumed += self.dp_size
            yield self._batch(plan, b, epoch)
        # Epoch done: a checkpoint taken now, or the next iteration, starts the next epoch.
        self.epoch, self._consumed = epoch + 1, 0

    def state_dict(self) -> dict:
        """Position to resume from: epoch, global batches consumed in it, seed (and the dataset size, to check)."""
        return {
            "epoch": self.epoch,
            "consumed": self._consumed,
            "seed": self.seed,
            "num_samples": len(self.meta),
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a `state_dict()` position; dp_size may differ (the remaining batches are re-split)."""
        if state.get("num_samples", len(self.meta)) != len(self.meta):
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples but the dataset has {len(self.meta)}: resume "
                f"with the same metadata, or drop the sampler state to start a fresh epoch"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])


@dataclass
class _PackPlan(_Plan):
    sample_codes: np.ndarray  # bucket code of every entry of `flat` (packs mix buckets)


class PackingSampler(BucketBatchSampler):
    """Yields packs instead of batches: samples of any buckets, in one seeded global order, filled greedily up to
    `tokens_per_batch` tokens each (`tokens(t, h, w)` counts a sample loaded at bucket shape (t, h, w): its latent
    tokens plus its text tokens), for a packed forward with block-diagonal attention.

    Buckets still decide each sample's shape (and keep probabilities); their batch sizes do not matter. The epoch's
    packs are fixed by (seed, epoch) like the bucket batches, so the position, `state_dict` and the data-parallel
    split work exactly as in `BucketBatchSampler`.
    """

    def __init__(
        self,
        data: pd.DataFrame | Any,
        buckets: BucketConfig | Bucketer,
        tokens_per_batch: int,
        tokens: Callable[[int, int, int], int],
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        frame_stride: int = 0,
        exact_shape: bool | None = None,
    ):
        super().__init__(data, buckets, dp_rank, dp_size, seed, frame_stride, exact_shape)
        if tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch must be positive, got {tokens_per_batch}")
        self.tokens_per_batch = tokens_per_batch
        self.bucket_tokens = np.array([tokens(*b.shape) for b in self.bucketer.buckets], dtype=np.int64)
        too_big = [b for b, n in zip(self.bucketer.buckets, self.bucket_tokens) if n > tokens_per_batch]
        if too_big:
            worst = max(too_big, key=lambda b: b.num_frames * b.height * b.width)
            raise ValueError(
                f"data.tokens_per_batch={tokens_per_batch} is smaller than one sample of bucket {worst.resolution} "
                f"{worst.shape} ({self.bucket_tokens[self.bucketer.buckets.index(worst)]} tokens): raise it to at "
                f"least {int(self.bucket_tokens.max())} or drop the bucket"
            )

    def _plan(self, epoch: int) -> _PackPlan:
        key = (self.seed, epoch)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        codes = self._codes(epoch)
        rng = np.random.default_rng(mix_seed(self.seed, epoch, 2))
        order = rng.permutation(np.flatnonzero(codes >= 0))
        need = self.bucket_tokens[codes[order]]
        sizes, count, used = [], 0, 0
        for n in need:
            if count and used + n > self.tokens_per_batch:
                sizes.append(count)
                count, used = 0, 0
            count, used = count + 1, used + int(n)
        # The last, part-filled pack is dropped like a bucket's incomplete batch.
        kept = int(np.sum(sizes))
        sizes_arr = np.array(sizes, dtype=np.int64)
        plan = _PackPlan(
            flat=order[:kept],
            starts=np.concatenate([[0], np.cumsum(sizes_arr)[:-1]]).astype(np.int64) if sizes else sizes_arr,
            sizes=sizes_arr,
            codes=np.full(len(sizes_arr), -1, dtype=np.int64),
            sample_codes=codes[order[:kept]],
        )
        self._plan_cache = (key, plan)
        return plan

    def _batch(self, plan: _PackPlan, b: int, epoch: int) -> list[SampleItem]:
        lo, hi = plan.starts[b], plan.starts[b] + plan.sizes[b]
        items = []
        for i, code in zip(plan.flat[lo:hi], plan.sample_codes[lo:hi]):
            t, h, w = self.bucketer.buckets[code].shape
            items.append(SampleItem(int(i), t, h, w, mix_seed(self.seed, epoch, int(i))))
        return items

    def pack_tokens(self, pack: list[SampleItem]) -> int:
        """Tokens of one pack (what the budget counts)."""
        index = {b.shape: n for b, n in zip(self.bucketer.buckets, self.bucket_tokens)}
        return int(sum(index[(s.num_frames, s.height, s.width)] for s in pack))


def one_thread_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: one torch thread per worker process.

    A worker inherits the parent's thread count (all cores), so `num_workers` workers plus the training process
    would run (1 + num_workers) x cores threads and slow every torch process on the machine; decoding and resizing
    a clip needs no intra-op parallelism.
    """
    torch.set_num_threads(1)


class BucketLoader:
    """A torch DataLoader over a `BucketBatchSampler` whose `state_dict()` is at the batches actually yielded.

    DataLoader workers read the sampler ahead of the training loop, so the sampler's own position is
    past what was trained on; this wrapper counts yielded batches instead, and re-seats the sampler at
    that position whenever iteration (re)starts. Resume therefore works with any num_workers. Each worker
    runs one torch thread (`one_thread_worker`).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: BucketBatchSampler,
        num_workers: int = 0,
        collate_fn: Callable[[list[dict]], dict] = collate,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        self.sampler = sampler
        self.loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            worker_init_fn=one_thread_worker if num_workers > 0 else None,
        )
        self._state = sampler.state_dict()

    def __len__(self) -> int:
        """Steps per (full) epoch for this rank."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        self.sampler.load_state_dict(self._state)
        start = dict(self._state)
        for n, batch in enumerate(self.loader, 1):
            self._state = {**start, "consumed": start["consumed"] + n * self.sampler.dp_size}
            yield batch
        self._state = self.sampler.state_dict()

    def set_epoch(self, epoch: int) -> None:
        """`BucketBatchSampler.set_epoch` relative to the consumed position."""
        self.sampler.load_state_dict(self._state)
        self.sampler.set_epoch(epoch)
        self._state = self.sampler.state_dict()

    def state_dict(self) -> dict:
        """Sampler state at the last batch yielded to the caller."""
        return {**self._state, "dp_size": self.sampler.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a `state_dict()` position (of this loader or of a bare sampler)."""
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()


def warn_never_batched(sampler: BucketBatchSampler, what: str = "training", epochs: int = 4, show: int = 5) -> int:
    """Print a warning naming the samples no batch of the first `epochs` epochs holds (`never_batched`); returns
    how many there are."""
    missing = sampler.never_batched(epochs)
    if missing:
        paths = sampler.meta["path"].iloc[missing[:show]].tolist() if "path" in sampler.meta else missing[:show]
        more = f" and {len(missing) - show} more" if len(missing) > show else ""
        print(
            f"warning: {len(missing)} of {len(sampler.meta)} {what} samples are in no batch of the first {epochs} "
            f"epochs, so they are never trained on: {', '.join(map(str, paths))}{more}. Their buckets hold fewer "
            f"samples than the bucket's batch size (or none fits them): lower those batch sizes or add data",
            file=sys.stderr,
        )
    return len(missing)


def build_sampler(dataset: Any, config: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> BucketBatchSampler:
    """A `BucketBatchSampler` over `dataset` from the data section of a run config."""
    config.validate()
    return BucketBatchSampler(dataset, config.buckets, dp_rank, dp_size, config.seed, config.frame_stride)


def build_dataloader(
    dataset: Dataset, sampler: BucketBatchSampler, num_workers: int = 0, prefetch_factor: int = 2, **kwargs: Any
) -> BucketLoader:
    """A `BucketLoader` (DataLoader with consumed-position tracking) over `sampler`."""
    return BucketLoader(dataset, sampler, num_workers=num_workers, prefetch_factor=prefetch_factor, **kwargs)
