"""Context-parallel attention (Ulysses, ring, hybrid) and the MMDiT under it, against one process; offload.

One spawn per world size runs every case and returns the tensors; the tests compare them here with the
single-process SDPA and plain model.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_workers
from einops import rearrange

from cinedit.generator import parallel
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import PRESETS, MMDiT
from cinedit.generator.parallel import (
    ContextParallel,
    apply_activation_checkpointing,
    is_offloaded,
    ring_attention,
    sum_grads,
    ulysses_attention,
)

ATOL = 1e-5
# (l_txt, (t, h, w)): neither length divides 2 or 4 where it can, with padding for p=2 and p=4 in the first; in
# the last the text outlasts the first rank's shard (the training step's usual case: long captions, few latents).
SHAPES = [(5, (2, 3, 3)), (3, (1, 3, 3)), (13, (1, 2, 3))]
# Attention-alone sequence lengths: padding on every world size, and a rank of padding only for p=4.
ATTN_LEN = {2: 7, 4: 9}
# (mode, ulysses_size) per CP group size; hybrid 1x2 on pairs has Ulysses groups of one rank.
MODES = {4: [("hybrid", 2), ("ring", None), ("ulysses", None)], 2: [("ulysses", None), ("ring", None), ("hybrid", 1)]}
CASES = [(2, "ulysses"), (2, "ring"), (2, "hybrid"), (4, "hybrid"), (4, "ring"), (4, "ulysses")]


def attention_inputs(length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(2, 4, length, 8, generator=g) for name in ("q", "k", "v", "dout")}


def reference_attention(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(x["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def model_inputs(config, l_txt: int, thw: tuple[int, int, int], with_cond: bool) -> dict:
    g = torch.Generator().manual_seed(2)
    l_img = thw[0] * thw[1] * thw[2]
    return {
        "img": torch.randn(2, l_img, config.in_channels, generator=g),
        "img_ids": make_ids(*thw, batch=2),
        "txt": torch.randn(2, l_txt, config.context_in_dim, generator=g),
        "txt_ids": make_txt_ids(2, l_txt),
        "timesteps": torch.rand(2, generator=g),
        "vec": torch.randn(2, config.vec_in_dim, generator=g),
        "cond": torch.randn(2, l_img, config.cond_channels, generator=g) if with_cond else None,
    }


def debug_model() -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(PRESETS["debug"]())
    # cond_in starts at zero; random weights make a mis-sharded cond visible in the output.
    torch.nn.init.normal_(model.cond_in.weight, std=0.1)
    return model


def model_cases() -> list[dict]:
    """(name, inputs, output-gradient) of every model case; the same in the test process and the workers."""
    model = debug_model()
    cases = []
    for l_txt, thw in SHAPES:
        for with_cond in (True, False):
            x = model_inputs(model.config, l_txt, thw, with_cond)
            dout = torch.randn(
                2, x["img"].shape[1], model.config.in_channels, generator=torch.Generator().manual_seed(3)
            )
            cases.append({"name": f"txt{l_txt}-img{thw}-cond{with_cond}", "inputs": x, "dout": dout})
    return cases


def run_model(model: MMDiT, forward, case: dict) -> dict:
    model.zero_grad(set_to_none=True)
    out = forward(model, **case["inputs"])
    out.backward(case["dout"])
    return {"out": out.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


# Workers.


def _attention_case(fn, group: dist.ProcessGroup) -> dict:
    """fn on this rank's padded shard of the attention inputs; the rank's output and q/k/v gradients."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    x = attention_inputs(ATTN_LEN[world])
    length = x["q"].shape[2]
    m = -(-length // world)
    padded = {n: F.pad(t, (0, 0, 0, m * world - length))[:, :, rank * m : (rank + 1) * m] for n, t in x.items()}
    q, k, v = (padded[n].clone().requires_grad_() for n in "qkv")
    out = fn(q, k, v, key_valid=torch.arange(rank * m, (rank + 1) * m) < length)
    out.backward(rearrange(padded["dout"], "b n l d -> b l (n d)"))
    return {"out": rearrange(out.detach(), "b l (n d) -> b n l d", n=4), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _expect_error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return "no error"


def _worker(rank: int, world: int) -> dict:
    """Every case on the world of 4 and on its two halves {0, 1}, {2, 3} (CP groups smaller than the world)."""
    pairs = [dist.new_group(members) for members in ([0, 1], [2, 3])]
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    results = {}
    for size, group in groups.items():
        r = results[size] = {"attention": {}, "model": {}, "errors": {}}
        for mode, u in MODES[size]:
            cp = ContextParallel(group, mode, u)
            fn = {"ulysses": ulysses_attention, "ring": ring_attention}.get(mode)
            fn = functools.partial(fn, group=group) if fn else cp.attention
            r["attention"][mode] = _attention_case(fn, group)
            r["model"][mode] = {}
            for case in model_cases():
                model = debug_model()
                if mode == "ring" and case["inputs"]["cond"] is not None:
                    # The recompute in backward must still use the CP attention (and offload changes nothing).
                    apply_activation_checkpointing(model, 1, 1, offload=True)
                got = run_model(model, cp.forward, case)
                sum_grads(model, group)
                r["model"][mode][case["name"]] = got if rank == 0 else {"out": got["out"]}
        q = torch.randn(1, 3, 2, 8)
        r["errors"]["heads"] = _expect_error(ulysses_attention, q, q, q, group)
        r["errors"]["mode"] = _expect_error(ContextParallel, group, mode="tree")
        r["errors"]["ulysses_size"] = _expect_error(ContextParallel, group, "hybrid", ulysses_size=3)
        r["errors"]["ulysses_size_ring"] = _expect_error(ContextParallel, group, "ring", ulysses_size=2)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def workers() -> list[dict]:
    """Per-rank results of one spawn of 4 processes (spawning dominates the run time on CPU)."""
    return run_workers(_worker, 4)


@pytest.fixture(scope="module")
def reference() -> dict:
    model = debug_model()
    return {c["name"]: run_model(copy.deepcopy(model), MMDiT.forward, c) for c in model_cases()}


def _results(workers: list[dict], size: int, kind: str, mode: str) -> list[dict]:
    """The ranks of the first CP group of that size, in group order."""
    return [w[size][kind][mode] for w in workers[:size]]


# Attention alone.


@pytest.mark.parametrize("world, mode", CASES)
def test_attention_matches_one_process(workers, world, mode):
    results = _results(workers, world, "attention", mode)
    x = attention_inputs(ATTN_LEN[world])
    length = x["q"].shape[2]
    got = {n: torch.cat([r[n] for r in results], dim=2) for n in ("out", "dq", "dk", "dv")}
    for name, want in reference_attention(x).items():
        torch.testing.assert_close(got[name][:, :, :length], want, atol=ATOL, rtol=1e-5, msg=name)
    # Padding keys get no gradient: nothing attended to them.
    assert got["dk"][:, :, length:].abs().max() == 0 and got["dv"][:, :, length:].abs().max() == 0


# The whole model.


@pytest.mark.parametrize("world, mode", CASES)
def test_model_matches_one_process(workers, reference, world, mode):
    results = _results(workers, world, "model", mode)
    for name, want in reference.items():
        for r in [w[world]["model"][mode] for w in workers]:  # every rank of every group returns the full prediction
            torch.testing.assert_close(r[name]["out"], want["out"], atol=ATOL, rtol=1e-5, msg=name)
        grads = results[0][name]["grads"]
        for p, g in want["grads"].items():
            if g is None:  # cond_in without a condition
                assert grads[p] is None, p
            else:
                torch.testing.assert_close(grads[p], g, atol=ATOL, rtol=1e-4, msg=f"{name}: {p}")


@pytest.mark.parametrize("world", [2, 4])
def test_errors_are_clear(workers, world):
    errors = workers[0][world]["errors"]
    assert "heads (3) divisible" in errors["heads"]
    assert "mode must be one of" in errors["mode"]
    assert "ulysses_size is for mode 'hybrid' only" in errors["ulysses_size_ring"]
    assert f"needs ulysses_size dividing the group size {world}" in errors["ulysses_size"]


def test_context_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        ContextParallel(mode="ring")
    with pytest.raises(ValueError, match="mode must be one of"):
        ContextParallel(mode="tree")


# Activation offload.


class _CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """save_on_cpu that counts what it moves."""

    packed = 0

    def __init__(self, pin_memory: bool = False):
        super().__init__(pin_memory=pin_memory)
        pack = self.pack_hook

        def counting(t: torch.Tensor):
            type(self).packed += 1
            return pack(t)

        self.pack_hook = counting


def test_offload_keeps_outputs_and_gradients(monkeypatch):
    monkeypatch.setattr(parallel, "save_on_cpu", _CountingSaveOnCpu)
    model = debug_model()
    case = model_cases()[0]
    plain = run_model(copy.deepcopy(model), MMDiT.forward, case)
    offloaded = copy.deepcopy(model)
    assert apply_activation_checkpointing(offloaded, 1, None, offload=True) == 3
    assert [is_offloaded(b) for b in offloaded.double_blocks] == [True, False]
    got = run_model(offloaded, MMDiT.forward, case)
    assert _CountingSaveOnCpu.packed > 0  # the checkpointed inputs went through the offload hooks
    torch.testing.assert_close(got["out"], plain["out"], atol=0, rtol=0)
    for name, g in plain["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=0, rtol=0, msg=name)
    assert plain["grads"]["cond_in.weight"] is not None
