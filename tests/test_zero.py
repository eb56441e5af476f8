"""The boosters of `cinedit.runtime.booster` on CPU processes: ZeRO-1/2 (LowLevelZeroPlugin), DDP, HybridParallelPlugin
with a cp group, and checkpoints that resume exactly under another number of processes.

Three spawns (ColossalAI's import alone takes ~9 s a process): one process (references, a checkpoint), two
processes (every layout, resumes from both checkpoints), one process again (resumes from the two-process one).
Each run trains a tiny MMDiT on fixed inputs with a plain MSE velocity loss and AdamW, gradients clipped (the norms
here are above CLIP, asserted). Compared: the data-parallel mean loss and the gradient norm of every step (AdamW
hides a wrongly scaled gradient from the loss; the norm shows it) and the final weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from colossal_cpu import patch_colossalai_for_cpu
from distributed import run_workers
from safetensors.torch import load_file

from cinedit.configs import ParallelConfig
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import PRESETS, MMDiT
from cinedit.runtime.booster import build_booster
from cinedit.runtime.dist import DistInfo
from cinedit.runtime.layout import cp_group_ranks, dp_group_ranks, dp_rank_size

CLIP = 0.05  # below every gradient norm of these runs: clipping is active
STEPS, SAVE_AT, SHORT = 4, 2, 3
BATCH = 4  # global batch: each of 2 data ranks takes half
RTOL = 1e-5  # fp32 runs that differ only in reduction order
WEIGHT_TOL = 5e-5  # of each tensor's largest entry, after steps of lr 1e-2: a 1/1000 of one step of AdamW
BF16_RTOL = 5e-2  # bf16 runs whose attention is split differently (context parallel); a 2x gradient is 0.5

ZERO2 = ParallelConfig(plugin="zero", zero_stage=2, precision="fp32", grad_clip=CLIP)
ZERO1 = dataclasses.replace(ZERO2, zero_stage=1)
ZERO2_BF16 = dataclasses.replace(ZERO2, precision="bf16")
TORCH = ParallelConfig(plugin="torch", precision="fp32", grad_clip=CLIP)
DDP = ParallelConfig(plugin="ddp", precision="fp32", grad_clip=CLIP)
ZERO2_CP = dataclasses.replace(ZERO2, cp_size=2)
HYBRID = ParallelConfig(plugin="hybrid", zero_stage=2, precision="bf16", grad_clip=CLIP, cp_size=2)


def data() -> dict[str, torch.Tensor]:
    cfg = tiny_config()
    g = torch.Generator().manual_seed(3)
    l_img, l_txt = 8, 3
    return {
        "img": torch.randn(BATCH, l_img, cfg.in_channels, generator=g),
        "img_ids": make_ids(1, 2, 4, batch=BATCH),
        "txt": torch.randn(BATCH, l_txt, cfg.context_in_dim, generator=g),
        "txt_ids": make_txt_ids(BATCH, l_txt),
        "timesteps": torch.rand(BATCH, generator=g),
        "vec": torch.randn(BATCH, cfg.vec_in_dim, generator=g),
        # A condition, so every parameter takes part (DDP insists); cond_in starts at zero and learns.
        "cond": torch.randn(BATCH, l_img, cfg.cond_channels, generator=g),
        "target": torch.randn(BATCH, l_img, cfg.in_channels, generator=g),
    }


def tiny_config():
    return dataclasses.replace(PRESETS["debug"](), depth=1, depth_single_blocks=1)


def fresh(cfg: ParallelConfig) -> tuple:
    info = DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    torch.manual_seed(0)
    model = MMDiT(tiny_config())
    # eps 1e-6: the default 1e-8 turns the reduction-order noise of near-zero gradients into whole AdamW steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-6)
    booster = build_booster(cfg, info)
    model, optimizer = booster.boost(model, optimizer)
    return booster, model, optimizer


def train(run: tuple, steps: int, save: Path | None = None, cp: str | None = None) -> dict:
    """`steps` steps on this rank's share of `data()`; cp: "same" (every cp rank runs the whole model on the
    sample, loss / cp_size) or a ContextParallel mode."""
    booster, model, optimizer = run
    lay = booster.layout
    n = BATCH // lay.dp_size
    batch = {k: v[lay.dp_rank * n : (lay.dp_rank + 1) * n] for k, v in data().items()}
    target = batch.pop("target")
    forward, scale = model, 1.0
    if cp == "same":
        scale = 1.0 / lay.cp_size
    elif cp is not None:
        from cinedit.generator.parallel import ContextParallel

        # ContextParallel drives the bare MMDiT (it reads model.config): cast the inputs as the plugin would.
        forward = ContextParallel(lay.cp_group, cp).forward
        dtype = next(booster.unwrap(model).parameters()).dtype
        batch = {"model": booster.unwrap(model), **{k: v.to(dtype) for k, v in batch.items()}}
    losses, norms = [], []
    for step in range(steps):
        loss = F.mse_loss(forward(**batch).float(), target)
        booster.backward(loss * scale, optimizer)
        norms.append(booster.step(model, optimizer, CLIP))
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=lay.dp_group)
        losses.append(mean.item() / lay.dp_size)
        if save is not None and step + 1 == SAVE_AT:
            save.mkdir(exist_ok=True)
            dist.barrier()
            booster.save_model(model, save)
            booster.save_optimizer(optimizer, save)
            dist.barrier()
    weights = {k: v.detach().float().clone() for k, v in booster.unwrap(model).state_dict().items()}
    return {"loss": losses, "norm": norms, "weights": weights if dist.get_rank() == 0 else None}


def resume(cfg: ParallelConfig, path: Path) -> dict:
    booster, model, optimizer = run = fresh(cfg)
    booster.load_model(model, path)
    booster.load_optimizer(optimizer, path)
    return train(run, STEPS - SAVE_AT)


def _one_process(rank: int, world: int, root: Path) -> dict:
    out = {}
    # Without the test shim, ZeRO on CPU stops with the library's message, not ColossalAI's bare assert.
    try:
        fresh(ZERO2)
        out["no_shim"] = "no error"
    except RuntimeError as e:
        out["no_shim"] = str(e)
    patch_colossalai_for_cpu()
    out["zero2"] = train(fresh(ZERO2), STEPS, save=root / "one")
    out["torch"] = train(fresh(TORCH), STEPS)
    out["zero2_bf16"] = train(fresh(ZERO2_BF16), SHORT)
    return out


def _two_processes(rank: int, world: int, root: Path) -> dict:
    patch_colossalai_for_cpu()
    out = {"zero2": train(fresh(ZERO2), STEPS, save=root / "two")}
    out["zero2_from_one"] = resume(ZERO2, root / "one")
    out["zero2_from_two"] = resume(ZERO2, root / "two")
    out["zero1"] = train(fresh(ZERO1), SHORT)
    out["ddp"] = train(fresh(DDP), STEPS)
    out["zero2_bf16"] = train(fresh(ZERO2_BF16), STEPS, save=root / "two_bf16")
    out["zero2_bf16_from_two"] = resume(ZERO2_BF16, root / "two_bf16")
    # cp 2 under LowLevelZero (ZeRO over the world): our own groups, fp32, so the ring run is held to RTOL.
    out["zero2_cp_same"] = train(fresh(ZERO2_CP), SHORT, cp="same")
    out["zero2_cp_ring"] = train(fresh(ZERO2_CP), SHORT, cp="ring")
    run = fresh(HYBRID)
    out["hybrid_layout"] = (run[0].layout.dp_size, run[0].layout.cp_size, run[0].layout.cp_rank)
    out["hybrid_same"] = train(run, SHORT, cp="same")
    out["hybrid_ring"] = train(fresh(HYBRID), SHORT, cp="ring")
    return out


def _one_process_again(rank: int, world: int, root: Path) -> dict:
    patch_colossalai_for_cpu()
    return {"zero2_from_two": resume(ZERO2, root / "two"), "torch_from_two": resume(TORCH, root / "two")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero")
    one = run_workers(_one_process, 1, root)[0]
    two = run_workers(_two_processes, 2, root)
    again = run_workers(_one_process_again, 1, root)[0]
    return {"one": one, "two": two[0], "two_rank1": two[1], "again": again, "root": root}


def assert_runs_close(got: dict, want: dict, rtol: float, steps: slice = slice(None), weights: bool = True) -> None:
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"][steps]), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(got["norm"]), torch.tensor(want["norm"][steps]), rtol=rtol, atol=0)
    if weights:
        for k, v in want["weights"].items():
            err = (got["weights"][k] - v).abs().max() / v.abs().max()
            assert err <= WEIGHT_TOL, f"{k}: max difference {err:.2e} of the largest entry"


# ----------------------------------------------------------------------------------------------------------------------
# config and layout (no processes)


def test_parallel_config_validates():
    for bad, match in [
        ({"plugin": "zero3"}, "plugin must be one of"),
        ({"zero_stage": 3}, "zero_stage must be 1 or 2"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"cp_size": 0}, "cp_size must be >= 1"),
        ({"cp_mode": "tree"}, "cp_mode must be one of"),
        ({"cp_size": 4, "cp_ulysses_size": 2}, "for cp_mode 'hybrid' only"),
        ({"cp_size": 4, "cp_mode": "hybrid", "cp_ulysses_size": 3}, "must divide"),
        ({"plugin": "hybrid"}, "set cp_size > 1"),
        ({"plugin": "hybrid", "cp_size": 2, "precision": "fp32"}, "needs precision 'bf16'"),
    ]:
        with pytest.raises(ValueError, match=match):
            ParallelConfig(**bad).validate()
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert ParallelConfig().resolve_plugin(cpu) == "ddp"
    assert ParallelConfig().resolve_plugin(cuda) == "zero"
    assert ParallelConfig(cp_size=2).resolve_plugin(cuda) == "hybrid"
    assert ParallelConfig(cp_size=2, precision="fp32").resolve_plugin(cuda) == "zero"
    assert ParallelConfig(plugin="torch", cp_size=2).resolve_plugin(cuda) == "torch"
    assert ParallelConfig(cp_size=8, cp_mode="hybrid").ulysses_size() == 4
    assert ParallelConfig(cp_size=8, cp_mode="hybrid").ulysses_size(num_heads=14) == 2
    assert ParallelConfig(cp_size=8, cp_mode="ring").ulysses_size() == 1


def test_layout_is_the_samplers():
    for world, cp in [(8, 2), (8, 4), (6, 3), (4, 1)]:
        for rank in range(world):
            dp_rank, dp_size = dp_rank_size(rank, world, cp)
            group = cp_group_ranks(rank, world, cp)
            assert len(group) == cp and rank in group
            assert {dp_rank_size(r, world, cp)[0] for r in group} == {dp_rank}  # one sample per cp group
            across = dp_group_ranks(rank, world, cp)
            assert len(across) == dp_size and rank in across
            assert sorted(dp_rank_size(r, world, cp)[0] for r in across) == list(range(dp_size))
    with pytest.raises(ValueError, match="multiple"):
        cp_group_ranks(0, 6, 4)


# ----------------------------------------------------------------------------------------------------------------------
# training under each plugin


def test_zero_without_the_shim_says_it_needs_cuda(runs):
    assert "needs a CUDA or NPU device" in runs["one"]["no_shim"]


def test_clipping_is_active(runs):
    for name in ("zero2", "torch", "zero2_bf16"):
        assert min(runs["one"][name]["norm"]) > CLIP, name


def test_zero2_two_processes_match_one(runs):
    assert_runs_close(runs["two"]["zero2"], runs["one"]["zero2"], RTOL)
    assert_runs_close(runs["one"]["torch"], runs["one"]["zero2"], RTOL)


def test_zero1_and_ddp_match_one_process(runs):
    assert_runs_close(runs["two"]["zero1"], runs["one"]["zero2"], RTOL, slice(0, SHORT), weights=False)
    assert_runs_close(runs["two"]["ddp"], runs["one"]["zero2"], RTOL)


def test_hybrid_plugin_cp_group(runs):
    assert runs["two"]["hybrid_layout"] == (1, 2, 0) and runs["two_rank1"]["hybrid_layout"] == (1, 2, 1)
    # Every cp rank runs the whole sample at loss / cp: the one-process bf16 run (the gradients are bitwise the
    # same, scalings by 2 are exact; the norm sums its two shards' squares in another order).
    assert runs["two"]["hybrid_same"]["loss"] == runs["one"]["zero2_bf16"]["loss"]
    assert_runs_close(runs["two"]["hybrid_same"], runs["one"]["zero2_bf16"], RTOL)
    # Ring attention over the cp group: the same run up to bf16 rounding.
    assert_runs_close(runs["two"]["hybrid_ring"], runs["one"]["zero2_bf16"], BF16_RTOL, weights=False)


def test_zero_with_a_cp_group(runs):
    assert_runs_close(runs["two"]["zero2_cp_same"], runs["one"]["zero2"], RTOL, slice(0, SHORT), weights=False)
    assert_runs_close(runs["two"]["zero2_cp_ring"], runs["one"]["zero2"], RTOL, slice(0, SHORT), weights=False)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def test_resume_with_another_number_of_processes(runs):
    later = slice(SAVE_AT, None)
    # The same number of processes: bit for bit.
    assert runs["two"]["zero2_from_two"]["loss"] == runs["two"]["zero2"]["loss"][later]
    assert runs["two"]["zero2_from_two"]["norm"] == runs["two"]["zero2"]["norm"][later]
    assert_runs_close(runs["two"]["zero2_from_one"], runs["two"]["zero2"], RTOL, later)
    assert_runs_close(runs["again"]["zero2_from_two"], runs["one"]["zero2"], RTOL, later)
    # The format is the plugin's too: plain torch continues a ZeRO checkpoint.
    assert_runs_close(runs["again"]["torch_from_two"], runs["one"]["zero2"], RTOL, later)


def test_bf16_resume_is_exact(runs):
    later = slice(SAVE_AT, None)
    assert runs["two"]["zero2_bf16_from_two"]["loss"] == runs["two"]["zero2_bf16"]["loss"][later]
    assert runs["two"]["zero2_bf16_from_two"]["norm"] == runs["two"]["zero2_bf16"]["norm"][later]
    # The masters carry what bf16 weights cannot: rebuilding them from the model would not be this run.
    path = runs["root"] / "two_bf16"
    # Written sharded: each of the 2 ranks wrote its own share of every kind, whole tensors, no name twice.
    shards = {kind: sorted(path.glob(f"{kind}-*-of-00002.*")) for kind in ("model", "optimizer", "master")}
    assert all(len(files) == 2 for files in shards.values()), shards
    masters = [load_file(str(f)) for f in shards["master"]]
    assert all(masters) and not set(masters[0]) & set(masters[1])
    masters = {k: v for m in masters for k, v in m.items()}
    working = {k: v for f in shards["model"] for k, v in load_file(str(f)).items()}
    assert masters.keys() <= working.keys()
    assert all(masters[k].dtype == torch.float32 and working[k].dtype == torch.bfloat16 for k in masters)
    assert all(torch.equal(masters[k].bfloat16(), working[k]) for k in masters)
    assert any(not torch.equal(masters[k], working[k].float()) for k in masters)
    optimizer = {k: v for f in shards["optimizer"] for k, v in torch.load(f, weights_only=True).items()}
    assert set(optimizer) == set(masters)
    assert all(s["exp_avg"].shape == masters[k].shape for k, s in optimizer.items())
