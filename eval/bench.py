"""Benchmarks: tokenizer encode / decode throughput and generator (MMDiT, optionally diffusers' Flux) training steps.

Every measurement builds its model in its own process on CPU (`spawn`), so the memory one model freed (and the C
allocator kept) does not hide the next one's peak. The first call is the memory measurement and the warm-up; the
time is the median of `repeats` further calls.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from cinedit.generator.flow import flow_loss
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import PRESETS as MMDIT_PRESETS
from cinedit.generator.model import MMDiT, MMDiTConfig
from cinedit.generator.packing import PackedBatch, Sample, packed_flow_losses, packed_forward, resolve_mode
from cinedit.runtime.dist import resolve_device
from cinedit.runtime.files import write_json, write_text
from cinedit.tokenizer.model import PRESETS as DCAE_PRESETS
from cinedit.tokenizer.model import VideoDCAE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched as substrings of torch.cuda.get_device_name in this
# order (the more specific names first). "H100" alone is the SXM part ("NVIDIA H100 80GB HBM3").
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose 'peak_mb' is, afterwards, the peak memory the block added above its start.

    On CUDA: the allocator's peak. On CPU: the process's resident set, sampled every 2 ms by a thread
    (torch's CPU allocations are invisible to tracemalloc).
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out["peak_mb"] = (max(peak[0], proc.memory_info().rss) - base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})"


def _run_info(dev: torch.device, dtype: str, repeats: int) -> dict:
    return {
        "device": _device_name(dev),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "repeats": repeats,
        "torch": torch.__version__,
    }


def _measure(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Peak memory of a first call, `warmup` - 1 more untimed calls, then the median wall time of `repeats` calls."""
    t0 = time.perf_counter()
    with peak_memory(dev) as mem:
        fn()
    _sync(dev)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return {"median_s": sorted(times)[len(times) // 2], "peak_mb": mem["peak_mb"], "first_s": first}


def _isolated(fn: Callable[..., dict], args: tuple, dev: torch.device) -> dict:
    """fn(*args) in a fresh spawned process on CPU (fn must be module-level), in this process on CUDA."""
    if dev.type != "cpu":
        return fn(*args)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ---------------------------------------------------------------------------------------------------- tokenizer


def _phase(
    preset: str, phase: str, shape: list[int], device: str, dtype: str, repeats: int, compiled: bool = False
) -> dict:
    """Build the model and an input, measure the first call's peak memory, then time `repeats` calls. `compiled`:
    regional torch.compile first (`compile_blocks`); the first call's time, compilation included, is `compile_s`."""

    dev, dt = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    model = VideoDCAE(DCAE_PRESETS[preset]()).to(dev, dt).eval()
    if compiled:
        model.compile_blocks()
    b, _, t, h, w = shape
    if phase == "encode":
        inp = torch.rand(shape, device=dev, dtype=dt) * 2 - 1
        fn = lambda: model.encode(inp)  # noqa: E731
    else:
        # A random latent of the right shape: decode cost does not depend on the values, and skipping the encode
        # keeps its memory out of the measurement.
        c, lt, lh, lw = model.latent_shape(t, h, w)
        inp = torch.randn(b, c, lt, lh, lw, device=dev, dtype=dt)
        fn = lambda: model.decode(inp, t)  # noqa: E731
    with torch.no_grad():
        m = _measure(fn, dev, repeats)
    med = m["median_s"]
    out = {"median_s": round(med, 4), "frames_per_s": round(b * t / med, 2), "peak_mb": round(m["peak_mb"], 1)}
    return {**out, "compile_s": round(m["first_s"], 2)} if compiled else out


def bench_tokenizer(
    preset: str = "f32t4c128",
    num_frames: int = 8,
    size: int = 128,
    batch: int = 1,
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "fp32",
    with_compile: bool = False,
) -> dict:
    """Encode and decode speed and peak memory on a (batch, 3, T, size, size) clip; each phase runs on its own.
    `with_compile` also measures them with regional torch.compile (`encode_compiled`, `decode_compiled`).

    On CPU every phase runs in a fresh process (see the module docstring).
    """

    dev = resolve_device(device)
    with torch.device("meta"):
        params = sum(p.numel() for p in VideoDCAE(DCAE_PRESETS[preset]()).parameters())
    shape = [batch, 3, num_frames, size, size]
    result: dict = {"benchmark": "tokenizer", "preset": preset, "params_m": round(params / 1e6, 1), "shape": shape}
    result.update(_run_info(dev, dtype, repeats))
    for phase in ("encode", "decode"):
        result[phase] = _isolated(_phase, (preset, phase, shape, str(dev), dtype, repeats), dev)
        if with_compile:
            args = (preset, phase, shape, str(dev), dtype, repeats, True)
            result[f"{phase}_compiled"] = _isolated(_phase, args, dev)
    return result


# ---------------------------------------------------------------------------------------------------- generator


def mid_config():
    """The benchmark's mid-size MMDiT (not a training preset): 73.2M parameters, small enough for a CPU step.

    Hidden 512 = 8 heads of 64, 4 double + 8 single blocks, MLP ratio 4, RoPE axes (t, h, w) = [8, 28, 28] (the
    release's [16, 56, 56] halved with the head dim); DC-AE c128 tokens (patch 1), T5-XXL text (4096) and CLIP-L
    pooled (768) inputs as in the release, so the embedders have their real widths.
    """

    return MMDiTConfig(
        in_channels=128,
        patch_size=1,
        hidden_size=512,
        num_heads=8,
        depth=4,
        depth_single_blocks=8,
        axes_dim=[8, 28, 28],
    )


def generator_presets() -> dict[str, Callable]:
    """The generator's PRESETS plus the benchmark-only "mid" (`mid_config`)."""

    return {**MMDIT_PRESETS, "mid": mid_config}


def mmdit_flops(cfg, num_img_tokens: int, txt_len: int, batch: int = 1) -> dict[str, int]:
    """Analytic matmul FLOPs (2 per multiply-add) of the MMDiT on a joint sequence, for t2v (no i2v condition).

    With D = hidden, M = mlp hidden (= mlp_ratio * D), L_i image tokens, L_t text tokens, L = L_i + L_t,
    C = in_channels, C_t = context_in_dim, V = vec_in_dim, per sample:

    - embedders: 2 L_i C D (img_in) + 2 L_t C_t D (txt_in) + 2 (256 D + D^2) (time_in) + 2 (V D + D^2) (vector_in);
      with cond=None, cond_in adds only its bias (no matmul);
    - each double block: 2 * 2 D 6D (img/txt modulation) + 8 L D^2 (q, k, v, o over both streams)
      + 4 L^2 D (QK^T and AV over the joint sequence) + 4 L D M (MLP up + down);
    - each single block: 2 D 3D (modulation) + 4 L D^2 (q, k) + 2 L D (D + M) (v + MLP up, `v_mlp`)
      + 2 L (D + M) D (`linear2`) + 4 L^2 D = 6 D^2 + 8 L D^2 + 4 L D M + 4 L^2 D: the same per-token cost as a
      double block, only the modulation is smaller;
    - final layer: 2 D 2D (adaLN) + 2 L_i D C (linear).

    forward = batch * (sum of the above). A training step counts the backward as twice the forward
    (grad-input + grad-weight matmuls of every layer, and two matmuls per attention product):
    train_step = 3 * forward. Not counted (as FlopCounterMode does not count them): norms, RoPE, softmax,
    activations, residual adds and modulation (elementwise, O(L D), under 1% here); and the backward is slightly
    overcounted, since the input layers' grad-input matmuls (img_in, txt_in, time_in/vector_in first linears) are
    never computed - 2 (L_i C + L_t C_t) D + 2 (256 + V) D per sample.
    """
    d, m, li, lt = cfg.hidden_size, cfg.mlp_hidden, num_img_tokens, txt_len
    seq = li + lt
    embed = 2 * li * cfg.in_channels * d + 2 * lt * cfg.context_in_dim * d
    embed += 2 * (256 * d + d * d) + 2 * (cfg.vec_in_dim * d + d * d)
    per_token = 8 * seq * d * d + 4 * seq * d * m + 4 * seq * seq * d
    double = cfg.depth * (2 * 2 * d * 6 * d + per_token)
    single = cfg.depth_single_blocks * (2 * d * 3 * d + per_token)
    final = 2 * d * 2 * d + 2 * li * d * cfg.in_channels
    parts = {"embedders": embed, "double_blocks": double, "single_blocks": single, "final_layer": final}
    out = {k: batch * v for k, v in parts.items()}
    out["forward"] = sum(out.values())
    out["train_step"] = 3 * out["forward"]
    return out


def video_grid(cfg, num_frames: int, size: int) -> tuple[int, int, int]:
    """(t, h, w) token grid of a num_frames x size x size clip for this config's tokenizer and patch size.

    patch_size 1 means Video DC-AE latents (4x time, 32x space; T = 1 or a multiple of 4); patch_size 2 means
    the 16-channel HunyuanVAE (causal 4x time: 1 + (T - 1) // 4 frames; 8x space) patched 2x2.
    """
    if cfg.patch_size == 1:
        if size % 32 or (num_frames != 1 and num_frames % 4):
            raise ValueError(f"DC-AE needs size % 32 == 0 and frames 1 or a multiple of 4, got {num_frames}x{size}")
        t, side = (1 if num_frames == 1 else num_frames // 4), size // 32
    else:
        if size % 16:
            raise ValueError(f"HunyuanVAE with patch 2 needs size % 16 == 0, got {size}")
        t, side = 1 + (num_frames - 1) // 4, size // 16
    return t, side, side


def seq_grid(num_img_tokens: int) -> tuple[int, int, int]:
    """A single-frame (1, h, w) grid of exactly num_img_tokens, as square as its divisors allow."""
    if num_img_tokens < 1:
        raise ValueError(f"need at least one image token, got {num_img_tokens}")
    h = max(k for k in range(1, math.isqrt(num_img_tokens) + 1) if num_img_tokens % k == 0)
    return 1, h, num_img_tokens // h


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name (`BF16_DENSE_PEAK_TFLOPS`), None if unknown."""
    for key, tflops in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def flux_from_config(cfg):
    """diffusers' FluxTransformer2DModel at the MMDiT's shape, randomly initialised (nothing downloaded).

    Same width (heads x head dim), depth (num_layers = double, num_single_layers = single), in_channels (patch 1:
    it takes the same packed tokens), joint_attention_dim = context width, pooled_projection_dim = vec width,
    RoPE axes, no guidance embedding. Flux's MLP ratio is fixed at 4 and its q/k/v always have biases; it has no
    cond_in.
    """
    from diffusers import FluxTransformer2DModel  # heavy (diffusers): only the Flux peer of a benchmark needs it

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=False,
        axes_dims_rope=tuple(cfg.axes_dim),
    )


def _train_phase(
    which: str, cfg, grid: tuple[int, int, int], txt_len: int, batch: int, device: str, dtype: str, repeats: int
) -> dict:
    """Time training steps (zero grads, forward, MSE loss on a random target, backward; no optimizer step)."""
    dev, dt = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    if which == "flux":
        from diffusers.utils import logging as diffusers_logging  # heavy (diffusers): only with the Flux peer

        diffusers_logging.set_verbosity_error()  # its .to(dtype) warns about fp32 modules, of which Flux has none
    model = (flux_from_config(cfg) if which == "flux" else MMDiT(cfg)).to(dev, dt).train()
    if which == "mmdit_compiled":
        model.compile_blocks()
    params = sum(p.numel() for p in model.parameters())
    n = grid[0] * grid[1] * grid[2]
    img = torch.randn(batch, n, cfg.in_channels, device=dev, dtype=dt)
    txt = torch.randn(batch, txt_len, cfg.context_in_dim, device=dev, dtype=dt)
    vec = torch.randn(batch, cfg.vec_in_dim, device=dev, dtype=dt)
    t = torch.rand(batch, device=dev)
    img_ids, txt_ids = make_ids(*grid, batch=batch, device=dev), make_txt_ids(batch, txt_len, device=dev)
    target = torch.randn(batch, n, cfg.in_channels, device=dev)
    if which != "flux":
        forward = lambda: model(img, img_ids, txt, txt_ids, t, vec)  # noqa: E731
    else:
        forward = lambda: model(img, txt, vec, t, img_ids[0], txt_ids[0], return_dict=False)[0]  # noqa: E731

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.mse_loss(forward().float(), target).backward()

    # Two warm-up steps: diffusers' Flux runs its first two steps ~100x slower on CPU (one-time setup).
    m = _measure(step, dev, repeats, warmup=2)
    return {"params": params, "median_s": m["median_s"], "peak_mb": m["peak_mb"], "first_s": m["first_s"]}


def bench_generator(
    preset: str = "debug",
    num_img_tokens: int | None = 256,
    txt_len: int = 64,
    batch: int = 1,
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "fp32",
    with_flux: bool = False,
    grid: tuple[int, int, int] | None = None,
    with_compile: bool = False,
) -> dict:
    """One generator training step (forward + backward, no optimizer step) on random inputs: time, FLOPs, memory.

    The sequence is num_img_tokens image tokens on a single-frame grid (`seq_grid`), or a given (t, h, w) `grid`
    (see `video_grid`), plus txt_len text tokens. Reports per model: parameters, median step time, tokens/s
    ((img + txt tokens) x batch / time), analytic FLOPs per step (`mmdit_flops`, train_step), achieved FLOP/s, peak
    memory of the first step above the built model (activations + gradients; the step is timed after two warm-up
    steps), and on a known GPU MFU against
    its dense bf16 peak (whatever `dtype` is). With `with_flux`, diffusers' FluxTransformer2DModel of the same
    shape (`flux_from_config`) is measured the same way; its matmuls are the MMDiT's one for one (fused
    `v_mlp` = Flux's to_v + proj_mlp), so the same count applies with MLP ratio 4. Presets: the generator's
    (`debug`, `2b`, `11b`, `11b-dcae`) and `mid` (`mid_config`). On CPU each model runs in its own process.
    """
    presets = generator_presets()
    if preset not in presets:
        raise ValueError(f"unknown generator preset {preset!r}, expected one of {sorted(presets)}")
    cfg = presets[preset]()
    if grid is None:
        if num_img_tokens is None:
            raise ValueError("give num_img_tokens or grid")
        grid = seq_grid(num_img_tokens)
    grid = tuple(int(g) for g in grid)
    n_img = grid[0] * grid[1] * grid[2]
    dev = resolve_device(device)
    flops = mmdit_flops(cfg, n_img, txt_len, batch)
    result: dict = {
        "benchmark": "generator",
        "preset": preset,
        "config": dataclasses.asdict(cfg),
        "img_tokens": n_img,
        "grid": list(grid),
        "txt_tokens": txt_len,
        "batch": batch,
        "step": "forward + MSE loss + backward, no optimizer step",
        "flops": flops,
    }
    result.update(_run_info(dev, dtype, repeats))
    peak = bf16_peak_flops(result["device"]) if dev.type == "cuda" else None
    models = {"mmdit": (cfg, flops)}
    if with_compile:  # regional torch.compile (`MMDiT.compile_blocks`); its first step's time is `compile_s`
        models["mmdit_compiled"] = (cfg, flops)
    if with_flux:
        flux_flops = mmdit_flops(dataclasses.replace(cfg, mlp_ratio=4.0), n_img, txt_len, batch)
        models["flux"] = (cfg, flux_flops)
    for which, (mcfg, fl) in models.items():
        r = _isolated(_train_phase, (which, mcfg, grid, txt_len, batch, str(dev), dtype, repeats), dev)
        med = r["median_s"]
        achieved = fl["train_step"] / med
        out = {
            "params": r["params"],
            "params_m": round(r["params"] / 1e6, 2),
            "median_s": round(med, 4),
            "tokens_per_s": round((n_img + txt_len) * batch / med, 1),
            "flops_per_step": fl["train_step"],
            "gflops_per_s": round(achieved / 1e9, 2),
            "peak_mb": round(r["peak_mb"], 1),
        }
        if which == "mmdit_compiled":
            out["compile_s"] = round(r["first_s"], 2)
        if peak is not None:
            out["mfu"] = round(achieved / peak, 4)
        result[which] = out
    return result


# ---------------------------------------------------------------------------------------------------- packing

# The mixed-shape set of `bench_packing`: ((t, h, w) token grid, count); images, short and long clips, several
# resolutions. Every sample has `txt_len` text tokens (T5 states padded to one length, as the trainer has them).
PACKING_MIX: tuple[tuple[tuple[int, int, int], int], ...] = (
    ((1, 8, 8), 4),
    ((1, 6, 10), 3),
    ((2, 8, 8), 2),
    ((4, 6, 8), 1),
    ((3, 8, 12), 1),
)


def _packing_phase(preset: str, mix: tuple, txt_len: int, device: str, dtype: str, repeats: int) -> dict:
    """Time one training step (zero grads, forward, mean of the per-sample flow losses, backward; no optimizer step)
    over the whole mixed set, per strategy: packed (one sequence; mask / split attention, varlen too on a GPU with
    FlashAttention), bucketed (one batch per shape, the losses weighted so the gradient is the packed one's), and
    padded (one batch, every sample padded to the longest; a cost proxy only, its padding is not masked)."""
    dev, dt = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    cfg = generator_presets()[preset]()
    model = MMDiT(cfg).to(dev, dt).train()
    grids = [tuple(grid) for grid, count in mix for _ in range(count)]
    samples, targets = [], []
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        samples.append(
            Sample(
                img=torch.randn(n, cfg.in_channels, device=dev, dtype=dt),
                img_ids=make_ids(*grid, device=dev)[0],
                txt=torch.randn(txt_len, cfg.context_in_dim, device=dev, dtype=dt),
                txt_ids=make_txt_ids(1, txt_len, device=dev)[0],
                timestep=torch.rand((), device=dev),
                vec=torch.randn(cfg.vec_in_dim, device=dev, dtype=dt),
            )
        )
        targets.append(torch.randn(1, n, cfg.in_channels, device=dev))
    n_samples = len(samples)
    packed = PackedBatch.from_samples(samples)

    def packed_step(mode: str) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            packed_flow_losses(packed_forward(model, packed, mode), targets).mean().backward()

        return step

    buckets: dict[tuple, list[int]] = {}
    for i, grid in enumerate(grids):
        buckets.setdefault(grid, []).append(i)
    batches = []
    for grid, members in buckets.items():
        b = len(members)
        batches.append(
            (
                {
                    "img": torch.stack([samples[i].img for i in members]),
                    "img_ids": make_ids(*grid, batch=b, device=dev),
                    "txt": torch.stack([samples[i].txt for i in members]),
                    "txt_ids": make_txt_ids(b, txt_len, device=dev),
                    "timesteps": torch.stack([samples[i].timestep for i in members]),
                    "vec": torch.stack([samples[i].vec for i in members]),
                },
                torch.cat([targets[i] for i in members]),
                b / n_samples,
            )
        )

    def bucketed_step() -> None:
        model.zero_grad(set_to_none=True)
        for inputs, target, weight in batches:
            (weight * flow_loss(model(**inputs).float(), target)).backward()

    longest = max(packed.img_lens)
    pad_grid = max(grids, key=lambda g: g[0] * g[1] * g[2])
    pad = {
        "img": torch.randn(n_samples, longest, cfg.in_channels, device=dev, dtype=dt),
        "img_ids": make_ids(*pad_grid, batch=n_samples, device=dev),
        "txt": torch.randn(n_samples, txt_len, cfg.context_in_dim, device=dev, dtype=dt),
        "txt_ids": make_txt_ids(n_samples, txt_len, device=dev),
        "timesteps": torch.rand(n_samples, device=dev),
        "vec": torch.randn(n_samples, cfg.vec_in_dim, device=dev, dtype=dt),
    }
    pad_target = torch.randn(n_samples, longest, cfg.in_channels, device=dev)

    def padded_step() -> None:
        model.zero_grad(set_to_none=True)
        flow_loss(model(**pad).float(), pad_target).backward()

    steps = {"packed_mask": packed_step("mask"), "packed_split": packed_step("split")}
    if resolve_mode("auto", packed.img) == "varlen":
        steps["packed_varlen"] = packed_step("varlen")
    steps.update({"bucketed": bucketed_step, "padded": padded_step})
    tokens = packed.num_tokens
    out: dict = {
        "samples": n_samples,
        "shapes": len(buckets),
        "tokens": tokens,
        "padded_tokens": n_samples * (longest + txt_len),
        "params": sum(p.numel() for p in model.parameters()),
    }
    for name, step in steps.items():
        m = _measure(step, dev, repeats, warmup=2)
        out[name] = {
            "median_s": round(m["median_s"], 4),
            "tokens_per_s": round(tokens / m["median_s"], 1),  # real tokens only, padding not counted
        }
        if dev.type == "cuda":  # the allocator's peak is reset per strategy; process RSS on CPU is not
            out[name]["peak_mb"] = round(m["peak_mb"], 1)
    return out


def bench_packing(
    preset: str = "debug",
    txt_len: int = 16,
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "fp32",
    mix: tuple = PACKING_MIX,
) -> dict:
    """Sequence packing vs bucketing: training-step tokens/s over a mixed-shape set (`PACKING_MIX`, the same samples
    for every strategy; see `_packing_phase`). tokens/s counts the set's real tokens (image + text) per step time, so
    padding's extra work shows as lower throughput. Runs in its own process on CPU."""
    presets = generator_presets()
    if preset not in presets:
        raise ValueError(f"unknown generator preset {preset!r}, expected one of {sorted(presets)}")
    dev = resolve_device(device)
    mix = tuple((tuple(int(x) for x in grid), int(count)) for grid, count in mix)
    result: dict = {
        "benchmark": "packing",
        "preset": preset,
        "mix": [[list(grid), count] for grid, count in mix],
        "txt_tokens": txt_len,
        "step": "forward + mean per-sample flow loss + backward, no optimizer step",
    }
    result.update(_run_info(dev, dtype, repeats))
    result.update(_isolated(_packing_phase, (preset, mix, txt_len, str(dev), dtype, repeats), dev))
    return result


# ---------------------------------------------------------------------------------------------------- report

REPORT_FILES = ("bench.json", "bench.md")


def report_markdown(sections: dict) -> str:
    """The benchmark report: run settings, then a table per benchmark (the generator's with its Flux peer)."""
    run = next(iter(sections.values()))
    lines = [
        "# cinedit benchmarks",
        "",
        f"{run['device']}, {run['threads']} threads, {run['dtype']}, torch {run['torch']}. Times are medians of "
        f"{run['repeats']} calls after a warm-up; peak memory is what the first call added (CUDA allocator peak, or "
        f"process RSS on CPU, each model in its own process).",
    ]
    if "tokenizer" in sections:
        t = sections["tokenizer"]
        lines += [
            "",
            "## Tokenizer encode / decode",
            "",
            f"Preset {t['preset']} ({t['params_m']}M parameters), input (B, C, T, H, W) = {tuple(t['shape'])}; no "
            f"peer is measured for the tokenizer.",
            "",
            "| phase | s per call | frames/s | peak memory (MB) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for p in ("encode", "encode_compiled", "decode", "decode_compiled"):
            if p in t:
                r = t[p]
                name = p.replace("_compiled", f" (compiled; compile + first call {r.get('compile_s')} s)")
                lines.append(f"| {name} | {r['median_s']} | {r['frames_per_s']} | {r['peak_mb']} |")
    if "generator" in sections:
        g = sections["generator"]
        lines += [
            "",
            "## Generator training step",
            "",
            f"Preset {g['preset']}, {g['img_tokens']} image tokens (grid t, h, w = {tuple(g['grid'])}) + "
            f"{g['txt_tokens']} text tokens, batch {g['batch']}; {g['step']}; "
            f"{g['flops']['train_step'] / 1e9:.3f} GFLOP per step (analytic).",
            "",
            "| model | params (M) | s/step | tokens/s | GFLOP/s | MFU | peak memory (MB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        first = g.get("mmdit_compiled", {}).get("compile_s")
        names = {
            "mmdit": "cinedit MMDiT",
            "mmdit_compiled": f"cinedit MMDiT, compiled (compile + first step {first} s)",
            "flux": "diffusers Flux (peer, same shape)",
        }
        for key, name in names.items():
            if key in g:
                r = g[key]
                mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
                lines.append(
                    f"| {name} | {r['params_m']} | {r['median_s']} | {r['tokens_per_s']} | {r['gflops_per_s']} | "
                    f"{mfu} | {r['peak_mb']} |"
                )
    if "packing" in sections:
        k = sections["packing"]
        lines += [
            "",
            "## Sequence packing vs bucketing",
            "",
            f"Preset {k['preset']}, {k['samples']} samples of {k['shapes']} shapes, {k['tokens']} tokens "
            f"({k['txt_tokens']} text tokens each); {k['step']}.",
            "",
            "| strategy | s/step | tokens/s | peak memory (MB, CUDA only) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in ("packed_varlen", "packed_mask", "packed_split", "bucketed", "padded"):
            if name in k:
                r = k[name]
                lines.append(f"| {name} | {r['median_s']} | {r['tokens_per_s']} | {r.get('peak_mb', 'n/a')} |")
    return "\n".join(lines) + "\n"


def write_report(sections: dict, out: os.PathLike) -> list:
    """bench.json (every measured number) and bench.md in `out`, each written atomically."""
    out = Path(out)
    json_name, md_name = REPORT_FILES
    return [write_json(out / json_name, sections), write_text(out / md_name, report_markdown(sections))]
