"""Train the Video DC-AE: `cinedit tokenizer train PRESET_OR_RUN_DIR --section.field=value ...`.

Also `python -m cinedit.tokenizer.train ...` and `torchrun --nproc-per-node N -m cinedit.tokenizer.train ...`.
Phase 1 is L1 + LPIPS reconstruction; from `disc.start` on, a 3D PatchGAN adds an adaptively weighted hinge
loss (`cinedit.tokenizer.losses`). Each step trains on one bucketed batch of clips or of images (a share
`train.image_share` of the steps, or of the ranks when there are several). The run directory holds
`config.json`, `metrics.jsonl`, TensorBoard logs in `tb/`, checkpoints in `ckpt/step-NNNNNN/` (with a
`latest` pointer), held-out reconstructions in `samples/step_NNNNNNN/` (every `train.sample_every` steps) and, at
the end, the EMA model in `model/` (`load_pretrained` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cinedit.configs.core import ConfigError
from cinedit.configs.tokenizer import (
    TOKENIZER_RUN_CONTROL,
    TokenizerDataConfig,
    TokenizerModelConfig,
    TokenizerTrainConfig,
)
from cinedit.data.buckets import mix_seed, uniform
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta
from cinedit.data.sample import run_meta
from cinedit.data.sampler import BucketLoader, build_dataloader, build_sampler, warn_never_batched
from cinedit.data.video import frame_stride, num_sampled_frames
from cinedit.runtime import cli as runtime_cli
from cinedit.runtime.booster import Booster, build_booster
from cinedit.runtime.checkpoint import load_training, save_training
from cinedit.runtime.dist import DistInfo, all_gather_objects, all_reduce_sum, autocast
from cinedit.runtime.ema import EMA
from cinedit.runtime.logs import MetricsLogger
from cinedit.runtime.modelio import CONFIG_NAME, WEIGHTS_NAME
from cinedit.runtime.rng import seed_everything
from cinedit.runtime.training import TrainHooks, forever, run_training, samples_dir
from cinedit.tokenizer.commands import write_frames
from cinedit.tokenizer.loading import init_from_image_dcae, load_pretrained, save_pretrained
from cinedit.tokenizer.losses import (
    ReconstructionLoss,
    adaptive_weight,
    build_discriminator,
    build_reconstruction_loss,
    generator_adv_loss,
    hinge_d_loss,
    latent_moments,
    latent_regulariser,
    moments_std,
)
from cinedit.tokenizer.metrics import psnr
from cinedit.tokenizer.model import PRESETS as MODEL_PRESETS
from cinedit.tokenizer.model import VideoDCAE

KIND = "tokenizer"
SAMPLE_CLIPS = 2  # held-out clips reconstructed every `train.sample_every` steps
SAMPLE_FPS = 24.0  # clips are read at about 24 fps (`frame_stride`)


# ----------------------------------------------------------------------------------------------------------------------
# build


def build_model(cfg: TokenizerModelConfig) -> VideoDCAE:
    """A Video DC-AE from the preset, or initialised from `init_from` (see `TokenizerModelConfig`)."""
    cfg.validate()
    if not cfg.init_from:
        model = VideoDCAE(MODEL_PRESETS[cfg.preset]())
        if cfg.zero_init:
            model.zero_residual_branches()
        return model
    path = Path(cfg.init_from)
    if path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
        return load_pretrained(path)
    if path.is_file():
        return load_pretrained(path, config=MODEL_PRESETS[cfg.preset]())
    return init_from_image_dcae(cfg.init_from)


def channels_last(cfg: TokenizerTrainConfig, device: torch.device) -> bool:
    """Whether the run trains with NDHWC conv weights (`model.memory_format`; "auto": on CPU without ZeRO).

    On CPU oneDNN picks its channels-last kernels from the weight's layout, and their conv3d backward is the
    faster one (the `debug` model's 2 x 8 x 64 x 64 video step: 0.61 -> 0.45 s on 2 cores; the input's layout does
    not matter). ZeRO flattens every parameter with `view(-1)`, which a channels-last tensor refuses.
    """
    fmt, plugin = cfg.model.memory_format, cfg.parallel.resolve_plugin(device)
    zero = plugin in ("zero", "hybrid")
    if fmt == "channels_last" and zero:
        raise ConfigError(
            f"model.memory_format=channels_last does not work with the {plugin!r} plugin (ZeRO flattens weights with "
            "view(-1)); use model.memory_format=contiguous, or parallel.plugin=ddp"
        )
    if fmt == "auto":
        return device.type == "cpu" and not zero
    return fmt == "channels_last"


def to_channels_last(module: nn.Module) -> nn.Module:
    """Every 5-D parameter and buffer (conv3d weights) into the channels-last-3d layout, in place; values unchanged.
    Checkpoints and exports stay contiguous: every writer saves `.contiguous()` copies.

    Where both layouts are the same memory (1x1x1 kernels, depthwise weights) the gradients come back with strides
    that differ from the weight's in size-1 dims only; DDP compares strides exactly, copies (correctly) and warns
    that it may be slower, a warning this silences.
    """
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    for t in [*module.parameters(), *module.buffers()]:
        if t.dim() == 5:
            t.data = t.data.contiguous(memory_format=torch.channels_last_3d)
    return module


class TrainCrops(Dataset):
    """The tokenizer's training read of a `VideoDataset`: a square of its bucket's pixel count (a 32-multiple side)
    when `square`, and with `crop_scale` > 1 a random window of the bucket's size cut from the clip read up to
    `crop_scale` times larger; `flip` mirrors half the samples left-right.

    Scale, window and flip are drawn from the sample's seed (the sampler's), so a resumed run reads the same pixels.
    With crop_scale 1 and no flip the sample is the plain resize-to-fill and centre crop. With `square` the sampler
    buckets the samples by `square_meta`, the shapes they are read at.
    """

    def __init__(
        self,
        dataset: VideoDataset,
        multiple: int = 32,
        square: bool = True,
        crop_scale: float = 1.0,
        flip: bool = False,
    ):
        self.dataset, self.meta, self.multiple = dataset, dataset.meta, multiple
        self.square, self.crop_scale, self.flip = square, crop_scale, flip
        if square:
            self.meta = square_meta(dataset.meta)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> dict[str, Any]:
        index, t, h, w, *seed = item
        if self.square:
            h = w = max(self.multiple, round(math.sqrt(h * w) / self.multiple) * self.multiple)
        if self.crop_scale == 1 and not self.flip:
            return self.dataset[(index, t, h, w, *seed)]
        rng = np.random.default_rng(mix_seed(seed[0] if seed else index, 0xC407))
        scale = rng.uniform(1.0, self.crop_scale)
        big_h, big_w = max(h, round(h * scale)), max(w, round(w * scale))
        sample = self.dataset[(index, t, big_h, big_w, *seed)]
        y, x = int(rng.integers(big_h - h + 1)), int(rng.integers(big_w - w + 1))
        video = sample["video"][..., y : y + h, x : x + w]
        if self.flip and rng.random() < 0.5:
            video = video.flip(-1)
        return {**sample, "video": video.contiguous(), "height": h, "width": w}


def square_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """`meta` with every sample's height and width replaced by the side of the square of its pixel count: the shapes
    the sampler buckets square training reads by.

    Square reads make every aspect ratio of a resolution the same shape, so they share one bucket per frame count.
    Bucketed by their own aspect ratios, a sample alone in its ratio would never fill a batch and never be trained on
    (in the sample data the only colourful training clip, the one 16:9 video, was never read).
    """
    side = np.sqrt(meta["height"].to_numpy(np.float64) * meta["width"].to_numpy(np.float64)).round().astype(np.int64)
    return meta.assign(height=side, width=side)


def split_meta(meta: pd.DataFrame, cfg: TokenizerDataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out): a seeded share of the videos long enough for the eval clip; images always train."""
    is_video = meta["num_frames"].to_numpy() > 1
    strides = [cfg.frame_stride or frame_stride(float(f)) for f in meta["fps"]]
    long_enough = np.array(
        [num_sampled_frames(int(n), s) >= cfg.eval_frames for n, s in zip(meta["num_frames"], strides)]
    )
    candidates = np.flatnonzero(is_video & long_enough)
    n_val = min(cfg.val_max, round(cfg.val_fraction * int(is_video.sum()))) if cfg.val_fraction > 0 else 0
    if cfg.val_fraction > 0:
        n_val = max(1, n_val)
    rng = np.random.default_rng(mix_seed(cfg.seed, 0xE7A1))
    held = np.sort(rng.permutation(candidates)[:n_val])
    mask = np.zeros(len(meta), dtype=bool)
    mask[held] = True
    return meta[~mask].reset_index(drop=True), meta[mask].reset_index(drop=True)


@dataclass
class TrainData:
    """The loaders of this rank (video and/or image) and its shard of held-out clips."""

    video: BucketLoader | None
    image: BucketLoader | None
    heldout: list[torch.Tensor]  # (3, T, H, W) clips in [-1, 1]
    num_heldout: int  # over all ranks
    image_ranks: int  # ranks that train on images (several ranks only)


def build_data(cfg: TokenizerTrainConfig, info: DistInfo) -> TrainData:
    """Split the metadata, and build this rank's loaders and held-out shard.

    One process trains on both loaders (a seeded draw per step picks one); with several ranks, the first
    round(image_share * world) ranks take images and the others videos, each group splitting its own data.
    """
    dcfg = cfg.data
    meta = read_meta(run_meta(cfg.data.meta, cfg.train.out_dir, cfg.train.progress))
    train_meta, held_meta = split_meta(meta, dcfg)
    is_img = train_meta["num_frames"].to_numpy() == 1
    img_meta = train_meta[is_img].reset_index(drop=True)
    vid_meta = train_meta[~is_img].reset_index(drop=True)
    if vid_meta.empty:
        raise ValueError(f"{dcfg.meta or 'the sample data'}: no training videos left after holding out clips")
    share = cfg.train.image_share if len(img_meta) else 0.0
    n_img = min(info.world_size - 1, round(share * info.world_size)) if info.world_size > 1 else 0

    def loader(m: pd.DataFrame, rank: int, size: int) -> BucketLoader:
        ds: Dataset = VideoDataset(m, dcfg, replace_bad=True)  # a bad file must not end the run
        if dcfg.square or dcfg.crop_scale > 1 or dcfg.flip:
            ds = TrainCrops(ds, dcfg.buckets.multiple, dcfg.square, dcfg.crop_scale, dcfg.flip)
        sampler = build_sampler(ds, dcfg, rank, size)
        if len(sampler) == 0:
            raise ValueError(
                f"{len(m)} samples give no full batch with buckets {dcfg.buckets.table}: lower the batch sizes"
            )
        if rank == 0:
            warn_never_batched(sampler, "training image" if m is img_meta else "training video")
        return build_dataloader(ds, sampler, dcfg.num_workers, dcfg.prefetch_factor)

    if info.world_size == 1:
        video = loader(vid_meta, 0, 1)
        image = loader(img_meta, 0, 1) if share > 0 else None
    elif info.rank < n_img:
        video, image = None, loader(img_meta, info.rank, n_img)
    else:
        video, image = loader(vid_meta, info.rank - n_img, info.world_size - n_img), None

    held_ds = VideoDataset(held_meta, dcfg)
    heldout = [
        held_ds[(i, dcfg.eval_frames, dcfg.eval_size, dcfg.eval_size, mix_seed(dcfg.seed, i))]["video"]
        for i in range(info.rank, len(held_meta), info.world_size)
    ]
    return TrainData(video=video, image=image, heldout=heldout, num_heldout=len(held_meta), image_ranks=n_img)


@dataclass(kw_only=True)
class Trainer:
    """Everything a step touches (built with keywords)."""

    cfg: TokenizerTrainConfig
    info: DistInfo
    model: nn.Module  # boosted
    optimizer: Any
    booster: Booster
    ema: EMA
    loss_fn: ReconstructionLoss
    data: TrainData
    disc: nn.Module | None = None  # boosted
    disc_optimizer: Any = None
    disc_booster: Booster | None = None
    step: int = 0

    @property
    def module(self) -> VideoDCAE:
        return self.booster.unwrap(self.model)

    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive weight compares gradients."""
        return self.module.decoder.project_out.op_list[-1].conv.weight


def build_optimizer(params: Any, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8):
    # foreach: the same update bit for bit as torch's CPU default (a loop over the tensors), its step 1.5x faster on CPU
    # (the debug DC-AE: 49 against 75 ms on a loaded 2-core machine).
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=True)


def build_trainer(cfg: TokenizerTrainConfig, info: DistInfo) -> Trainer:
    """Model, EMA, loss (fails early without LPIPS weights), discriminator, optimizers, boosters and data."""
    seed_everything(cfg.train.seed)
    loss_fn = build_reconstruction_loss(cfg.loss).to(info.device)
    model = build_model(cfg.model)
    last = channels_last(cfg, info.device)
    if last:  # before the EMA copy, which takes the layout along
        to_channels_last(model)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup)
    if cfg.model.compile:  # after the EMA copy, which stays eager
        model.compile_blocks()
    ema.module.to(info.device)
    o = cfg.optim
    booster = build_booster(cfg.parallel, info)
    optimizer = build_optimizer(model.parameters(), o.lr, o.betas, o.weight_decay, o.eps)
    model, optimizer = booster.boost(model, optimizer)
    tr = Trainer(
        cfg=cfg,
        info=info,
        model=model,
        optimizer=optimizer,
        booster=booster,
        ema=ema,
        loss_fn=loss_fn,
        data=build_data(cfg, info),
    )
    if cfg.disc.enabled:
        d = cfg.disc
        disc = build_discriminator(d)
        if last:
            to_channels_last(disc)
        plugin = cfg.parallel.resolve_plugin(info.device)
        if plugin == "ddp" and info.device.type == "cpu":
            # ColossalAI's TorchDDPPlugin turns BatchNorm into SyncBatchNorm, which DDP refuses on CPU modules; the
            # discriminator (BatchNorm3d) takes the plain torch path there, the autoencoder still the booster.
            plugin = "torch"
        tr.disc_booster = build_booster(dataclasses.replace(cfg.parallel, plugin=plugin, grad_clip=0.0), info)
        disc_opt = build_optimizer(disc.parameters(), d.lr, d.betas, d.weight_decay)
        tr.disc, tr.disc_optimizer = tr.disc_booster.boost(disc, disc_opt)
    return tr


# ----------------------------------------------------------------------------------------------------------------------
# step and evaluation


def image_step(seed: int, step: int, image_share: float) -> bool:
    """The seeded draw of a one-process run: whether `step` of a run with `train.seed` `seed` takes an image batch
    (when it has images). Pure, so a caller can tell a run's image steps from its seed and share alone."""
    return bool(uniform(seed, step, 0x1A6E)[0] < image_share)


def uses_images(tr: Trainer, step: int) -> bool:
    """Whether `step` trains on an image batch on this rank (a seeded draw per step with one process)."""
    if tr.info.world_size > 1:
        return tr.info.rank < tr.data.image_ranks
    if tr.data.image is None:
        return False
    return image_step(tr.cfg.train.seed, step, tr.cfg.train.image_share)


@contextmanager
def capture_latents(model: VideoDCAE) -> Iterator[list[torch.Tensor]]:
    """The encoder outputs (with their graphs) of the forwards run inside the block, through a forward hook: the
    latents of `tr.model(x)` without a second encode, whatever wraps the model (DDP, ZeRO, compiled stages)."""
    latents: list[torch.Tensor] = []
    handle = model.encoder.register_forward_hook(lambda _m, _i, z: latents.append(z))
    try:
        yield latents
    finally:
        handle.remove()


def train_step(tr: Trainer, batch: dict[str, Any], step: int) -> dict[str, float]:
    """One generator update (and one discriminator update in the adversarial phase); returns scalars to log."""
    cfg, dev = tr.cfg, tr.info.device
    x = batch["video"].to(dev, non_blocking=True)
    adversarial = tr.disc is not None and step >= cfg.disc.start
    tr.model.train()
    with capture_latents(tr.module) as latents, autocast(dev, cfg.parallel.precision):
        rec = tr.model(x)
    z = latents[-1]
    nll, parts = tr.loss_fn(x, rec)
    out = {f"loss/{k}": float(v) for k, v in parts.items()}
    # The training batch's latent statistics (all images or all videos: `images` says which).
    mean, std = moments_std(*latent_moments(z))
    out.update({"latent/mean": mean, "latent/std": std})
    loss = nll
    if cfg.loss.latent_weight > 0:
        reg = latent_regulariser(z, cfg.loss.latent_weight)
        out["loss/latent"] = float(reg.detach())
        loss = loss + reg
    if adversarial:
        # The generator's pass goes through the bare discriminator with frozen weights: no gradient for it here,
        # and no DDP forward without a matching backward.
        disc = tr.disc_booster.unwrap(tr.disc)
        disc.requires_grad_(False)
        with autocast(dev, cfg.parallel.precision):
            logits_fake = disc(rec)
        g_loss = generator_adv_loss(logits_fake.float())
        weight = adaptive_weight(nll, g_loss, tr.last_layer(), cfg.disc.max_adaptive) * cfg.disc.weight
        loss = loss + weight * g_loss
        out.update({"loss/g_adv": float(g_loss.detach()), "adaptive_weight": float(weight)})
        disc.requires_grad_(True)
    out["loss/total"] = float(loss.detach())
    lr = cfg.optim.lr_at(step, cfg.train.steps)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    tr.booster.backward(loss, tr.optimizer)
    out["grad_norm"] = tr.booster.step(tr.model, tr.optimizer, cfg.parallel.grad_clip)
    tr.ema.update(tr.module)
    if adversarial:
        # Real and fake in one forward: one backward per DDP forward, and BatchNorm sees both in its statistics.
        with autocast(dev, cfg.parallel.precision):
            logits = tr.disc(torch.cat([x, rec.detach()]))
        real, fake = logits.float().chunk(2)
        d_loss = hinge_d_loss(real, fake)
        tr.disc_booster.backward(d_loss, tr.disc_optimizer)
        out["disc_grad_norm"] = tr.disc_booster.step(tr.disc, tr.disc_optimizer, 0.0)
        out.update(
            {
                "loss/disc": float(d_loss.detach()),
                "disc/logits_real": float(real.mean().detach()),
                "disc/logits_fake": float(fake.mean().detach()),
            }
        )
    out["lr"] = tr.optimizer.param_groups[0]["lr"]
    out["images"] = float(x.shape[2] == 1)
    return out


@torch.no_grad()
def evaluate(tr: Trainer) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean L1 and PSNR (`cinedit.tokenizer.metrics.psnr`) of EMA reconstructions (`model(x)`) of the held-out
    clips, and, for a tokenizer, the statistics of their latents: `latent/{mean,std}_video` of the clips,
    `latent/{mean,std}_image` of their middle frames encoded as images, and `latent/std_ratio` = std_video /
    std_image (one scaling factor serves both only when it is near 1).

    Returns the metrics over all ranks and, on the main rank, one (3, H, 2W) image: a middle frame and its
    reconstruction side by side.
    """
    model, dev, bs = tr.ema.module, tr.info.device, tr.cfg.data.eval_batch
    l1_sum, psnr_sum, n = 0.0, 0.0, 0
    moments = {"video": [0.0, 0.0, 0.0], "image": [0.0, 0.0, 0.0]}
    preview = None
    for i in range(0, len(tr.data.heldout), bs):
        x = torch.stack(tr.data.heldout[i : i + bs]).to(dev)
        t = x.shape[2] // 2
        z = z_image = None
        with autocast(dev, tr.cfg.parallel.precision):
            if hasattr(model, "encoder"):  # a tokenizer: its latents come along (a bare reconstruction has none)
                with capture_latents(model) as latents:
                    rec = model(x)
                z = latents[-1]
                z_image = model.encode(x[:, :, t : t + 1]) if x.shape[2] > 1 else z
            else:
                rec = model(x)
        for kind, lat in (("video", z if x.shape[2] > 1 else None), ("image", z_image)):
            if lat is not None:
                moments[kind] = [a + b for a, b in zip(moments[kind], latent_moments(lat))]
        rec = rec.float().clamp(-1, 1)
        l1_sum += float((rec - x).abs().mean(dim=(1, 2, 3, 4)).sum())
        psnr_sum += float(psnr(rec, x).sum())  # inf when a clip comes back exactly, as in `cinedit eval recon`
        n += x.shape[0]
        if preview is None:
            preview = (torch.cat([x[0, :, t], rec[0, :, t]], dim=-1) + 1) / 2
    l1_sum, psnr_sum, n, *sums = all_reduce_sum([l1_sum, psnr_sum, float(n), *moments["video"], *moments["image"]], dev)
    if n == 0:
        return {}, None
    metrics = {"val/l1": l1_sum / n, "val/psnr": psnr_sum / n}
    for kind, kind_sums in (("video", sums[:3]), ("image", sums[3:])):
        if kind_sums[0] > 0:
            metrics[f"latent/mean_{kind}"], metrics[f"latent/std_{kind}"] = moments_std(*kind_sums)
    if metrics.get("latent/std_image", 0) > 0 and "latent/std_video" in metrics:
        metrics["latent/std_ratio"] = metrics["latent/std_video"] / metrics["latent/std_image"]
    return metrics, preview


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_parts(tr: Trainer) -> dict[str, tuple[Any, nn.Module, Any]]:
    parts = {"generator": (tr.booster, tr.model, tr.optimizer)}
    if tr.disc is not None:
        parts["disc"] = (tr.disc_booster, tr.disc, tr.disc_optimizer)
    return parts


def save(tr: Trainer, run_dir: Path) -> Path:
    """An atomic checkpoint of everything needed to continue exactly (see `save_training`)."""
    states = all_gather_objects(
        {
            "video": tr.data.video.state_dict() if tr.data.video else None,
            "image": tr.data.image.state_dict() if tr.data.image else None,
        }
    )
    loaders = {k: next((s[k] for s in states if s[k] is not None), None) for k in ("video", "image")}
    return save_training(
        run_dir, tr.step, tr.info, checkpoint_parts(tr), tr.ema, {"loaders": loaders}, tr.cfg.train.keep_checkpoints
    )


def load(tr: Trainer, path: Path) -> None:
    """Continue from a checkpoint folder written by `save` (one without a discriminator too)."""
    doc = load_training(path, tr.info, checkpoint_parts(tr), tr.ema)
    for name in ("video", "image"):
        loader, state = getattr(tr.data, name), doc["loaders"].get(name)
        if loader is not None and state is not None:
            loader.load_state_dict(state)
    tr.step = int(doc["step"])


# ----------------------------------------------------------------------------------------------------------------------
# run directory and main loop


def batches(tr: Trainer):
    """next_batch(step): an image batch on image steps, a video batch otherwise (loaders resume where they were)."""
    video = forever(tr.data.video) if tr.data.video is not None else None
    image = forever(tr.data.image) if tr.data.image is not None else None
    return lambda step: next(image if uses_images(tr, step) else video)


def evaluate_and_preview(tr: Trainer) -> dict[str, Any]:
    metrics, preview = evaluate(tr)
    if preview is not None and tr.cfg.train.log_images > 0:
        metrics["val/reconstruction"] = preview
    return metrics


@torch.no_grad()
def sample_reconstructions(tr: Trainer, logger: MetricsLogger) -> None:
    """EMA reconstructions of the main rank's first `SAMPLE_CLIPS` held-out clips (the same clips all run), each
    beside its clip: `samples_dir(out_dir, step)/<index>_heldout.mp4` and a TensorBoard video `samples/<index>_heldout`.
    The other ranks wait at the loop's barrier (every rank holds the full EMA model)."""
    if not tr.info.is_main:
        return
    model, dev = tr.ema.module, tr.info.device
    out = samples_dir(tr.cfg.train.out_dir, tr.step)
    for i, x in enumerate(tr.data.heldout[:SAMPLE_CLIPS]):
        with autocast(dev, tr.cfg.parallel.precision):
            rec = model(x[None].to(dev))
        pair = torch.cat([x, rec[0].float().cpu().clamp(-1, 1)], dim=-1)  # (3, T, H, 2W): clip | reconstruction
        path = write_frames(out / f"{i:04d}_heldout.mp4", pair, SAMPLE_FPS)
        logger.video(f"samples/{path.stem}", (pair.transpose(0, 1) + 1) / 2, tr.step, SAMPLE_FPS)


def export(tr: Trainer, out_dir: Path) -> None:
    save_pretrained(tr.ema.module, out_dir)


# Lambdas look the functions up at call time, so a test can monkeypatch `train_step` or `save`.
HOOKS = TrainHooks(
    kind=KIND,
    run_control=TOKENIZER_RUN_CONTROL,
    build=lambda cfg, info: build_trainer(cfg, info),
    batches=batches,
    train_step=lambda tr, batch, step: train_step(tr, batch, step),
    evaluate=evaluate_and_preview,
    save=lambda tr, run_dir: save(tr, run_dir),
    load=lambda tr, path: load(tr, path),
    export=export,
    sample=lambda tr, logger: sample_reconstructions(tr, logger),
    loss_key="loss/total",
)


def fit(cfg: TokenizerTrainConfig, preset_name: str | None = None) -> dict[str, float]:
    """Run (or continue) training; returns the last logged scalars and the final held-out metrics."""
    return run_training(cfg, HOOKS, preset_name)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cinedit tokenizer train`."""
    return runtime_cli.add_train_cli(
        subparsers, KIND, fit, "train a Video DC-AE (L1 + LPIPS, then a 3D PatchGAN phase)", "Train a Video DC-AE."
    )


def main(argv: list[str] | None = None) -> int:
    return runtime_cli.train_main(KIND, add_cli, argv)


__all__ = [
    "Trainer",
    "build_data",
    "build_model",
    "build_trainer",
    "evaluate",
    "fit",
    "main",
    "sample_reconstructions",
    "split_meta",
    "train_step",
]


if __name__ == "__main__":
    sys.exit(main())
