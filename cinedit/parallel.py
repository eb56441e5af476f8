"""Data and context parallelism for the trainers: the dp x cp process layout and the booster built from config.

Plugins (`ParallelConfig.plugin`):

- ``"torch"``: plain PyTorch, DDP when the world has more than one process.
- ``"ddp"``: ColossalAI's `TorchDDPPlugin` (CPU or GPU).
- ``"zero"``: ColossalAI's `LowLevelZeroPlugin`, ZeRO stage 1 or 2, bf16 working weights over fp32 masters.
- ``"hybrid"``: ColossalAI's `HybridParallelPlugin` for context parallelism: tp = pp = 1, its sequence-parallel
  axis is our cp group, ZeRO over dp x cp, and a policy that leaves the model's modules as they are.
- ``"auto"``: ``"zero"`` on CUDA (``"hybrid"`` when cp_size > 1 in bf16), ``"ddp"`` on CPU.

ColossalAI 0.5.0's ZeRO optimizer asserts a CUDA or NPU device; tests run it on CPU through a test-only shim.

Layout: the world is dp x cp with contiguous cp groups: ranks d*cp .. d*cp + cp - 1 share sample d (as
`cinedit.data.sampler.dp_rank_size` splits the data); the dp group of a rank holds the ranks with its cp rank.

Gradients with cp > 1: every rank of a cp group computes the same loss from the gathered output, and the sum of
the group's parameter gradients is the gradient of that loss. Every plugin averages gradients over all dp x cp
ranks, so `backward` multiplies the loss by cp_size: the average is then the mean over dp of full gradients.

Checkpoints (`save_*` / `load_*` take a directory; every rank calls them) are written sharded: every rank writes
whole tensors of its own share of the parameters (balanced by size), so no rank ever holds the whole optimizer.
The format is the same for every plugin and every number of processes, so a run resumes on another one:

- ``model-RRRRR-of-WWWWW.safetensors`` + ``model.index.json`` (name -> file): the model state in the working dtype.
- ``optimizer-RRRRR-of-WWWWW.pt`` (``{name: {key: full tensor}}``) + ``optimizer.index.json`` (param groups with
  parameter names, name -> file).
- ``master-RRRRR-of-WWWWW.safetensors`` + ``master.index.json``: the fp32 master weights (zero/hybrid; their
  optimizer keeps the masters). Loading them puts the masters back exactly and sets the working weights from them,
  as a continuing run has them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from cinedit.runtime import DistInfo

PLUGINS = ("auto", "torch", "ddp", "zero", "hybrid")
PRECISIONS = ("bf16", "fp32")
CP_MODES = ("ulysses", "ring", "hybrid")
INDEX = "{}.index.json"  # model / optimizer / master


def shard_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}-{rank:05d}-of-{world:05d}" + (".pt" if kind == "optimizer" else ".safetensors")


def shard_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Which rank writes each tensor: largest first to the least loaded rank (the same answer on every rank)."""
    load, owners = [0] * world, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[name], load[r] = r, load[r] + sizes[name]
    return owners


def _write_index(path: Path, kind: str, weight_map: dict[str, str], **extra: Any) -> None:
    import json

    doc = {**extra, "weight_map": weight_map}
    (Path(path) / INDEX.format(kind)).write_text(json.dumps(doc, indent=1) + "\n")


def _read_index(path: Path, kind: str) -> dict[str, Any]:
    import json

    index = Path(path) / INDEX.format(kind)
    if not index.is_file():
        raise FileNotFoundError(f"{path} holds no {kind} checkpoint ({index.name} is missing)")
    return json.loads(index.read_text())


def _world_rank() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


@dataclass
class ParallelConfig:
    """How a trainer spreads over processes; see the module docstring."""

    # auto | torch | ddp | zero | hybrid. auto: zero on CUDA (hybrid when cp_size > 1 in bf16), ddp on CPU.
    plugin: str = "auto"
    # ZeRO stage of zero/hybrid: 1 shards the optimizer states and masters, 2 also the gradients.
    zero_stage: int = 2
    # zero/hybrid: "bf16" keeps bf16 working weights over fp32 masters. torch/ddp keep fp32 weights either way
    # (the trainers autocast). hybrid needs bf16: ColossalAI 0.5.0 refuses its ZeRO in fp32.
    precision: str = "bf16"
    # Clip the global gradient norm to this (0: no clipping); zero/hybrid clip inside their optimizer step.
    grad_clip: float = 1.0
    # ZeRO gradient reduce bucket in MB of working-precision gradients (ColossalAI counts it in M elements).
    reduce_bucket_mb: int = 128
    # Context-parallel group size: this many contiguous ranks split one sample's sequence. 1: no cp.
    cp_size: int = 1
    # How a cp group attends: "ring" (KV blocks passed around), "ulysses" (all-to-all to head shards) or
    # "hybrid" (Ulysses inside subgroups of cp_ulysses_size ranks, ring across them).
    cp_mode: str = "ring"
    # The Ulysses degree of cp_mode "hybrid" (must divide cp_size); 0 chooses it (see `ulysses_size`).
    cp_ulysses_size: int = 0

    def __post_init__(self) -> None:
        if self.plugin not in PLUGINS:
            raise ValueError(f"parallel.plugin must be one of {list(PLUGINS)}, got {self.plugin!r}")
        if self.zero_stage not in (1, 2):
            raise ValueError(f"parallel.zero_stage must be 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"parallel.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.reduce_bucket_mb < 1:
            raise ValueError(f"parallel.reduce_bucket_mb must be >= 1, got {self.reduce_bucket_mb}")
        if self.cp_size < 1:
            raise ValueError(f"parallel.cp_size must be >= 1, got {self.cp_size}")
        if self.cp_mode not in CP_MODES:
            raise ValueError(f"parallel.cp_mode must be one of {list(CP_MODES)}, got {self.cp_mode!r}")
        if self.cp_ulysses_size < 0:
            raise ValueError(f"parallel.cp_ulysses_size must be >= 0 (0: automatic), got {self.cp_ulysses_size}")
        if self.cp_ulysses_size and self.cp_mode != "hybrid":
            raise ValueError(f"parallel.cp_ulysses_size is for cp_mode 'hybrid' only, cp_mode is {self.cp_mode!r}")
        if self.cp_ulysses_size and self.cp_size % self.cp_ulysses_size:
            raise ValueError(
                f"parallel.cp_ulysses_size {self.cp_ulysses_size} must divide parallel.cp_size {self.cp_size}"
            )
        if self.plugin == "hybrid" and self.cp_size == 1:
            raise ValueError("parallel.plugin 'hybrid' is the context-parallel plugin: set cp_size > 1, or use 'zero'")
        if self.plugin == "hybrid" and self.precision != "bf16":
            raise ValueError(
                "parallel.plugin 'hybrid' needs precision 'bf16' (ColossalAI 0.5.0's HybridParallelPlugin refuses "
                "ZeRO in fp32); use plugin 'zero' with cp_size > 1 for fp32"
            )

    def resolve_plugin(self, device: torch.device) -> str:
        """The concrete plugin for `device` ("auto" resolved)."""
        if self.plugin != "auto":
            return self.plugin
        if device.type != "cuda":
            return "ddp"
        return "hybrid" if self.cp_size > 1 and self.precision == "bf16" else "zero"

    def ulysses_size(self, num_heads: int | None = None) -> int:
        """The Ulysses degree: cp_size for "ulysses", 1 for "ring", cp_ulysses_size for "hybrid"; 0 there picks
        the largest of 2, 4, 8 that divides cp_size (and `num_heads`) and leaves a ring of >= 2."""
        if self.cp_mode == "ulysses":
            return self.cp_size
        if self.cp_mode == "ring":
            return 1
        if self.cp_ulysses_size:
            return self.cp_ulysses_size
        fits = [
            u
            for u in (2, 4, 8)
            if self.cp_size % u == 0 and self.cp_size // u >= 2 and (num_heads is None or num_heads % u == 0)
        ]
        return fits[-1] if fits else 1


# ----------------------------------------------------------------------------------------------------------------------
# process layout


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
    from cinedit.data.sampler import dp_rank_size

    dp_rank, _ = dp_rank_size(rank, world_size, cp_size)
    return list(range(dp_rank * cp_size, (dp_rank + 1) * cp_size))


def dp_group_ranks(rank: int, world_size: int, cp_size: int) -> list[int]:
    """The ranks of `rank`'s dp group: one per sample, all at `rank`'s cp rank."""
    cp_group_ranks(rank, world_size, cp_size)  # validates
    return list(range(rank % cp_size, world_size, cp_size))


def _layout(rank: int, world_size: int, cp_size: int, dp_group: Any, cp_group: Any) -> Layout:
    from cinedit.data.sampler import dp_rank_size

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


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint helpers shared by the boosters


def _gather(shard: Tensor, like: Tensor, group: Any, keep: bool) -> Tensor | None:
    """The full tensor (shaped like `like`, on CPU) of ZeRO's flat shard over `group` (None: `shard` is full).

    Collective over `group`; only the rank that writes the tensor (`keep`) gets a CPU copy (others None), so the
    job holds one CPU copy of the optimizer, spread over the ranks.
    """
    if group is None:
        return shard.detach().reshape(like.shape).cpu() if keep else None
    n = dist.get_world_size(group)
    flat = shard.detach().reshape(-1).contiguous()
    if n > 1:
        out = flat.new_empty(flat.numel() * n)
        # all_gather_single is the newer name (the old one warns on torch 2.13); older releases lack it.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=group)
        flat = out
    return flat[: like.numel()].reshape(like.shape).cpu() if keep else None


def _scatter(full: Tensor, group: Any) -> Tensor:
    """This rank's flat ZeRO shard of `full` over `group` (None: `full`): the tensor padded with zeros to a
    multiple of the group size and cut in equal pieces, as ColossalAI shards it."""
    if group is None:
        return full
    n, r = dist.get_world_size(group), dist.get_rank(group)
    flat = full.reshape(-1)
    size = -(-flat.numel() // n)
    piece = flat[r * size : (r + 1) * size]
    return nn.functional.pad(piece, (0, size - piece.numel())).clone()


class _BoosterBase:
    """The shared checkpoint format. Subclasses list their optimizer's parameters via `_entries`."""

    name: str
    layout: Layout
    # ZeRO optimizers hold fp32 masters apart from the model's working weights: save and load them.
    holds_masters = False

    def __init__(self, info: DistInfo, layout: Layout):
        self.info, self.layout = info, layout
        self._names: dict[int, str] = {}

    def unwrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _inner(self, optimizer: Any) -> torch.optim.Optimizer:
        return getattr(optimizer, "optim", optimizer)

    def _remember_names(self, model: nn.Module) -> None:
        self._names = {id(p): name for name, p in self.unwrap(model).named_parameters()}

    def _entries(self, optimizer: Any) -> list[list[tuple[str, Tensor, Tensor, Any]]]:
        """Per param group: (name, optimizer's tensor, model parameter, ZeRO group or None when not sharded)."""
        out = []
        for group in self._inner(optimizer).param_groups:
            out.append([(self._names[id(p)], p, p, None) for p in group["params"]])
        return out

    def backward(self, loss: Tensor, optimizer: Any) -> None:
        # With cp > 1 each rank's gradient is its part of the group's sum, and the plugins average over dp x cp.
        if self.layout.cp_size > 1:
            loss = loss * self.layout.cp_size
        self._backward(loss, optimizer)

    def _backward(self, loss: Tensor, optimizer: Any) -> None:
        loss.backward()

    def save_model(self, model: nn.Module, path: Path) -> None:
        """Write this rank's share of the model state (every rank holds the whole working weights, ZeRO too)."""
        from safetensors.torch import save_file

        world, rank = _world_rank()
        state = self.unwrap(model).state_dict()
        owners = shard_owners({k: v.numel() for k, v in state.items()}, world)
        mine = {k: v.detach().contiguous().cpu() for k, v in state.items() if owners[k] == rank}
        save_file(mine, str(Path(path) / shard_name("model", rank, world)))
        if rank == 0:
            _write_index(path, "model", {k: shard_name("model", r, world) for k, r in owners.items()})

    def load_model(self, model: nn.Module, path: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(set(_read_index(path, "model")["weight_map"].values()))
        state = {k: v for f in files for k, v in load_file(str(Path(path) / f)).items()}
        self.unwrap(model).load_state_dict(state)
        # ZeRO: fp32 masters from the loaded working weights; `load_optimizer` replaces them by the saved ones.
        update = getattr(model, "update_master_params", None)
        if update is not None:
            update()

    def save_optimizer(self, optimizer: Any, path: Path) -> None:
        """Write this rank's share of the optimizer states (and fp32 masters), whole tensors by parameter name.

        Collective: ZeRO shards are gathered parameter by parameter, and only the owner keeps the whole tensor.
        """
        from safetensors.torch import save_file

        world, rank = _world_rank()
        inner = self._inner(optimizer)
        all_entries = self._entries(optimizer)
        owners = shard_owners({e[0]: e[2].numel() for group in all_entries for e in group}, world)
        groups, state, masters = [], {}, {}
        for group, entries in zip(inner.param_groups, all_entries):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [e[0] for e in entries]})
            for name, p, working, pg in entries:
                st, keep = inner.state.get(p, {}), owners[name] == rank
                # ZeRO's per-parameter states are flat shards like p; scalars (step) are the same on every rank.
                full = {
                    k: _gather(v, working, pg, keep) if torch.is_tensor(v) and v.shape == p.shape and k != "step" else v
                    for k, v in st.items()
                }
                master = _gather(p, working, pg, keep) if self.holds_masters else None
                if keep:
                    state[name] = full
                    if master is not None:
                        masters[name] = master.float().contiguous()
        torch.save(state, Path(path) / shard_name("optimizer", rank, world))
        if self.holds_masters:
            save_file(masters, str(Path(path) / shard_name("master", rank, world)))
        if rank == 0:
            _write_index(
                path,
                "optimizer",
                {k: shard_name("optimizer", r, world) for k, r in owners.items()},
                param_groups=groups,
            )
            if self.holds_masters:
                _write_index(path, "master", {k: shard_name("master", r, world) for k, r in owners.items()})

    def load_optimizer(self, optimizer: Any, path: Path) -> None:
        """Load what `save_optimizer` wrote, under any plugin and number of processes."""
        index = _read_index(path, "optimizer")
        # Memory-mapped: every rank reads its ZeRO pieces without a whole copy of every file.
        states: dict[str, Any] = {}
        for f in sorted(set(index["weight_map"].values())):
            states.update(torch.load(Path(path) / f, map_location="cpu", weights_only=True, mmap=True))
        doc = {"param_groups": index["param_groups"], "state": states}
        inner = self._inner(optimizer)
        entries = self._entries(optimizer)
        if len(doc["param_groups"]) != len(entries):
            raise ValueError(
                f"{path}: the checkpoint has {len(doc['param_groups'])} optimizer param groups, this optimizer "
                f"{len(entries)}"
            )
        groups, state, index = [], {}, 0
        for saved, current in zip(doc["param_groups"], entries):
            # The checkpoint may hold more (parameters ZeRO leaves out as frozen), never fewer.
            missing = sorted({e[0] for e in current} - set(saved["params"]))
            if missing:
                raise ValueError(f"{path}: the checkpoint's optimizer lacks parameters {missing[:5]}")
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": []})
            for name, _, _, pg in current:
                groups[-1]["params"].append(index)
                if name in doc["state"]:
                    state[index] = {
                        k: _scatter(v, pg) if torch.is_tensor(v) and k != "step" and v.dim() > 0 else v
                        for k, v in doc["state"][name].items()
                    }
                index += 1
        inner.load_state_dict({"state": state, "param_groups": groups})
        if (Path(path) / INDEX.format("master")).is_file():
            self._load_masters(entries, path)

    @torch.no_grad()
    def _load_masters(self, entries: list[list[tuple[str, Tensor, Tensor, Any]]], path: Path) -> None:
        from safetensors import safe_open

        weight_map = _read_index(path, "master")["weight_map"]
        handles = {f: safe_open(str(Path(path) / f), framework="pt") for f in set(weight_map.values())}
        for name, p, working, pg in (e for group in entries for e in group):
            full = handles[weight_map[name]].get_tensor(name)
            p.copy_(_scatter(full, pg).reshape(p.shape))
            if p is not working:
                # The working weights of a continuing run are the masters cast down after each step.
                working.copy_(full.reshape(working.shape))


# ----------------------------------------------------------------------------------------------------------------------
# boosters


class TorchBooster(_BoosterBase):
    """Plain PyTorch: DDP for world size > 1, the bare module otherwise."""

    name = "torch"

    def boost(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.info.device)
        if self.info.world_size > 1:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self._remember_names(model)
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Clip (when max_norm > 0), step and zero the gradients; returns the gradient norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)


def import_colossalai() -> dict[str, Any]:
    """ColossalAI's Booster, plugins and ShardFormer Policy by name, imported without its import-time noise."""
    with warnings.catch_warnings():
        # Optional fused kernels (apex, tensornvme, bitsandbytes' CPU kernels, ...) each warn or log at import;
        # none is needed here.
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("bitsandbytes")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from colossalai.booster import Booster
            from colossalai.booster.plugin import HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin
            from colossalai.shardformer.policies.base_policy import Policy
        finally:
            quiet.setLevel(level)
    return {
        "Booster": Booster,
        "HybridParallelPlugin": HybridParallelPlugin,
        "LowLevelZeroPlugin": LowLevelZeroPlugin,
        "TorchDDPPlugin": TorchDDPPlugin,
        "Policy": Policy,
    }


def keep_modules_policy() -> Any:
    """A ShardFormer policy that changes nothing: our models parallelise from outside (`generator/parallel.py`)."""
    Policy = import_colossalai()["Policy"]

    class KeepModules(Policy):
        def config_sanity_check(self) -> None:
            pass

        def preprocess(self) -> nn.Module:
            return self.model

        def module_policy(self) -> dict:
            return {}

        def postprocess(self) -> nn.Module:
            return self.model

    return KeepModules()


class ColossalBooster(_BoosterBase):
    """ColossalAI's `Booster` with TorchDDPPlugin ("ddp"), LowLevelZeroPlugin ("zero") or HybridParallelPlugin
    ("hybrid"); the plugin comes from `ParallelConfig`."""

    def __init__(self, info: DistInfo, cfg: ParallelConfig, plugin: str):
        c = import_colossalai()
        self.name, self.cfg = plugin, cfg
        self.zero = plugin in ("zero", "hybrid")
        self.holds_masters = self.zero
        # ColossalAI counts the bucket in millions of elements; the config says MB of working-precision grads.
        bucket_m = max(1, round(cfg.reduce_bucket_mb / (2 if cfg.precision == "bf16" else 4)))
        # Overlapping the gradient reduction needs CUDA streams.
        overlap = info.device.type == "cuda"
        if plugin == "ddp":
            self.plugin = c["TorchDDPPlugin"]()
            layout = build_layout(cfg.cp_size)
        elif plugin == "zero":
            self.plugin = c["LowLevelZeroPlugin"](
                stage=cfg.zero_stage,
                precision=cfg.precision,
                max_norm=cfg.grad_clip,
                reduce_bucket_size_in_m=bucket_m,
                overlap_communication=overlap,
            )
            layout = build_layout(cfg.cp_size)
        elif plugin == "hybrid":
            # "all_to_all" is the mode with its own sp mesh axis (innermost, so sp groups are contiguous ranks)
            # and a ZeRO group over dp x sp; "split_gather"/"ring" reuse the tp axis and need tp > 1. Nothing
            # in our model is marked sp-partial, so the plugin's extra sp gradient sync does nothing.
            self.plugin = c["HybridParallelPlugin"](
                tp_size=1,
                pp_size=1,
                sp_size=cfg.cp_size,
                precision=cfg.precision,
                zero_stage=cfg.zero_stage,
                enable_sequence_parallelism=True,
                sequence_parallelism_mode="all_to_all",
                custom_policy=keep_modules_policy(),
                max_norm=cfg.grad_clip,
                zero_bucket_size_in_m=bucket_m,
                overlap_communication=overlap,
            )
            layout = layout_from_groups(self.plugin.dp_group, self.plugin.sp_group, cfg.cp_size)
            mixed = dist.get_process_group_ranks(self.plugin.mixed_dp_group)
            if sorted(mixed) != list(range(dist.get_world_size())):
                raise RuntimeError(f"HybridParallelPlugin's ZeRO group {mixed} is not the whole world")
        else:
            raise ValueError(f"not a ColossalAI plugin: {plugin!r}")
        super().__init__(info, layout)
        self.booster = c["Booster"](plugin=self.plugin)

    def boost(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        try:
            model, optimizer, *_ = self.booster.boost(model, optimizer)
        except AssertionError as e:
            if self.zero and str(e) == "device is required":
                raise RuntimeError(
                    f"plugin {self.name!r}: ColossalAI 0.5.0's ZeRO optimizer needs a CUDA or NPU device; on CPU use "
                    f"plugin 'ddp' or 'torch'"
                ) from e
            raise
        if self.info.device.type == "cuda" and getattr(model, "convert_fn", None) is not None:
            # The ZeRO wrappers cast every float input to bf16, flow times and RoPE positions included (t = 0.3
            # becomes 0.30078). On CUDA the trainers run under bf16 autocast, so the inputs can stay fp32; on CPU
            # there is no autocast path, and the cast keeps bf16 weights and inputs matched.
            model.convert_fn = None
        self._remember_names(model)
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.unwrap() if hasattr(model, "unwrap") else model

    def _entries(self, optimizer: Any) -> list[list[tuple[str, Tensor, Tensor, Any]]]:
        if not self.zero:
            return super()._entries(optimizer)
        to_working = optimizer.get_master_to_working_map()
        out = []
        for group in optimizer.optim.param_groups:
            entries = []
            for master in group["params"]:
                working = to_working[id(master)]
                pg = optimizer.param_to_pg[working]
                if isinstance(pg, tuple):
                    raise NotImplementedError("ZeRO over an extra dp group (a tuple of process groups)")
                entries.append((self._names[id(working)], master, working, pg))
            out.append(entries)
        return out

    def _backward(self, loss: Tensor, optimizer: Any) -> None:
        self.booster.backward(loss, optimizer)

    def step(self, model: nn.Module, optimizer: Any, max_norm: float) -> float:
        """Clip (when max_norm > 0), step and zero the gradients; returns the gradient norm before clipping."""
        if self.zero:
            # ZeRO clips inside its step, where the gradient shards are; it reads this threshold there.
            optimizer._clip_grad_norm = max(float(max_norm), 0.0)
            optimizer.step()
            norm = optimizer.get_grad_norm()
        else:
            norm = optimizer.clip_grad_by_norm(max_norm if max_norm > 0 else float("inf"))
            optimizer.step()
        optimizer.zero_grad()
        return float("nan") if norm is None else float(norm)


Booster = TorchBooster | ColossalBooster


def build_booster(cfg: ParallelConfig, info: DistInfo) -> Booster:
    """The booster `cfg` asks for on `info.device`; makes the dp/cp groups (collective: call on every rank)."""
    plugin = cfg.resolve_plugin(info.device)
    if info.world_size % cfg.cp_size:
        raise ValueError(f"world size {info.world_size} is not a multiple of parallel.cp_size {cfg.cp_size}")
    if plugin == "torch":
        return TorchBooster(info, build_layout(cfg.cp_size))
    return ColossalBooster(info, cfg, plugin)


__all__ = [
    "CP_MODES",
    "PLUGINS",
    "Booster",
    "ColossalBooster",
    "Layout",
    "ParallelConfig",
    "TorchBooster",
    "build_booster",
    "build_layout",
    "cp_group_ranks",
    "dp_group_ranks",
    "import_colossalai",
    "keep_modules_policy",
    "layout_from_groups",
]
