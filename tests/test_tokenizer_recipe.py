"""The tokenizer recipe's parts that make a small run learn: random training windows and flips (`TrainCrops`), square
reads bucketed together (`square_meta`), the squared-error term, and the zero-initialised residual branches of the
Video DC-AE."""

from __future__ import annotations

import pytest
import torch

from cinedit.configs import ConfigError
from cinedit.configs.tokenizer import TokenizerDataConfig, TokenizerModelConfig, debug, f32t4c128
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta
from cinedit.runtime.dist import DistInfo
from cinedit.tokenizer.losses import ReconstructionLoss
from cinedit.tokenizer.model import DCAEConfig, EfficientViTBlock, ResBlock, Residual, VideoDCAE
from cinedit.tokenizer.model import debug as debug_model
from cinedit.tokenizer.model import demo as demo_model
from cinedit.tokenizer.train import TrainCrops, build_data, build_model, square_meta

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dataset(sample_data):
    df = read_meta(sample_data[1])
    videos = df[df["num_frames"] > 1].reset_index(drop=True).iloc[:1]
    return VideoDataset(videos, TokenizerDataConfig(meta=str(sample_data[1])))


def test_plain_read_is_unchanged_without_scale_or_flip(clip_dataset):
    crops = TrainCrops(clip_dataset, 32, square=True)
    got = crops[(0, 4, 64, 64, 7)]["video"]
    assert torch.equal(got, clip_dataset[(0, 4, 64, 64, 7)]["video"])
    # square: a 32x128 bucket reads as the 64x64 square of the same pixel count
    assert crops[(0, 4, 32, 128, 7)]["video"].shape == (3, 4, 64, 64)


def test_random_windows_are_seeded_distinct_and_of_the_bucket_size(clip_dataset):
    crops = TrainCrops(clip_dataset, 32, square=True, crop_scale=2.0)
    plain = clip_dataset[(0, 4, 64, 64, 7)]["video"]
    reads = [crops[(0, 4, 64, 64, seed)] for seed in range(6)]
    assert all(r["video"].shape == (3, 4, 64, 64) and (r["height"], r["width"]) == (64, 64) for r in reads)
    assert torch.equal(crops[(0, 4, 64, 64, 3)]["video"], reads[3]["video"])  # same seed, same pixels
    videos = [r["video"] for r in reads]
    assert all(not torch.equal(a, b) for i, a in enumerate(videos) for b in videos[i + 1 :])
    # a zoomed-in window is not the whole frame resized: it differs from the plain read for most seeds
    assert sum(not torch.allclose(v, plain, atol=0.05) for v in videos) >= 4


def test_flip_mirrors_about_half_of_the_samples(clip_dataset):
    crops = TrainCrops(clip_dataset, 32, square=True, flip=True)
    flipped = 0
    for seed in range(16):
        got, plain = crops[(0, 4, 64, 64, seed)]["video"], clip_dataset[(0, 4, 64, 64, seed)]["video"]
        assert torch.equal(got, plain) or torch.equal(got, plain.flip(-1))
        flipped += torch.equal(got, plain.flip(-1)) and not torch.equal(got, plain)
    assert 3 <= flipped <= 13


def test_square_training_buckets_every_aspect_ratio_together(sample_data, tmp_path):
    """Square reads share one bucket per frame count whatever the clip's aspect ratio: every training clip is read.
    Bucketed by aspect ratio, the sample data's one 16:9 training clip sat alone in its bucket, never filled a batch of
    2 and was never trained on."""
    cfg = debug()
    cfg.data.meta, cfg.data.decode_cache_mb, cfg.train.out_dir = str(sample_data[1]), 0, str(tmp_path)
    data = build_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    meta = data.video.loader.dataset.dataset.meta
    ratios = {round(h / w, 2) for h, w in zip(meta["height"], meta["width"])}
    assert len(meta) == 7 and len(ratios) >= 3  # training clips of several aspect ratios
    assert square_meta(meta)["height"].tolist() == square_meta(meta)["width"].tolist()
    seen, shapes = set(), set()
    for epoch in range(12):
        data.video.sampler.set_epoch(epoch)
        for batch in data.video.sampler:
            seen.update(item[0] for item in batch)
            shapes.update(tuple(item[1:4]) for item in batch)
    assert seen == set(range(len(meta))), f"never read: {sorted(set(meta['path'][i] for i in set(range(7)) - seen))}"
    assert shapes == {(8, 64, 64)}
    assert len(data.video) == 3  # 7 clips, batches of 2: one bucket, three full batches an epoch


def test_crop_scale_is_validated_and_off_in_the_release_recipe():
    with pytest.raises(ConfigError, match="crop_scale"):
        TokenizerDataConfig(crop_scale=0.5).validate()
    release, small = f32t4c128(), debug()
    assert release.data.crop_scale == 1.0 and not release.data.flip and release.loss.mse_weight == 0.0
    assert small.data.crop_scale > 1 and small.data.flip and small.loss.mse_weight > 0


def test_squared_error_term_adds_to_l1():
    x, rec = torch.rand(1, 3, 4, 8, 8) * 2 - 1, torch.rand(1, 3, 4, 8, 8) * 2 - 1
    l1_only, _ = ReconstructionLoss(1.0)(x, rec)
    both, parts = ReconstructionLoss(1.0, mse_weight=0.5)(x, rec)
    assert parts["mse"].item() == pytest.approx((x - rec).square().mean().item(), rel=1e-6)
    assert both.item() == pytest.approx(l1_only.item() + 0.5 * parts["mse"].item(), rel=1e-6)


def test_demo_model_is_debug_with_narrow_full_resolution_stages():
    demo, small = demo_model(), debug_model()
    demo.validate()
    assert demo.encoder_width_list == demo.decoder_width_list == [4, 8, *small.encoder_width_list[2:]]
    assert (demo.spatial_compression, demo.temporal_compression) == (small.spatial_compression, 4) == (32, 4)
    assert demo.latent_channels == small.latent_channels and demo.encoder_block_types == small.encoder_block_types
    x = torch.rand(1, 3, 8, 64, 64) * 2 - 1
    with torch.no_grad():
        assert VideoDCAE(demo).encode(x).shape == VideoDCAE(small).encode(x).shape == (1, 16, 2, 2, 2)


def test_untrained_blocks_are_the_identity():
    """A model the trainer builds from scratch has every residual branch at zero: replacing each block by the
    identity leaves its output unchanged (the convolutions and the parameter-free shortcuts alone)."""
    torch.manual_seed(0)
    model = build_model(TokenizerModelConfig(preset="debug")).eval()
    plain = VideoDCAE(debug_model())  # built directly: the seeded random codec, branches not zeroed
    assert all(p.detach().any() for n, p in plain.named_parameters() if n.endswith("norm.weight"))
    x = torch.rand(1, 3, 8, 64, 64) * 2 - 1
    replaced = 0
    with torch.no_grad():
        want = model(x)
        for side in (model.encoder, model.decoder):
            for stage in side.stages:
                ops = stage.op_list
                for i, op in enumerate(ops):
                    if isinstance(op, EfficientViTBlock) or (
                        isinstance(op, Residual) and isinstance(op.main, ResBlock)
                    ):
                        ops[i], replaced = torch.nn.Identity(), replaced + 1
        got = model(x)
    assert replaced == 12 and torch.equal(got, want)
    assert DCAEConfig().scaling_factor == 0.493  # the release architecture is untouched


def test_lr_schedule_warms_up_then_decays():
    from cinedit.configs.tokenizer import TokenizerOptimConfig

    flat = TokenizerOptimConfig(lr=1e-3)
    assert [flat.lr_at(s, 100) for s in (1, 50, 100)] == [1e-3] * 3
    cos = TokenizerOptimConfig(lr=1e-3, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert cos.lr_at(1, 100) == pytest.approx(1e-4) and cos.lr_at(10, 100) == pytest.approx(1e-3)
    assert cos.lr_at(55, 100) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert cos.lr_at(100, 100) == pytest.approx(1e-4)
    lrs = [cos.lr_at(s, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    for bad in (dict(decay="linear"), dict(warmup_steps=-1), dict(min_lr_ratio=2.0)):
        with pytest.raises(ConfigError):
            TokenizerOptimConfig(**bad).validate()


def test_trainer_logs_the_scheduled_lr(sample_data, tmp_path):
    from cinedit.runtime.logs import read_metrics
    from cinedit.tokenizer import train as train_mod

    out = tmp_path / "run"
    argv = ["debug", f"--data.meta={sample_data[1]}", f"--train.out_dir={out}", "--train.progress=false"]
    argv += ["--train.steps=4", "--train.eval_every=0", "--train.sample_every=0", "--train.ckpt_every=0"]
    argv += ["--optim.warmup_steps=2", "--optim.decay=cosine", "--optim.lr=1e-3", "--disc.start=-1"]
    assert train_mod.main(argv) == 0
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    assert lrs == pytest.approx([5e-4, 1e-3, 5e-4, 0.0], abs=1e-12)


def test_memory_format_auto_is_channels_last_on_cpu_only_and_refused_with_zero():
    from cinedit.configs.presets import config_from_argv
    from cinedit.tokenizer.train import channels_last

    def cfg(*extra):
        return config_from_argv("tokenizer", ["debug", *extra])[0]

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # devices as values: nothing runs on them
    assert channels_last(cfg(), cpu) and not channels_last(cfg(), cuda)  # auto: cuda resolves to ZeRO
    assert not channels_last(cfg("--model.memory_format=contiguous"), cpu)
    assert channels_last(cfg("--model.memory_format=channels_last", "--parallel.plugin=ddp"), cuda)
    with pytest.raises(ConfigError, match="view"):
        channels_last(cfg("--model.memory_format=channels_last"), cuda)
    with pytest.raises(ConfigError, match="memory_format"):
        cfg("--model.memory_format=nhwc").validate()


def test_cpu_trainer_holds_channels_last_weights_with_the_same_values(sample_data, tmp_path):
    from cinedit.configs.presets import config_from_argv
    from cinedit.runtime.dist import init_distributed
    from cinedit.tokenizer import train as train_mod

    info = init_distributed("cpu")
    trainers = {}
    for fmt in ("auto", "contiguous"):
        argv = ["debug", f"--data.meta={sample_data[1]}", f"--train.out_dir={tmp_path / fmt}", "--disc.start=2"]
        cfg = config_from_argv("tokenizer", [*argv, f"--model.memory_format={fmt}"])[0]
        trainers[fmt] = train_mod.build_trainer(cfg, info)
    nets = {
        fmt: [tr.booster.unwrap(tr.model), tr.ema.module, tr.disc_booster.unwrap(tr.disc)]
        for fmt, tr in trainers.items()
    }
    for last, plain in zip(nets["auto"], nets["contiguous"]):
        # (1x1x1 kernels and depthwise weights are both layouts at once)
        weights = {k: v for k, v in last.state_dict().items() if v.dim() == 5 and v.shape[1] > 1 and v.shape[-1] > 1}
        assert weights and all(
            v.is_contiguous(memory_format=torch.channels_last_3d) and not v.is_contiguous() for v in weights.values()
        )
        assert all(v.is_contiguous() for v in plain.state_dict().values())
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in last.state_dict().items())
    x = torch.rand(1, 3, 8, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = nets["auto"][0](x), nets["contiguous"][0](x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
