"""Multi-process test helpers: gloo worlds of CPU processes, in-process workers or real `torchrun` launches.

`run_workers(fn, world_size, *args)` spawns `world_size` processes, joins them into a gloo process group, calls
`fn(rank, world_size, *args)` in each and returns the per-rank return values (anything `torch.save` can write).
`fn` must be a module-level function of an importable module (spawn pickles it by name); the test modules are
importable because pytest puts `tests/` on `sys.path`, which spawned children inherit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, init_file: str, out_dir: str, port: int, args: tuple) -> None:
    # torchrun's variables, so library code that reads them (init_distributed, ColossalAI) agrees.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank-{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank-{rank}.pt")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; returns the results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        try:
            mp.spawn(_entry, args=(fn, world_size, init_file, tmp, free_port(), args), nprocs=world_size, join=True)
        except Exception as e:
            errors = []
            for r in range(world_size):
                p = Path(tmp) / f"rank-{r}.pt"
                if p.is_file():
                    doc = torch.load(p, weights_only=False)
                    if not doc["ok"]:
                        errors.append(f"rank {r}:\n{doc['error']}")
            raise RuntimeError("distributed worker failed:\n" + ("\n".join(errors) or str(e))) from None
        return [torch.load(Path(tmp) / f"rank-{r}.pt", weights_only=False)["result"] for r in range(world_size)]


def run_torchrun(nproc: int, argv: list[str], cwd: str | os.PathLike | None = None, timeout: float = 600) -> str:
    """`python -m torch.distributed.run --nproc-per-node nproc ARGV` on CPU; stdout+stderr, raises on failure."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{out[-6000:]}")
    return out
