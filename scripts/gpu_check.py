#!/usr/bin/env python
"""One-shot GPU check (issue 14, part 1): matmul peak, MMDiT training steps (plain and ZeRO-2), tokenizer throughput,
parity fixtures on the device, and an 11B forward. See scripts/gpu_check.md.

    python scripts/gpu_check.py --out OUT [--fixtures DIR]      # on a GPU (normally through scripts/gpu_check.sh)
    python scripts/gpu_check.py --device cpu --tiny --out OUT   # dry run of every section at tiny sizes on CPU

Every section runs in its own child process with its own time budget (a crash, hang or OOM in one section is
recorded and the next one runs) and writes its results incrementally, so a section killed at its budget still
reports what it measured. The parent writes OUT/gpu_check.json and prints a short table last.

The repo is not installed on the GPU machine: `install_checkout_finder` maps the `cinedit.*` packages onto the
checkout's folders from pyproject.toml's [tool.setuptools.package-dir], so nothing needs `pip install -e .`.
Only the modules each section needs are imported (none of them imports PyAV or the MiniLM package, except the
pipeline parity checks, which are skipped where `av` is missing).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOMINAL_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
SECTIONS = ("matmul", "fused", "mmdit_train", "zero_train", "tokenizer", "parity", "mmdit_11b")
# Seconds per section on the GPU (the whole run stays under 8 minutes with start-up and pip); tiny runs use TINY.
BUDGETS = {
    "matmul": 25,
    "fused": 15,
    "mmdit_train": 130,
    "zero_train": 80,
    "tokenizer": 80,
    "parity": 50,
    "mmdit_11b": 60,
}
TINY_BUDGET = 40
STARTUP_GRACE = 25  # a child's imports and CUDA start-up, on top of its budget, before it is killed


# --------------------------------------------------------------------------------------------- import shim


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """{package name: folder} from pyproject.toml's [tool.setuptools.package-dir] (tomllib, or a plain parse)."""
    text = (repo / "pyproject.toml").read_text()
    try:
        import tomllib

        mapping = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    except ModuleNotFoundError:  # Python 3.10: read the one table by hand
        block = re.search(r"^\[tool\.setuptools\.package-dir\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        mapping = dict(re.findall(r'^\s*"([^"]+)"\s*=\s*"([^"]+)"', block.group(1), re.M)) if block else {}
    if "cinedit" not in mapping:
        mapping["cinedit"] = "cinedit"
    return {name: (repo / folder).resolve() for name, folder in mapping.items()}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages (cinedit, cinedit.generator -> generator/, ...) in the checkout; their submodules
    are then found through each package's __path__ as usual."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        folder = self.mapping.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install_checkout_finder(repo: Path = REPO) -> None:
    if any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CheckoutFinder(package_dirs(repo)))


def stub_bitsandbytes() -> bool:
    """colossalai imports galore_torch, which imports bitsandbytes (43 MB wheel) only for an 8-bit optimizer we
    never use. Where bitsandbytes is absent, register a stub so the import chain works; True if stubbed."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return False
    import torch

    class Optimizer2State(torch.optim.Optimizer):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("bitsandbytes is a stub in scripts/gpu_check.py: 8-bit optimizers are unavailable")

    for name in ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer", "bitsandbytes.functional"):
        package = name in ("bitsandbytes", "bitsandbytes.optim")
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["bitsandbytes.optim.optimizer"].Optimizer2State = Optimizer2State
    sys.modules["bitsandbytes"].optim = sys.modules["bitsandbytes.optim"]
    sys.modules["bitsandbytes"].functional = sys.modules["bitsandbytes.functional"]
    sys.modules["bitsandbytes.optim"].optimizer = sys.modules["bitsandbytes.optim.optimizer"]
    sys.modules["bitsandbytes"].__version__ = "0.0.0+gpu-check-stub"
    return True


# --------------------------------------------------------------------------------------------- section context


class Skip(Exception):
    """A section (or part) that cannot run here: recorded as skipped with the reason."""


class Ctx:
    """What a section gets: device, sizes, budget, arguments; `part` records one measured sub-result."""

    def __init__(self, args: argparse.Namespace, result_file: Path):
        import torch

        self.args, self.tiny, self.result_file = args, args.tiny, result_file
        self.device = torch.device(
            args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise Skip("no CUDA device")
        self.deadline = time.monotonic() + args.budget
        self.result: dict = {"status": "running", "parts": {}}
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.result_file)

    def part(self, name: str, fn, min_left: float = 0.0) -> dict | None:
        """Run fn() -> dict as part `name`; errors and an exhausted budget are recorded, never raised."""
        import torch

        if self.left() < min_left:
            self.result["parts"][name] = {"status": "skipped", "reason": f"budget: {self.left():.0f} s left"}
            self.save()
            return None
        t0 = time.monotonic()
        try:
            out = {"status": "ok", **fn()}
        except Skip as e:
            out = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a part's failure is a result
            out = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-3000:],
            }
            print(f"[{name}] {out['error']}", flush=True)
        out["wall_s"] = round(time.monotonic() - t0, 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.result["parts"][name] = out
        self.save()
        return out if out["status"] == "ok" else None

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def time_calls(self, fn, warmup: int, repeats: int) -> list[float]:
        """warmup untimed calls, then up to `repeats` timed ones (at least one; fewer when the budget runs out)."""
        for _ in range(warmup):
            fn()
        times: list[float] = []
        for _ in range(max(repeats, 1)):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            if self.left() < 2 * times[-1]:
                break
        return times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


# --------------------------------------------------------------------------------------------- sections


def sec_matmul(ctx: Ctx) -> str:
    """bf16 n x n x n matmul throughput: median TFLOP/s of 10 products after 3 warm-ups."""
    import torch

    n = 256 if ctx.tiny else 8192
    dt = torch.bfloat16

    def run() -> dict:
        a = torch.randn(n, n, device=ctx.device, dtype=dt)
        b = torch.randn(n, n, device=ctx.device, dtype=dt)
        times = ctx.time_calls(lambda: torch.mm(a, b), warmup=3, repeats=10)
        t = median(times)
        return {"n": n, "dtype": "bf16", "calls": len(times), "median_s": t, "tflops": round(2 * n**3 / t / 1e12, 2)}

    r = ctx.part(f"bf16_mm_{n}", run)
    if r is None:
        raise RuntimeError("matmul failed")
    ctx.result["peak_tflops"] = r["tflops"]
    ctx.result["nominal_tflops"] = NOMINAL_PEAK_TFLOPS
    return (
        f"{r['tflops']} TFLOP/s measured ({100 * r['tflops'] / NOMINAL_PEAK_TFLOPS:.0f}% of {NOMINAL_PEAK_TFLOPS:.0f})"
    )


def sec_fused(ctx: Ctx) -> str:
    """Fused kernels against the plain path: `rms_norm` (Liger-Kernel where installed) on the 2B's hidden width in
    bf16, forward and backward; max abs errors and the median time of each path."""
    import torch

    from cinedit.generator import math as gmath

    rows, width = (64, 64) if ctx.tiny else (16384, 3072)
    x = torch.randn(rows, width, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(width, device=ctx.device, dtype=torch.bfloat16)).requires_grad_()
    backend = gmath.rms_norm_backend(x.detach(), w.detach())

    def run() -> dict:
        g = torch.randn_like(x)

        def step(fn):
            x.grad = w.grad = None
            y = fn(x, w, 1e-6)
            y.backward(g)
            return y.detach(), x.grad.detach(), w.grad.detach()

        plain, fused = step(gmath.rms_norm_plain), step(gmath.rms_norm)
        out = {"backend": backend, "rows": rows, "width": width, "dtype": "bf16"}
        for name, a, b in zip(("y", "dx", "dw"), plain, fused):
            out[f"max_abs_err_{name}"] = float((a.float() - b.float()).abs().max())
        for name, fn in (("plain", gmath.rms_norm_plain), ("fused", gmath.rms_norm)):
            out[f"{name}_median_s"] = median(ctx.time_calls(lambda fn=fn: step(fn), warmup=3, repeats=10))
        return out

    r = ctx.part("rms_norm_bf16", run)
    if r is None:
        raise RuntimeError("rms_norm comparison failed")
    speed = r["plain_median_s"] / r["fused_median_s"]
    return f"rms_norm {backend}: {speed:.2f}x the plain path, max err y {r['max_abs_err_y']:.2g}"


def _mmdit_shapes(tiny: bool) -> list[dict]:
    """Stage shapes on DC-AE f32t4c128 latents (32x space, 4x time, patch 1): 256 px -> 8x8 tokens per latent
    frame, 768 px -> 24x24; 32 frames -> 8 latent frames (the DC-AE takes T = 1 or a multiple of 4, so the
    stage's 33-frame bucket is 32 frames here); T5 text 512 tokens. The checkpointed shape comes last (it
    changes the model in place)."""
    if tiny:
        return [
            {"name": "video_b1", "batch": 1, "frames": 8, "size": 64, "txt": 8, "ckpt": None},
            {"name": "images_b4", "batch": 4, "frames": 1, "size": 64, "txt": 8, "ckpt": None},
            {"name": "video_ckpt", "batch": 1, "frames": 8, "size": 96, "txt": 8, "ckpt": (1, 1)},
        ]
    return [
        {"name": "256px_1x32f", "batch": 1, "frames": 32, "size": 256, "txt": 512, "ckpt": None},
        {"name": "256px_images_b24", "batch": 24, "frames": 1, "size": 256, "txt": 512, "ckpt": None},
        # Selective checkpointing: every double block and the first half of the single blocks.
        {"name": "768px_1x32f_ckpt", "batch": 1, "frames": 32, "size": 768, "txt": 512, "ckpt": (10, 10)},
    ]


def _train_inputs(cfg, shape: dict, device):
    import torch

    from cinedit.eval.bench import video_grid
    from cinedit.generator.flow import interpolate, sample_timesteps, velocity_target
    from cinedit.generator.math import make_ids, make_txt_ids

    grid = video_grid(cfg, shape["frames"], shape["size"])
    b, n = shape["batch"], grid[0] * grid[1] * grid[2]
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(b, n, cfg.in_channels, generator=g).to(device)
    noise = torch.randn(b, n, cfg.in_channels, generator=g).to(device)
    t = sample_timesteps(b, grid[1] * grid[2], grid[0], generator=g).to(device)
    return (
        grid,
        {
            "img": interpolate(x0, noise, t),
            "img_ids": make_ids(*grid, batch=b, device=device),
            "txt": torch.randn(b, shape["txt"], cfg.context_in_dim, generator=g).to(device),
            "txt_ids": make_txt_ids(b, shape["txt"], device=device),
            "timesteps": t,
            "vec": torch.randn(b, cfg.vec_in_dim, generator=g).to(device),
        },
        velocity_target(x0, noise),
    )


def _flop_figures(ctx: Ctx, cfg, grid, shape, times, peak: float | None) -> dict:
    """Model FLOPs (fwd + bwd = 3 x forward, no recompute), hardware FLOPs (plus the checkpointed blocks'
    recomputed forward), achieved TFLOP/s and MFU against the measured and the nominal peak."""
    from cinedit.eval.bench import mmdit_flops

    n_img = grid[0] * grid[1] * grid[2]
    fl = mmdit_flops(cfg, n_img, shape["txt"], shape["batch"])
    nd, ns = shape["ckpt"] or (0, 0)
    recompute = 0
    if cfg.depth:
        recompute += fl["double_blocks"] // cfg.depth * min(nd, cfg.depth)
    if cfg.depth_single_blocks:
        recompute += fl["single_blocks"] // cfg.depth_single_blocks * min(ns, cfg.depth_single_blocks)
    t = median(times)
    achieved = fl["train_step"] / t / 1e12
    out = {
        "grid": list(grid),
        "img_tokens": n_img,
        "txt_tokens": shape["txt"],
        "batch": shape["batch"],
        "checkpointed_blocks": [nd, ns] if shape["ckpt"] else None,
        "steps_timed": len(times),
        "step_s": round(t, 4),
        "tokens_per_s": round((n_img + shape["txt"]) * shape["batch"] / t, 1),
        "img_tokens_per_s": round(n_img * shape["batch"] / t, 1),
        "model_flop_per_step": fl["train_step"],
        "hw_flop_per_step": fl["train_step"] + recompute,
        "tflops": round(achieved, 3),
        "hw_tflops": round((fl["train_step"] + recompute) / t / 1e12, 3),
        "mfu_vs_nominal": round(achieved / NOMINAL_PEAK_TFLOPS, 4),
        "peak_mem_gib": ctx.peak_gib(),
    }
    if peak:
        out["mfu_vs_measured"] = round(achieved / peak, 4)
    return out


def _train_summary(ctx: Ctx) -> str:
    bits = []
    for name, p in ctx.result["parts"].items():
        if p.get("status") == "ok" and "step_s" in p:
            bits.append(
                f"{name} {p['step_s']}s {p['tflops']}TF {100 * p['mfu_vs_nominal']:.0f}% {p['peak_mem_gib']}GiB"
            )
        else:
            bits.append(f"{name} {p.get('status')}")
    return "; ".join(bits)


def sec_mmdit_train(ctx: Ctx) -> str:
    """2b MMDiT training step: fp32 masters + bf16 autocast, rectified-flow loss, backward, fused AdamW step."""
    import torch

    from cinedit.generator.flow import flow_loss
    from cinedit.generator.model import PRESETS, MMDiT
    from cinedit.generator.parallel import apply_activation_checkpointing
    from cinedit.runtime.dist import autocast

    preset = "debug" if ctx.tiny else "2b"
    cfg = PRESETS[preset]()
    torch.manual_seed(0)
    model = MMDiT(cfg).to(ctx.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-15, fused=ctx.device.type == "cuda")
    ctx.result.update(
        preset=preset,
        params=model.num_params(),
        precision="bf16 autocast" if ctx.device.type == "cuda" else "fp32 (cpu)",
    )
    warmup, repeats = (1, 2) if ctx.tiny else (2, 5)

    for shape in _mmdit_shapes(ctx.tiny):

        def run(shape=shape) -> dict:
            if shape["ckpt"]:
                apply_activation_checkpointing(model, *shape["ckpt"])
            grid, inputs, target = _train_inputs(cfg, shape, ctx.device)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(ctx.device, "bf16"):
                    pred = model(**inputs)
                flow_loss(pred, target).backward()
                opt.step()

            ctx.reset_peak()
            times = ctx.time_calls(step, warmup, repeats)
            return _flop_figures(ctx, cfg, grid, shape, times, ctx.args.peak_tflops)

        ctx.part(shape["name"], run, min_left=5)
    return _train_summary(ctx)


def sec_zero_train(ctx: Ctx) -> str:
    """The same step through ColossalAI's LowLevelZeroPlugin, ZeRO-2, bf16 working weights, one process."""
    import torch

    try:
        stubbed = stub_bitsandbytes()
        from cinedit.runtime.booster import ColossalBooster, import_colossalai

        import_colossalai()
    except ImportError as e:
        raise Skip(f"colossalai not importable ({e}); carry its wheel (scripts/gpu_check.md)") from None
    from cinedit.configs.parallel import ParallelConfig
    from cinedit.generator.flow import flow_loss
    from cinedit.generator.model import PRESETS, MMDiT
    from cinedit.generator.parallel import apply_activation_checkpointing
    from cinedit.runtime.dist import autocast, destroy_distributed, init_distributed

    ctx.result["bitsandbytes_stub"] = stubbed
    info = init_distributed(ctx.device.type)
    try:
        pc = ParallelConfig(plugin="zero", zero_stage=2, precision="bf16", grad_clip=1.0)
        booster = ColossalBooster(info, pc, "zero")
        preset = "debug" if ctx.tiny else "2b"
        cfg = PRESETS[preset]()
        torch.manual_seed(0)
        model = MMDiT(cfg).to(info.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-15)
        try:
            model, opt = booster.boost(model, opt)
        except RuntimeError as e:
            if info.device.type != "cuda":
                raise Skip(f"ZeRO needs CUDA here: {e}") from None
            raise
        ctx.result.update(preset=preset, plugin="LowLevelZeroPlugin stage 2 bf16, world 1")
        warmup, repeats = (1, 2) if ctx.tiny else (2, 4)
        shapes = [s for s in _mmdit_shapes(ctx.tiny) if s["batch"] == 1]
        for shape in shapes:

            def run(shape=shape) -> dict:
                if shape["ckpt"]:
                    apply_activation_checkpointing(booster.unwrap(model), *shape["ckpt"])
                grid, inputs, target = _train_inputs(cfg, shape, info.device)

                def step() -> None:
                    with autocast(info.device, "bf16"):
                        pred = model(**inputs)
                    booster.backward(flow_loss(pred, target), opt)
                    booster.step(model, opt, pc.grad_clip)

                ctx.reset_peak()
                times = ctx.time_calls(step, warmup, repeats)
                return _flop_figures(ctx, cfg, grid, shape, times, ctx.args.peak_tflops)

            ctx.part(shape["name"], run, min_left=5)
    finally:
        destroy_distributed()
    return _train_summary(ctx)


def sec_tokenizer(ctx: Ctx) -> str:
    """f32t4c128 encode / decode in bf16: 32x256x256 whole, 128x768x768 tiled (256 px x 32 frame tiles)."""
    import torch

    from cinedit.tokenizer import tiling
    from cinedit.tokenizer.model import PRESETS, VideoDCAE

    preset = "debug" if ctx.tiny else "f32t4c128"
    dt = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = VideoDCAE(PRESETS[preset]()).to(ctx.device, dt).eval()
    ctx.result.update(preset=preset, dtype=str(dt).removeprefix("torch."))
    if ctx.tiny:
        plain, tiled, tcfg = (4, 32), (8, 64), tiling.TilingConfig(spatial_tile=32, temporal_tile=4, progress=False)
    else:
        plain, tiled, tcfg = (32, 256), (128, 768), tiling.TilingConfig(progress=False)
    ctx.result["tiling"] = {
        "spatial_tile": tcfg.spatial_tile,
        "temporal_tile": tcfg.temporal_tile,
        "overlap": tcfg.overlap,
    }

    def measure(frames: int, size: int, tiled_run: bool, warmup: int, repeats: int):
        x = torch.rand(1, 3, frames, size, size, device=ctx.device, dtype=dt) * 2 - 1
        keep: dict = {}

        def enc() -> None:  # keeps the latent of the last call for the decode
            keep["z"] = tiling.encode(model, x, tcfg) if tiled_run else model.encode(x)

        out = {}
        with torch.no_grad():
            ctx.reset_peak()
            times = ctx.time_calls(enc, warmup, repeats)
            z = keep.pop("z")
            out["encode"] = {
                "s": round(median(times), 4),
                "frames_per_s": round(frames / median(times), 2),
                "peak_mem_gib": ctx.peak_gib(),
            }
            out["latent_shape"] = list(z.shape)
            dec = (
                (lambda: tiling.decode(model, z, tcfg, num_frames=frames))
                if tiled_run
                else (lambda: model.decode(z, frames))
            )
            ctx.reset_peak()
            times = ctx.time_calls(dec, warmup, repeats)
            out["decode"] = {
                "s": round(median(times), 4),
                "frames_per_s": round(frames / median(times), 2),
                "peak_mem_gib": ctx.peak_gib(),
            }
        return out

    ctx.part(f"{plain[0]}x{plain[1]}", lambda: measure(*plain, False, *((0, 1) if ctx.tiny else (1, 3))), min_left=5)
    # The big tiled run: one warm-up is the plain run above (same tile shapes); one timed call per phase.
    ctx.part(f"{tiled[0]}x{tiled[1]}_tiled", lambda: measure(*tiled, True, 0, 1), min_left=10)
    bits = []
    for name, p in ctx.result["parts"].items():
        if p["status"] == "ok":
            bits.append(f"{name} enc {p['encode']['frames_per_s']} dec {p['decode']['frames_per_s']} f/s")
        else:
            bits.append(f"{name} {p['status']}")
    return "; ".join(bits)


def _fixture_list(folder: Path, tiny: bool) -> list[Path]:
    files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("README"))
    if tiny:  # the smallest DC-AE, MMDiT and sampling fixtures (with tensors), to stay quick on CPU
        with_tensors = [p for p in files if p.with_suffix(".safetensors").exists()]
        picked = {}
        for f in sorted(with_tensors, key=lambda p: p.with_suffix(".safetensors").stat().st_size):
            kind = f.name.split("_")[0]
            if kind in ("dcae", "mmdit", "sampling"):
                picked.setdefault(kind, f)
        files = sorted(picked.values())
    return files


def sec_parity(ctx: Ctx) -> str:
    """Every parity fixture on the device: fp32 (TF32 off) at the fixtures' tolerances, then bf16 autocast with
    the errors reported (no pass/fail)."""
    import contextlib

    import torch
    from safetensors.torch import load_file

    folder = Path(ctx.args.fixtures) if ctx.args.fixtures else None
    if folder is None or not folder.is_dir():
        raise Skip(f"no fixtures folder ({ctx.args.fixtures or 'none given'}); pass --fixtures DIR (carry it)")
    from cinedit.eval import parity

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = ctx.device

    def device_load(path, device="cpu"):
        return load_file(path, device=str(dev))

    @contextlib.contextmanager
    def on_device():
        """Build models on the device and load every fixture tensor there."""
        patched = [
            m
            for name, m in list(sys.modules.items())
            if name.startswith("cinedit.") and getattr(m, "load_file", None) is load_file
        ]
        for m in patched:
            m.load_file = device_load
        try:
            with torch.device(dev):
                yield
        finally:
            for m in patched:
                m.load_file = load_file

    have_diffusers = importlib.util.find_spec("diffusers") is not None
    counts = {"pass": 0, "fail": 0, "skipped": 0, "error": 0}
    for path in _fixture_list(folder, ctx.tiny):

        def run(path=path) -> dict:
            meta = json.loads(path.read_text())
            kind = parity.component_of(meta, path)
            if kind in ("hunyuan_vae", "flux_ae") and not have_diffusers:
                raise Skip(f"{kind} needs diffusers (not installed here)")
            check = parity.CHECKS[kind]
            if isinstance(check, str):  # a lazily imported check: its module may need what is absent (e.g. av)
                try:
                    importlib.import_module(check.partition(":")[0])
                except ImportError as e:
                    raise Skip(f"{kind} check cannot import: {type(e).__name__}: {e}") from None
            out = {"component": kind}
            for mode in ("fp32", "bf16"):
                amp = torch.autocast(dev.type, dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
                try:
                    with on_device(), amp:
                        rep = parity.check_fixture(path)
                except (ImportError, parity.FixtureError) as e:
                    cause = e.__cause__ or e.__context__
                    raise Skip(f"{type(e).__name__}: {e}" + (f" ({cause})" if cause else "")) from None
                out[mode] = {
                    "ok": rep.ok,
                    "max_abs_diff": max((r.max_abs_diff for r in rep.results), default=None),
                    "worst": max(rep.results, key=lambda r: r.max_abs_diff).name,
                    "failed": [
                        f"{r.name} {r.max_abs_diff:.3g} > {r.atol}+{r.rtol}*|ref|" for r in rep.results if not r.ok
                    ][:10],
                }
            return out

        r = ctx.part(path.stem, run)
        status = ctx.result["parts"][path.stem]["status"]
        counts["pass" if r and r["fp32"]["ok"] else "fail" if r else status] += 1
    ctx.result["counts"] = counts
    if counts["fail"] or counts["error"]:
        ctx.result["partial"] = True
    return f"fp32: {counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped, {counts['error']} error"


def sec_mmdit_11b(ctx: Ctx) -> str:
    """11b-dcae forward in bf16 with random weights, built on meta then materialised on the device."""
    import torch

    from cinedit.generator.model import PRESETS, MMDiT

    preset = "debug" if ctx.tiny else "11b-dcae"
    cfg = PRESETS[preset]()
    with torch.device("meta"):
        model = MMDiT(cfg)
    model = model.to(torch.bfloat16).to_empty(device=ctx.device).eval()
    g = torch.Generator(device=ctx.device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.zero_()
        for buf in model.buffers():
            buf.zero_()
    ctx.result.update(preset=preset, params=model.num_params(), weights_gib=ctx.peak_gib())
    shapes = [s for s in _mmdit_shapes(ctx.tiny) if not s["ckpt"]]
    if not ctx.tiny:
        shapes.append({"name": "256px_12x32f", "batch": 12, "frames": 32, "size": 256, "txt": 512, "ckpt": None})
    from cinedit.eval.bench import mmdit_flops

    for shape in shapes:

        def run(shape=shape) -> dict:
            grid, inputs, _ = _train_inputs(cfg, shape, ctx.device)
            inputs = {k: v.to(torch.bfloat16) if k in ("img", "txt", "vec") else v for k, v in inputs.items()}
            ctx.reset_peak()
            with torch.no_grad():
                times = ctx.time_calls(lambda: model(**inputs), 1, 3)
            t = median(times)
            n_img = grid[0] * grid[1] * grid[2]
            fwd = mmdit_flops(cfg, n_img, shape["txt"], shape["batch"])["forward"]
            return {
                "grid": list(grid),
                "batch": shape["batch"],
                "img_tokens": n_img,
                "txt_tokens": shape["txt"],
                "forward_s": round(t, 4),
                "tflops": round(fwd / t / 1e12, 2),
                "mfu_vs_nominal": round(fwd / t / 1e12 / NOMINAL_PEAK_TFLOPS, 4),
                "peak_mem_gib": ctx.peak_gib(),
            }

        ctx.part(shape["name"], run, min_left=5)
    return "; ".join(
        f"{n} {p['forward_s']}s {p['tflops']}TF {p['peak_mem_gib']}GiB" if p["status"] == "ok" else f"{n} {p['status']}"
        for n, p in ctx.result["parts"].items()
    )


SECTION_FNS = {
    "matmul": sec_matmul,
    "fused": sec_fused,
    "mmdit_train": sec_mmdit_train,
    "zero_train": sec_zero_train,
    "tokenizer": sec_tokenizer,
    "parity": sec_parity,
    "mmdit_11b": sec_mmdit_11b,
}


def run_section(args: argparse.Namespace) -> int:
    """Child process: run one section, keep its JSON result up to date in args.result."""
    for name in filter(None, (args.without or "").split(",")):
        sys.modules[name.strip()] = None  # import of it now fails, as where it is not installed
    install_checkout_finder()
    result_file = Path(args.result)
    try:
        ctx = Ctx(args, result_file)
    except Skip as e:
        result_file.write_text(json.dumps({"status": "skipped", "reason": str(e), "parts": {}}))
        return 0
    try:
        if args.fail_section == args.section:
            raise RuntimeError("failure injected by --fail-section")
        summary = SECTION_FNS[args.section](ctx)
        parts = ctx.result["parts"].values()
        bad = any(p.get("status") == "error" for p in parts) or ctx.result.pop("partial", False)
        if parts and all(p.get("status") == "skipped" for p in parts):
            ctx.result["status"] = "skipped"
        else:
            ctx.result["status"] = "partial" if bad else "ok"
        ctx.result["summary"] = summary
    except Skip as e:
        ctx.result.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001
        ctx.result.update(
            status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:]
        )
        print(f"[{args.section}] {ctx.result['error']}", flush=True)
    ctx.save()
    return 0


# --------------------------------------------------------------------------------------------- parent


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_info(device: str) -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if device != "cpu" and torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        else:
            info["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    return info


def _child_cmd(args: argparse.Namespace, name: str, result: Path, budget: float) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--section",
        name,
        "--result",
        str(result),
        "--budget",
        f"{budget:.0f}",
        "--device",
        args.device,
    ]
    if args.tiny:
        cmd.append("--tiny")
    if args.fixtures:
        cmd += ["--fixtures", str(args.fixtures)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.fail_section:
        cmd += ["--fail-section", args.fail_section]
    if args.without:
        cmd += ["--without", args.without]
    return cmd


def main_parent(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.strip() for s in args.sections.split(",") if s.strip()] if args.sections else list(SECTIONS)
    unknown = [n for n in names if n not in SECTION_FNS]
    if unknown:
        print(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "argv": sys.argv[1:],
            "tiny": args.tiny,
            "fixtures": str(args.fixtures) if args.fixtures else None,
            "without": args.without,
            **_device_info(args.device),
        },
        "sections": {},
    }
    start = time.monotonic()
    for name in names:
        budget = TINY_BUDGET if args.tiny else BUDGETS[name]
        left = args.total_budget - (time.monotonic() - start) - STARTUP_GRACE
        if left < min(budget, 10):
            report["sections"][name] = {"status": "skipped", "reason": f"total budget: {left:.0f} s left"}
            continue
        budget = min(budget, left)
        result = out / f".section_{name}.json"
        result.unlink(missing_ok=True)
        print(f"=== {name} (budget {budget:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(_child_cmd(args, name, result, budget), timeout=budget + STARTUP_GRACE)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        try:
            res = json.loads(result.read_text())
        except (OSError, ValueError):
            res = {"parts": {}}
        if rc == "timeout":
            res.update(status="timeout", error=f"killed after {budget + STARTUP_GRACE:.0f} s")
        elif rc != 0 or res.get("status") in (None, "running"):
            res.update(status="error", error=res.get("error") or f"child exited with {rc} (crash or out of memory?)")
        res["seconds"] = round(time.monotonic() - t0, 1)
        result.unlink(missing_ok=True)
        report["sections"][name] = res
        if name == "matmul" and res.get("peak_tflops") and not args.peak_tflops:
            args.peak_tflops = res["peak_tflops"]
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"=== {name}: {res['status']} in {res['seconds']} s", flush=True)
    report["meta"]["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    m = report["meta"]
    print(f"\ngpu_check {m['date']} {m.get('device')} torch {m.get('torch')} commit {m['commit']} ({m['seconds']} s)")
    print(f"{'section':<12} {'status':<8} {'s':>6}  figures")
    for name, res in report["sections"].items():
        detail = res.get("summary") or res.get("reason") or res.get("error") or ""
        print(f"{name:<12} {res['status']:<8} {res.get('seconds', 0):>6}  {detail[:160]}")
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--tiny", action="store_true", help="debug presets and tiny shapes (the CPU dry run)")
    p.add_argument("--dry-run", action="store_true", help="the same as --device cpu --tiny")
    p.add_argument("--fixtures", default=None, help="parity fixtures folder (the parity section is skipped without it)")
    p.add_argument("--sections", default=None, help=f"comma list, default all: {','.join(SECTIONS)}")
    p.add_argument("--total-budget", type=float, default=420.0, help="seconds for all sections together")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="measured peak for MFU (default: the matmul section's)"
    )
    p.add_argument("--fail-section", default=None, help="testing: make this section raise at its start")
    p.add_argument("--without", default=None, help="comma list of modules to hide (e.g. av,diffusers: as on the GPU)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return run_section(args)
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
