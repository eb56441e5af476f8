"""The booster both trainers train through, built from `cinedit.configs.ParallelConfig`.

Plugins (`ParallelConfig.plugin`):

- ``"torch"``: plain PyTorch, DDP when the world has more than one process.
- ``"ddp"``: ColossalAI's `TorchDDPPlugin` (CPU or GPU).
- ``"zero"``: ColossalAI's `LowLevelZeroPlugin`, ZeRO stage 1 or 2, bf16 working weights over fp32 masters.
- ``"hybrid"``: ColossalAI's `HybridParallelPlugin` for context parallelism: tp = pp = 1, its sequence-parallel
  axis is our cp group, ZeRO over dp x cp, and a policy that leaves the model's modules as they are.
- ``"auto"``: ``"zero"`` on CUDA (``"hybrid"`` when cp_size > 1 in bf16), ``"ddp"`` on CPU.

ColossalAI 0.5.0's ZeRO optimizer asserts a CUDA or NPU device; tests run it on CPU through a test-only shim.

Layout: the world is dp x cp with contiguous cp groups (`cinedit.runtime.layout`).

Gradients with cp > 1: every rank of a cp group computes the same loss from the gathered output, and the sum of
the group's parameter gradients is the gradient of that loss. Every plugin averages gradients over all dp x cp
ranks, so `backward` multiplies the loss by cp_size: the average is then the mean over dp of full gradients.

Checkpoints (`save_*` / `load_*` take a directory; every rank calls them) are written in the sharded format of
`cinedit.runtime.checkpoint`, so no rank ever holds the whole optimizer. Loading the fp32 masters puts them back
exactly and sets the working weights from them, as a continuing run has them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cinedit.configs.parallel import ParallelConfig
from cinedit.runtime.checkpoint import INDEX, read_index, shard_name, shard_owners, write_index
from cinedit.runtime.dist import DistInfo, world_rank
from cinedit.runtime.layout import Layout, build_layout, layout_from_groups

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

    def _frozen(self, model: nn.Module) -> set[str]:
        return {name for name, p in self.unwrap(model).named_parameters() if not p.requires_grad}

    def save_model(self, model: nn.Module, path: Path) -> None:
        """Write this rank's share of the model state (every rank holds the whole working weights, ZeRO too).

        Frozen parameters (a LoRA run's base) are left out: training never changes them, and a resumed run builds
        them again from where the run started (its `model.init_from`).
        """
        world, rank = world_rank()
        frozen = self._frozen(model)
        state = {k: v for k, v in self.unwrap(model).state_dict().items() if k not in frozen}
        owners = shard_owners({k: v.numel() for k, v in state.items()}, world)
        mine = {k: v.detach().contiguous().cpu() for k, v in state.items() if owners[k] == rank}
        save_file(mine, str(Path(path) / shard_name("model", rank, world)))
        if rank == 0:
            write_index(path, "model", {k: shard_name("model", r, world) for k, r in owners.items()})

    def load_model(self, model: nn.Module, path: Path) -> None:
        files = sorted(set(read_index(path, "model")["weight_map"].values()))
        state = {k: v for f in files for k, v in load_file(str(Path(path) / f)).items()}
        missing, unexpected = self.unwrap(model).load_state_dict(state, strict=False)
        missing = sorted(set(missing) - self._frozen(model))
        if missing or unexpected:
            raise RuntimeError(
                f"{path}: the checkpoint's model does not match: missing {missing[:3]} ({len(missing)}), unexpected "
                f"{unexpected[:3]} ({len(unexpected)})"
            )
        # ZeRO: fp32 masters from the loaded working weights; `load_optimizer` replaces them by the saved ones.
        update = getattr(model, "update_master_params", None)
        if update is not None:
            update()

    def save_optimizer(self, optimizer: Any, path: Path) -> None:
        """Write this rank's share of the optimizer states (and fp32 masters), whole tensors by parameter name.

        Collective: ZeRO shards are gathered parameter by parameter, and only the owner keeps the whole tensor.
        """
        world, rank = world_rank()
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
            write_index(
                path,
                "optimizer",
                {k: shard_name("optimizer", r, world) for k, r in owners.items()},
                param_groups=groups,
            )
            if self.holds_masters:
                write_index(path, "master", {k: shard_name("master", r, world) for k, r in owners.items()})

    def load_optimizer(self, optimizer: Any, path: Path) -> None:
        """Load what `save_optimizer` wrote, under any plugin and number of processes."""
        index = read_index(path, "optimizer")
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
        weight_map = read_index(path, "master")["weight_map"]
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
            from colossalai.booster import Booster  # heavy: loaded only when a colossalai plugin is chosen
            from colossalai.booster.plugin import HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin  # heavy
            from colossalai.shardformer.policies.base_policy import Policy  # heavy
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


__all__ = ["Booster", "ColossalBooster", "TorchBooster", "build_booster", "import_colossalai", "keep_modules_policy"]
