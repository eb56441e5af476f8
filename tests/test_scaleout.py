"""Scale-out of the generator trainer on CPU processes (gloo): context parallelism inside the real training step,
ZeRO-2 kill-and-resume (exact), interrupted checkpoint writes, resuming on another number of processes, and the
debug stage chain from its launch scripts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from colossal_cpu import patch_colossalai_for_cpu
from distributed import run_workers
from harness import assert_same_after, dying_step

from cinedit.generator import train as train_mod
from cinedit.runtime import checkpoint
from cinedit.runtime.checkpoint import LATEST, latest_checkpoint
from cinedit.runtime.logs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# One bucket shape (64px, 8 frames, 2 per rank) keeps a step cheap and every rank's batch the same shape.
BUCKETS = '{"64px": {"8": [1.0, 2]}}'


def argv(meta: Path, out: Path, *extra: str) -> list[str]:
    return [
        "debug",
        f"--data.meta={meta}",
        f"--train.out_dir={out}",
        f"--data.buckets.table={BUCKETS}",
        "--train.progress=false",
        "--train.eval_every=0",
        "--train.log_every=1",
        *extra,
    ]


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}


def train_worker(rank: int, world: int, args: list[str], zero: bool, die_at: int = 0, crash_save: int = 0) -> int:
    """`cinedit generator train ARGS` on this rank; optionally killed at a step, or inside the n-th checkpoint
    write (on every rank, after the model, optimizer and master weights are on disk)."""
    if zero:
        patch_colossalai_for_cpu()
    if die_at:
        train_mod.train_step = dying_step(train_mod.train_step, die_at)
    if crash_save:
        real_rng_state, calls = checkpoint.rng_state, []

        def crashes():
            # Every rank saves its RNG state in the checkpoint writer, after the collective tensor writes.
            calls.append(1)
            if len(calls) == crash_save:
                raise OSError("disk full")
            return real_rng_state()

        checkpoint.rng_state = crashes  # where the checkpoint writer looks it up
    try:
        return train_mod.main(args)
    except (KeyboardInterrupt, OSError) as e:
        return f"interrupted: {e}"


def recording_worker(rank: int, world: int, args: list[str]) -> list[float]:
    """`cinedit generator train ARGS`, returning this rank's own per-step losses."""
    real_loss, local = train_mod.flow_loss, []

    def recorded(*a, **kw):
        loss = real_loss(*a, **kw)
        local.append(float(loss.detach()))
        return loss

    train_mod.flow_loss = recorded
    assert train_mod.main(args) == 0
    return local


@pytest.fixture(scope="module")
def meta(sample_data) -> Path:
    return sample_data[1]


def test_context_parallel_training_matches_one_process(meta, tmp_path):
    """Three real training steps (conditions, caption dropout, masked loss) with the sequence split over 2
    processes (ring and Ulysses) give the single-process losses and gradient norms."""
    common = ("--train.steps=3", "--train.ckpt_every=0", "--parallel.plugin=torch")
    one = tmp_path / "one"
    assert run_workers(train_worker, 1, argv(meta, one, *common), False) == [0]
    for mode in ("ring", "ulysses"):
        out = tmp_path / mode
        extra = ("--parallel.cp_size=2", f"--parallel.cp_mode={mode}")
        assert run_workers(train_worker, 2, argv(meta, out, *common, *extra), False) == [0, 0]
        for key in ("loss", "grad_norm"):
            a, b = losses(one, key), losses(out, key)
            assert sorted(a) == sorted(b) == [1, 2, 3]
            assert all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6) for s in a), (mode, key, a, b)
        assert losses(out, "tokens_per_s")


def test_dp2_x_cp2_matches_dp2(meta, tmp_path):
    """4 processes as 2 data-parallel x 2 context-parallel (Ulysses) log the losses of 2 data-parallel processes:
    context-parallel group members share samples and draws, and gradients average over data ranks only."""
    common = ("--train.steps=2", "--train.ckpt_every=0", "--parallel.plugin=torch")
    dp, both = tmp_path / "dp", tmp_path / "dp_cp"
    local = run_workers(recording_worker, 2, argv(meta, dp, *common))
    assert local[0] != local[1]  # the two data ranks trained on different batches
    # The logged loss is the mean over data ranks, not rank 0's own.
    assert losses(dp) == {s + 1: pytest.approx((a + b) / 2, rel=1e-12) for s, (a, b) in enumerate(zip(*local))}
    extra = ("--parallel.cp_size=2", "--parallel.cp_mode=ulysses")
    assert run_workers(train_worker, 4, argv(meta, both, *common, *extra), False) == [0] * 4
    for key in ("loss", "grad_norm"):
        a, b = losses(dp, key), losses(both, key)
        assert sorted(a) == sorted(b) == [1, 2]
        assert all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6) for s in a), (key, a, b)


def test_zero2_kill_and_resume_is_exact_and_survives_a_crashed_save(meta, tmp_path):
    """ZeRO-2 (ColossalAI LowLevelZeroPlugin, fp32) on 2 processes: killed after the step-3 checkpoint, resumed, it
    logs the uninterrupted run's losses bit for bit; a save that dies midway leaves the previous checkpoint, which
    resumes; a 2-process checkpoint also resumes on 1 process."""
    common = ("--train.steps=6", "--parallel.plugin=zero", "--parallel.precision=fp32", "--parallel.zero_stage=2")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_workers(train_worker, 2, argv(meta, full, *common, "--train.ckpt_every=0"), True) == [0, 0]

    out = run_workers(train_worker, 2, argv(meta, killed, *common, "--train.ckpt_every=3"), True, 5)
    assert all(str(r).startswith("interrupted") for r in out)
    ckpt = latest_checkpoint(killed)
    assert ckpt is not None and ckpt.name == "step-000003"
    names = {p.name for p in (ckpt / "model").iterdir()}
    # Sharded: every rank wrote its share of the weights, optimizer states and fp32 masters.
    for kind, ext in (("model", "safetensors"), ("optimizer", "pt"), ("master", "safetensors")):
        assert {f"{kind}.index.json", f"{kind}-00000-of-00002.{ext}", f"{kind}-00001-of-00002.{ext}"} <= names
    resumed = argv(meta, killed, *common, "--train.ckpt_every=3", "--train.resume=auto")
    assert run_workers(train_worker, 2, resumed, True) == [0, 0]
    assert sorted(losses(full)) == list(range(1, 7))
    assert_same_after(full, killed, ("loss", "grad_norm"), step=3)

    # A checkpoint write that dies after the tensors are written: `latest` stays on the last good one.
    crashed = tmp_path / "crashed"
    out = run_workers(train_worker, 2, argv(meta, crashed, *common, "--train.ckpt_every=3"), True, 0, 2)
    assert any("disk full" in str(r) for r in out)
    assert latest_checkpoint(crashed).name == "step-000003"
    assert not (crashed / "ckpt" / "step-000006").exists()
    assert run_workers(train_worker, 2, argv(meta, crashed, *common, "--train.resume=auto"), True) == [0, 0]
    assert losses(crashed)[6] == losses(full)[6]

    # Another number of processes: the sampler re-splits the remaining order; the run goes on from step 3.
    one = tmp_path / "one"
    one.mkdir()
    subprocess.run(["cp", "-r", str(killed / "ckpt"), str(one / "ckpt")], check=True)
    (one / "ckpt" / LATEST).write_text("step-000003\n")
    config = json.loads((killed / "config.json").read_text())
    config["train"]["out_dir"] = str(one)
    (one / "config.json").write_text(json.dumps(config))
    assert run_workers(train_worker, 1, argv(meta, one, *common, "--train.resume=auto"), True) == [0]
    assert sorted(losses(one)) == [4, 5, 6]
    state = json.loads((latest_checkpoint(one) / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1


def test_debug_stage_chain_runs_from_its_launch_scripts(meta, tmp_path):
    """scripts/debug_stages.sh: stage 1 (t2v) -> stage 2 (t/i2v) -> stage 3 (128px, cp 2, checkpointed), each from
    the previous stage's final model, on 2 CPU processes under torchrun."""
    root = tmp_path / "chain"
    env = {**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python"), "PROCS": "2"}
    if not Path(env["PYTHON"]).is_file():
        env["PYTHON"] = "python"
    steps = ("--train.steps=2", "--train.ckpt_every=2", "--train.progress=false", "--train.eval_every=0")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "debug_stages.sh"), str(root), str(meta), *steps],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for stage in ("stage1", "stage2", "stage3"):
        assert (root / stage / "model" / "pipeline.json").is_file(), stage
        assert sorted(losses(root / stage)) == [1, 2], stage
    s2 = json.loads((root / "stage2" / "config.json").read_text())
    s3 = json.loads((root / "stage3" / "config.json").read_text())
    assert s2["model"]["init_from"] == str(root / "stage1" / "model" / "generator")
    assert s3["model"]["init_from"] == str(root / "stage2" / "model" / "generator")
    assert s3["parallel"]["cp_size"] == 2 and s3["model"]["grad_ckpt_offload"] is True
    # Stage 2 really started from stage 1's weights: its first loss is below stage 1's first loss.
    assert losses(root / "stage2")[1] < losses(root / "stage1")[1]

    # A stage whose previous stage is missing refuses with a message.
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "stage3_768px_ti2v.sh"), "--debug", "1", "2", str(meta), str(tmp_path / "x")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "run the previous stage script first" in proc.stderr


def test_launch_scripts_check_their_arguments(tmp_path):
    for script in ("stage1_256px_t2v.sh", "stage2_256px_ti2v.sh", "stage3_768px_ti2v.sh"):
        proc = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "stage1_256px_t2v.sh"), "1", "8", str(tmp_path / "no.csv"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "meta file" in proc.stderr and "not found" in proc.stderr


def test_multi_node_launch_commands(meta, tmp_path):
    """Several nodes: `colossalai run --hostfile` from node 0, or torchrun with this node's rank (DRY_RUN prints)."""
    script = str(ROOT / "scripts" / "stage1_256px_t2v.sh")
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node0\nnode1\n")
    env = {**os.environ, "DRY_RUN": "1", "HOSTFILE": str(hosts), "MASTER_ADDR": "node0"}
    proc = subprocess.run(["bash", script, "2", "8", str(meta), str(tmp_path / "os2")], env=env, capture_output=True)
    cmd = proc.stderr.decode()
    assert proc.returncode == 0, cmd
    assert "colossalai run --nproc_per_node 8 --hostfile" in cmd and "--num_nodes 2 --master_addr node0" in cmd
    assert "-m cinedit.generator.train stage1_256px_t2v" in cmd and f"--train.out_dir={tmp_path / 'os2'}/stage1" in cmd
    env = {**os.environ, "DRY_RUN": "1", "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    proc = subprocess.run(["bash", script, "2", "8", str(meta), str(tmp_path / "os2")], env=env, capture_output=True)
    cmd = proc.stderr.decode()
    assert proc.returncode == 0 and "torch.distributed.run --nnodes 2 --node-rank 1 --nproc-per-node 8" in cmd, cmd
    assert "--master-addr node0" in cmd and "--train.resume=auto" in cmd


def test_world_must_divide_by_cp(meta, tmp_path, capsys):
    # One process cannot hold a context-parallel group of 2: a clear config error, nothing trained.
    assert train_mod.main(argv(meta, tmp_path / "run", "--parallel.cp_size=2", "--train.steps=1")) == 2
    assert "not a multiple of parallel.cp_size 2" in capsys.readouterr().err
    assert torch.distributed.is_initialized() is False
