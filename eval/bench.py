"""Benchmarks: tokenizer encode / decode throughput (frames/s) and peak memory at a given clip shape."""

from __future__ import annotations

import multiprocessing
import os
import platform
import threading
import time
from contextlib import contextmanager

import psutil
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _phase(preset: str, phase: str, shape: list[int], device: str, dtype: str, repeats: int) -> dict:
    """Build the model and an input, measure the first call's peak memory, then time `repeats` calls."""
    from cinedit.tokenizer.model import PRESETS, VideoDCAE

    dev, dt = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    model = VideoDCAE(PRESETS[preset]()).to(dev, dt).eval()
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
        with peak_memory(dev) as mem:
            fn()
        times = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"median_s": round(med, 4), "frames_per_s": round(b * t / med, 2), "peak_mb": round(mem["peak_mb"], 1)}


def bench_tokenizer(
    preset: str = "f32t4c128",
    num_frames: int = 8,
    size: int = 128,
    batch: int = 1,
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "fp32",
) -> dict:
    """Encode and decode speed and peak memory on a (batch, 3, T, size, size) clip; each phase runs on its own.

    On CPU every phase runs in a fresh process, so the memory one phase freed (and the C allocator kept) does
    not hide the next phase's peak. The first call is the memory measurement and the warm-up; the time is
    the median of `repeats` further calls.
    """
    from cinedit.tokenizer.model import PRESETS, VideoDCAE

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    with torch.device("meta"):
        params = sum(p.numel() for p in VideoDCAE(PRESETS[preset]()).parameters())
    shape = [batch, 3, num_frames, size, size]
    result: dict = {
        "benchmark": "tokenizer",
        "preset": preset,
        "params_m": round(params / 1e6, 1),
        "shape": shape,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "repeats": repeats,
        "torch": torch.__version__,
    }
    for phase in ("encode", "decode"):
        args = (preset, phase, shape, device, dtype, repeats)
        if dev.type == "cpu":
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                result[phase] = pool.apply(_phase, args)
        else:
            result[phase] = _phase(*args)
    return result
