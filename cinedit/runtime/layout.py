"""The dp x cp process layout: contiguous context-parallel groups, one sample per group.

Ranks d*cp .. d*cp + cp - 1 share sample d (data-parallel rank d); the dp group of a rank holds the ranks with its
cp rank. The data samplers split the data with `dp_rank_size`, the boosters build their groups with `build_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


def dp_rank_size(rank: int, world_size: int, cp_size: int = 1) -> tuple[int, int]:
    """(dp_rank, dp_size) of a global rank; context-parallel groups are contiguous ranks sharing samples."""
    if cp_size < 1 or world_size % cp_size:
        raise ValueError(f"world size {world_size} is not a multiple of the context-parallel size {cp_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return rank // cp_size, world_size // cp_size


def dist_dp_rank_size(cp_size: int = 1) -> tuple[int, int]:
    """`dp_rank_size` of this process, read from torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dp_rank_size(dist.get_rank(), dist.get_world_size(), cp_size)
    return 0, 1


@dataclass(frozen=True)
class Layout:
    """This rank's place in the dp x cp grid and its two groups."""

    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    dp_group: Any  # ranks with this rank's cp rank, one per sample (WORLD when cp_size is 1)
    cp_group: Any  # the cp_size contiguous ranks sharing this rank's sample (None when cp_size is 1)


def cp_group_ranks(rank: int, world_size: int, cp_size: int) -> list[int]:
    """The ranks of `rank`'s cp group: contiguous, as `dp_rank_size` assigns samples."""
    dp_rank, _ = dp_rank_size(rank, world_size, cp_size)
    return list(range(dp_rank * cp_size, (dp_rank + 1) * cp_size))


def dp_group_ranks(rank: int, world_size: int, cp_size: int) -> list[int]:
    """The ranks of `rank`'s dp group: one per sample, all at `rank`'s cp rank."""
    cp_group_ranks(rank, world_size, cp_size)  # validates
    return list(range(rank % cp_size, world_size, cp_size))


def _layout(rank: int, world_size: int, cp_size: int, dp_group: Any, cp_group: Any) -> Layout:
    dp_rank, dp_size = dp_rank_size(rank, world_size, cp_size)
    return Layout(dp_rank, dp_size, rank % cp_size, cp_size, dp_group, cp_group)


def build_layout(cp_size: int) -> Layout:
    """Make the dp and cp groups of the default process group (every rank must call it, in the same order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % cp_size:
        raise ValueError(f"world size {world} is not a multiple of parallel.cp_size {cp_size}")
    if cp_size == 1:
        return _layout(rank, world, 1, dist.group.WORLD, None)
    dp_group = cp_group = None
    # dist.new_group is collective over the whole world: every rank creates every group, in the same order.
    for c in range(cp_size):
        ranks = list(range(c, world, cp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    for d in range(world // cp_size):
        ranks = list(range(d * cp_size, (d + 1) * cp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            cp_group = group
    return _layout(rank, world, cp_size, dp_group, cp_group)


def layout_from_groups(dp_group: Any, cp_group: Any, cp_size: int) -> Layout:
    """The layout of groups made elsewhere (HybridParallelPlugin's dp and sp groups), checked to be ours."""
    rank, world = dist.get_rank(), dist.get_world_size()
    got = dist.get_process_group_ranks(cp_group), dist.get_process_group_ranks(dp_group)
    want = cp_group_ranks(rank, world, cp_size), dp_group_ranks(rank, world, cp_size)
    if list(got[0]) != want[0] or list(got[1]) != want[1]:
        raise RuntimeError(f"rank {rank}: plugin groups (cp {got[0]}, dp {got[1]}) are not the layout's {want}")
    return _layout(rank, world, cp_size, dp_group, cp_group)
