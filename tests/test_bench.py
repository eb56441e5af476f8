"""`cinedit eval bench`: tokenizer frames/s and peak memory per phase; generator training-step throughput and FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cinedit.cli import main
from cinedit.eval.bench import peak_memory


def test_tokenizer_bench_reports_speed_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["eval", "bench", "--preset", "debug", "--frames", "4", "--size", "32", "--repeats", "1", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shape"] == [1, 3, 4, 32, 32] and res["params_m"] == 1.2
    for phase in ("encode", "decode"):
        assert res[phase]["frames_per_s"] > 0 and isinstance(res[phase]["peak_mb"], float)  # see test_peak_memory
    assert "frames/s" in capsys.readouterr().out


def test_all_writes_report_with_flux_peer(tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["eval", "bench", "--model", "all", "--tokenizer-preset", "debug", "--generator-preset", "debug"]
    argv += ["--frames", "4", "--size", "32", "--seq", "16", "--txt-len", "8", "--repeats", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    tok, res = report["tokenizer"], report["generator"]
    assert tok["shape"] == [1, 3, 4, 32, 32] and tok["encode"]["frames_per_s"] > 0
    assert res["img_tokens"] == 16 and res["grid"] == [1, 4, 4] and res["txt_tokens"] == 8
    assert res["flops"]["train_step"] == 3 * res["flops"]["forward"] > 0
    for name in ("mmdit", "flux"):
        r = res[name]
        assert r["params"] > 0 and r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["gflops_per_s"] > 0
        assert isinstance(r["peak_mb"], float) and "mfu" not in r  # no MFU on CPU
        assert r["flops_per_step"] == res["flops"]["train_step"]  # same matmuls at MLP ratio 4
    # Same architecture but for our zero-initialised i2v `cond_in` (cond_channels -> hidden, with bias).
    cfg = res["config"]
    cond_in = ((cfg["in_channels"] // cfg["patch_size"] ** 2 + 1) * cfg["patch_size"] ** 2 + 1) * cfg["hidden_size"]
    assert res["mmdit"]["params"] - res["flux"]["params"] == cond_in
    pk = report["packing"]
    assert pk["packed_split"]["tokens_per_s"] > 0 and pk["bucketed"]["tokens_per_s"] > 0
    md = (out / "bench.md").read_text()
    assert "## Sequence packing vs bucketing" in md and f"| packed_split | {pk['packed_split']['median_s']} |" in md
    assert f"| encode | {tok['encode']['median_s']} | {tok['encode']['frames_per_s']} |" in md
    assert f"| diffusers Flux (peer, same shape) | {res['flux']['params_m']} | {res['flux']['median_s']} |" in md
    assert "input (B, C, T, H, W) = (1, 3, 4, 32, 32)" in md and "threads" in md
    text = capsys.readouterr().out
    assert "tokens/s" in text and "flux" in text and "frames/s" in text
    assert main([*argv, "--out", str(out)]) == 2  # an existing report is kept
    assert main(["eval", "bench", "--model", "all", "--preset", "debug"]) == 2
    assert main(["eval", "bench", "--generator-preset", "debug"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "--tokenizer-preset / --generator-preset" in err


def test_peak_memory_sees_what_the_block_allocates():
    """CPU: the resident set's rise over the block (a 64 MiB tensor, touched, kept to the end of the block)."""
    with peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)  # a few samples of the 2 ms sampler
    del x
    assert 56 <= mem["peak_mb"] < 256, mem
    with peak_memory(torch.device("cpu")) as mem:
        pass
    assert mem["peak_mb"] < 32, mem


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--model {tokenizer,generator,packing,all}" in text and "--compile" in text


def test_analytic_flops_match_flop_counter():
    """The analytic count is exactly FlopCounterMode's for the forward (both count only matmuls and attention).

    SDPA runs on the math backend so that its two matmuls are visible: torch's counter has no formula for the CPU
    flash kernel. For a training step the counter sees slightly less than 3 x forward: autograd skips the
    grad-input matmuls of the layers whose inputs need no grad (img_in, txt_in, time_in/vector_in first linears).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cinedit.eval.bench import flux_from_config, mmdit_flops
    from cinedit.generator.math import make_ids, make_txt_ids
    from cinedit.generator.model import MMDiT, debug

    cfg, b, t, h, w, lt = debug(), 2, 2, 3, 4, 8
    li = t * h * w
    torch.manual_seed(0)
    img, txt = torch.randn(b, li, cfg.in_channels), torch.randn(b, lt, cfg.context_in_dim)
    ids, txt_ids, ts, y = make_ids(t, h, w, b), make_txt_ids(b, lt), torch.rand(b), torch.randn(b, cfg.vec_in_dim)
    expected = mmdit_flops(cfg, li, lt, b)
    model = MMDiT(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        model(img, ids, txt, txt_ids, ts, y)
    assert fwd.get_total_flops() == expected["forward"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        model(img, ids, txt, txt_ids, ts, y).square().mean().backward()
    skipped = 2 * b * cfg.hidden_size * (li * cfg.in_channels + lt * cfg.context_in_dim + 256 + cfg.vec_in_dim)
    assert step.get_total_flops() == expected["train_step"] - skipped
    assert abs(step.get_total_flops() / expected["train_step"] - 1) < 0.02
    flux = flux_from_config(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fl:
        flux(img, txt, y, ts, ids[0], txt_ids[0], return_dict=False)
    assert fl.get_total_flops() == expected["forward"]


def test_generator_token_grids_and_gpu_peaks(capsys):
    from cinedit.eval.bench import bf16_peak_flops, generator_presets, seq_grid, video_grid

    presets = generator_presets()
    assert seq_grid(256) == (1, 16, 16) and seq_grid(18) == (1, 3, 6) and seq_grid(7) == (1, 1, 7)
    assert video_grid(presets["mid"](), 16, 256) == (4, 8, 8)  # DC-AE: 4x time, 32x space, patch 1
    assert video_grid(presets["11b"](), 33, 256) == (9, 16, 16)  # HunyuanVAE (causal 4x, 8x) + patch 2
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and bf16_peak_flops("Tesla T4") is None
    assert main(["eval", "bench", "--with-flux"]) == 2  # generator-only flag with the tokenizer
    assert main(["eval", "bench", "--model", "generator", "--seq", "16", "--frames", "4"]) == 2
    assert "only apply to --model generator" in capsys.readouterr().err


def test_the_compiled_step_is_measured_with_its_compile_time(monkeypatch):
    from cinedit.eval import bench
    from cinedit.generator.model import MMDiT

    compiled = []
    original = MMDiT.compile_blocks
    # aot_eager: Dynamo capture without Inductor's C++ code generation, which takes minutes on this CPU.
    monkeypatch.setattr(MMDiT, "compile_blocks", lambda self: compiled.append(original(self, backend="aot_eager")))
    cfg = bench.generator_presets()["debug"]()
    r = bench._train_phase("mmdit_compiled", cfg, (1, 4, 4), 8, 1, "cpu", "fp32", 1)
    assert len(compiled) == 1 and len(compiled[0]) == cfg.depth + cfg.depth_single_blocks
    assert r["first_s"] > r["median_s"] > 0


def test_denormal_benchmark_runs_both_modes_side_by_side(sample_data, tmp_path):
    # scripts/bench_denormals.py: the demo's tokenizer with subnormals flushed and kept, each in its own process.
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_denormals.py"
    argv = [
        sys.executable,
        str(script),
        "--steps",
        "4",
        "--block",
        "2",
        "--threads",
        "1",
        "--meta",
        str(sample_data[1]),
    ]
    done = subprocess.run([*argv, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["steps"] == 4 and [r["steps"] for r in doc["rows"]] == [[2, 3], [4, 4]]
    assert set(doc["total_s"]) == {"flushed", "kept"} and all(v > 0 for v in doc["total_s"].values())
    assert "| 2-3 |" in done.stdout and (tmp_path / "flush_true" / "metrics.jsonl").is_file()
    assert (tmp_path / "flush_false" / "config.json").is_file()
    flags = {
        json.loads((tmp_path / f"flush_{f}" / "config.json").read_text())["train"]["flush_denormal"]
        for f in ("true", "false")
    }
    assert flags == {True, False}
    bad = subprocess.run([*argv[:2], "--steps", "3", "--block", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least two blocks" in bad.stderr
