"""Sequence packing in the generator trainer (`--data.packing=true --data.tokens_per_batch=N`): the packed step is
the mean of the per-sample unpacked steps (loss and gradients), runs from the command line on mock and real data with
mixed shapes in a pack, resumes exactly, keeps the checkpoint format, syncs gradients under 2-process DDP, and
refuses what it does not support."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from distributed import run_workers
from harness import assert_same_after, kill_and_resume

from cinedit.configs import ConfigError
from cinedit.configs.core import apply_overrides
from cinedit.configs.generator import debug
from cinedit.generator import train as train_mod
from cinedit.generator.flow import flow_loss
from cinedit.runtime.checkpoint import latest_checkpoint, read_index
from cinedit.runtime.dist import init_distributed
from cinedit.runtime.logs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only contend on a shared machine

# Images and clips at two resolutions; with the debug tokenizer and MiniLM (32 text tokens) a sample is 38 to 47
# tokens, so a 130-token pack holds 2 to 3 samples of usually different shapes.
BUCKETS = '{"64px": {"1": [1.0, 4], "8": [1.0, 2]}, "128px": {"1": [1.0, 2], "4": [1.0, 1]}}'
PACKING = ("--data.packing=true", "--data.tokens_per_batch=130")


def mock_args(out: Path, *extra: str) -> list[str]:
    return [
        "debug",
        "--data.mock=true",
        "--data.mock_samples=3",
        f"--data.buckets.table={BUCKETS}",
        f"--train.out_dir={out}",
        "--train.progress=false",
        "--train.eval_every=0",
        "--train.sample_every=0",
        *PACKING,
        *extra,
    ]


def metric(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}


def shapes_of(pack: list[dict]) -> set[tuple[int, ...]]:
    return {tuple(item["latent" if "latent" in item else "video"].shape) for item in pack}


def recording(monkeypatch) -> list[set[tuple[int, ...]]]:
    """Record the sample shapes of every pack the trainer steps on."""
    real, seen = train_mod.train_pack_step, []

    def step(tr, pack, step):
        seen.append(shapes_of(pack))
        return real(tr, pack, step)

    monkeypatch.setattr(train_mod, "train_pack_step", step)
    return seen


def build(tmp_path: Path, *extra: str) -> train_mod.Trainer:
    argv = mock_args(tmp_path / "run", "--parallel.plugin=torch", "--ema.enabled=false", *extra)[1:]
    cfg = apply_overrides(debug(), argv)
    cfg.validate()
    return train_mod.build_trainer(cfg, init_distributed("cpu"))


def test_packed_step_is_the_mean_of_per_sample_steps(tmp_path):
    """Loss and gradients of one packed step (caption dropout, i2v / inpainting conditions, loss masks, each sample's
    own shift) equal the mean over the per-sample unpacked forwards with the same draws, to fp32 noise."""
    tr = build(tmp_path, "--flow.caption_dropout=0.5")
    pack = next(iter(tr.loader))
    assert len(pack) >= 2 and len(shapes_of(pack)) >= 2, shapes_of(pack)

    # The reference: each sample alone through the plain forward of a copy of the model, draws from the step's
    # generator one sample after the other.
    ref = copy.deepcopy(tr.module)
    g = train_mod.step_generator(tr, 1)
    losses, given = [], []
    for x0, txt, vec in train_mod.encode_pack(tr, pack):
        inputs, target, mask, cond = train_mod.flow_draws(tr, x0, txt, vec, g)
        losses.append(flow_loss(ref(**inputs), target, mask))
        given.append(float(cond.mask.mean()))
    torch.stack(losses).mean().backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(set(given)) > 1 or len({float(x) for x in losses}) > 1  # the draws really differ between samples

    got = {}
    real_step = tr.booster.step

    def step(model, optimizer, max_norm):
        got.update({n: p.grad.clone() for n, p in tr.module.named_parameters() if p.grad is not None})
        return real_step(model, optimizer, max_norm)

    tr.booster.step = step
    out = train_mod.train_step(tr, pack, 1)
    assert out["loss"] == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-5, abs=1e-6)
    assert out["given_share"] == pytest.approx(sum(given) / len(given))
    assert out["tokens"] == sum(x0[0, 0].numel() for x0, _, _ in train_mod.encode_pack(tr, pack))
    assert got.keys() == want.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_mock_training_mixes_shapes(tmp_path, monkeypatch):
    seen = recording(monkeypatch)
    out = tmp_path / "run"
    assert train_mod.main(mock_args(out, "--train.steps=3", "--train.ckpt_every=0", "--train.eval_every=3")) == 0
    assert len(seen) == 3 and any(len(s) > 1 for s in seen), seen
    losses = metric(out, "loss")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
    assert metric(out, "eval/loss") and (out / "model" / "generator").is_dir()
    assert json.loads((out / "config.json").read_text())["data"]["packing"] is True


def test_packed_training_on_the_sample_data(sample_data, tmp_path, monkeypatch):
    """Decoded clips and photographs, encoded by the debug tokenizer and MiniLM sample by sample."""
    seen = recording(monkeypatch)
    out = tmp_path / "run"
    argv = [
        "debug",
        f"--data.meta={sample_data[1]}",
        f"--train.out_dir={out}",
        "--train.progress=false",
        "--train.steps=2",
        "--train.eval_every=0",
        "--train.ckpt_every=0",
        "--train.sample_every=0",
        "--data.packing=true",
        "--data.tokens_per_batch=110",  # 64px images (33 tokens) and 8-frame clips (40): 2 or 3 a pack
    ]
    assert train_mod.main(argv) == 0
    assert len(seen) == 2 and all(len(s) >= 1 for s in seen)
    assert any(len(s) > 1 for s in seen), seen  # an image and a clip in one pack
    assert sorted(metric(out, "loss")) == [1, 2]


def test_packed_resume_is_exact(tmp_path):
    common = ("--train.steps=5", "--train.eval_every=3", "--train.log_every=1")
    run = kill_and_resume(train_mod, mock_args, tmp_path, common, kill_at=4, ckpt_every=3, log_key="loss")
    assert run.logged_before_kill == [1, 2, 3] and run.resumed_from == 3
    assert_same_after(run.full, run.killed, ("loss", "grad_norm", "given_share", "eval/loss"), step=3)


def test_packed_checkpoints_have_the_unpacked_format(tmp_path):
    """A packed run's checkpoint loads into an unpacked trainer and continues, and the other way round; the model's
    checkpoint keys are the same."""
    runs = {}
    for name, extra in (("packed", ()), ("bucketed", ("--data.packing=false", "--data.tokens_per_batch=0"))):
        out = tmp_path / name
        assert train_mod.main(mock_args(out, "--train.steps=2", "--train.ckpt_every=2", *extra)) == 0
        runs[name] = latest_checkpoint(out)
    for kind in ("model", "optimizer"):
        keys = [read_index(ckpt / "model", kind)["weight_map"].keys() for ckpt in runs.values()]
        assert keys[0] == keys[1] and keys[0], kind
    assert sorted(p.name for p in runs["packed"].iterdir()) == sorted(p.name for p in runs["bucketed"].iterdir())
    for name, ckpt, extra in (
        ("to_bucketed", runs["packed"], ("--data.packing=false", "--data.tokens_per_batch=0")),
        ("to_packed", runs["bucketed"], ()),
    ):
        tr = build(tmp_path / name, *extra, "--ema.enabled=true")
        train_mod.load(tr, ckpt)
        assert tr.step == 2
        batch = next(iter(tr.loader))
        assert 0 < train_mod.train_step(tr, batch, 3)["loss"] < 10


def ddp_worker(rank: int, world: int, args: list[str]) -> tuple[list[float], list[float]]:
    """`cinedit generator train ARGS` on this rank: its own packed losses, and its final weights' checksums."""
    real_build, real_losses, trainers, local = train_mod.build_trainer, train_mod.packed_flow_losses, [], []

    def build_trainer(cfg, info):
        trainers.append(real_build(cfg, info))
        return trainers[-1]

    def losses(*a, **kw):
        out = real_losses(*a, **kw)
        local.append(float(out.detach().mean()))
        return out

    train_mod.build_trainer, train_mod.packed_flow_losses = build_trainer, losses
    assert train_mod.main(args) == 0
    return local, [float(p.double().sum()) for p in trainers[0].module.parameters()]


def test_ddp_packing_synchronises_gradients(tmp_path):
    """Two processes train different packs (different losses) through the boosted model's own call: DDP averages
    the gradients, so both ranks end with the same weights, and the logged loss is the ranks' mean."""
    out = tmp_path / "ddp"
    args = mock_args(out, "--train.steps=2", "--train.ckpt_every=0", "--ema.enabled=false", "--parallel.plugin=torch")
    (loss0, weights0), (loss1, weights1) = run_workers(ddp_worker, 2, args)
    assert len(loss0) == len(loss1) == 2 and loss0 != loss1
    assert weights0 == weights1
    logged = metric(out, "loss")
    assert all(logged[s + 1] == pytest.approx((loss0[s] + loss1[s]) / 2, rel=1e-6) for s in range(2))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (("--data.tokens_per_batch=0",), "needs data.tokens_per_batch"),
        (("--data.packing=false",), "only read with data.packing=true"),
        (("--parallel.cp_size=2",), "context parallelism"),
        (("--model.compile=true",), "model.compile=false"),
        (("--control.enabled=true", "--ema.enabled=false"), "control adapter"),
    ],
)
def test_unsupported_packing_configs_are_refused(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(debug(), mock_args(tmp_path, *extra)[1:]).validate()


def test_a_budget_below_one_sample_is_a_config_error(tmp_path, capsys):
    assert train_mod.main(mock_args(tmp_path / "run", "--data.tokens_per_batch=40", "--train.steps=1")) == 2
    err = capsys.readouterr().err
    assert "data.tokens_per_batch=40 is smaller than one sample" in err and "raise it to at least 50" in err
