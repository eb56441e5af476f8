"""Context-parallel sampling: 2 gloo processes give the one-process latents (to fp32 noise), and `--cp 2` writes one
video from rank 0."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cinedit.cli import main
from cinedit.configs.generator import SamplerConfig
from cinedit.data.video import probe, read_video
from cinedit.generator import generate as gen
from cinedit.generator.inference import Request, sample_videos
from cinedit.generator.model import PRESETS as GENERATORS
from cinedit.generator.model import MMDiT
from cinedit.generator.pipeline import load_pipeline, save_pipeline
from cinedit.generator.text import PRESETS as TEXT
from cinedit.tokenizer.model import PRESETS as TOKENIZERS
from cinedit.tokenizer.model import VideoDCAE

H, W, FRAMES = 64, 128, 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = dataclasses.replace(GENERATORS["debug"](), context_in_dim=384, vec_in_dim=384)
    model = MMDiT(cfg)
    torch.nn.init.normal_(model.cond_in.weight, std=0.1)  # an i2v branch that matters
    path = tmp_path_factory.mktemp("pipe") / "model"
    save_pipeline(path, model, VideoDCAE(TOKENIZERS["debug"]()), TEXT["debug"], SamplerConfig(num_steps=3), fps=8)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(ref: torch.Tensor) -> Request:
    return Request(["a fox in the snow"], FRAMES, (H, W), SamplerConfig(num_steps=3, seed=5), "i2v_head", refs=[ref])


def _worker(rank: int, world: int, port: int, ckpt: str, ref: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pipe = load_pipeline(ckpt)
        z, video = sample_videos(pipe, _request(ref), velocity=gen.context_parallel_velocity(pipe.generator))
        if rank == 0:
            torch.save({"z": z, "video": video}, out)
    finally:
        dist.destroy_process_group()


def test_two_process_cp_sampling_equals_one_process(ckpt, tmp_path):
    ref = torch.rand(3, 1, H, W) * 2 - 1
    pipe = load_pipeline(ckpt)
    z1, video1 = sample_videos(pipe, _request(ref))
    assert gen.context_parallel_velocity(pipe.generator) is None  # one process: the plain model
    out = tmp_path / "cp.pt"
    mp.start_processes(_worker, args=(2, _free_port(), ckpt, ref, str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out)
    assert (got["z"] - z1).abs().max() < 1e-4
    assert (got["video"] - video1).abs().max() < 1e-3
    assert (z1 - torch.randn_like(z1)).abs().max() > 0.1  # the comparison is not vacuous


def test_cp_flag_launches_torchrun_and_rank0_writes_one_video(ckpt, tmp_path):
    argv = ["--prompt", "a fox", "--size", str(H), str(W), "--num-frames", "8", "--steps", "2"]
    argv += ["--ckpt", ckpt, "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "cinedit.cli", "generator", "sample", *argv]
    kw = dict(env=env, capture_output=True, text=True, timeout=300)
    assert main(["generator", "sample", *argv, "--out", str(tmp_path / "a")]) == 0  # one process, in this one
    two = subprocess.run([*base, "--cp", "2", "--out", str(tmp_path / "b")], **kw)
    assert two.returncode == 0, two.stderr
    assert "torch.distributed.run" in two.stderr and "--nproc-per-node=2" in two.stderr
    (a,), (b,) = list((tmp_path / "a").iterdir()), list((tmp_path / "b").iterdir())
    assert a.name == b.name and probe(b).num_frames == 8
    assert (read_video(a) - read_video(b)).abs().mean() < 0.01  # the same video (mp4-coded)
