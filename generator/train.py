"""Train the MMDiT generator: `cinedit generator train STAGE_OR_RUN_DIR --section.field=value ...`.

Also `python -m cinedit.generator.train ...`, under torchrun or `colossalai run` (`scripts/stage*.sh`). Each step
takes one bucketed batch of clips or images, encodes it with the frozen tokenizer (or reads cached latents,
`--data.use_cache=true`), embeds the captions with the frozen text encoder (or reads them from the cache), drops
captions to the empty prompt, draws a visual condition per sample (t2v / i2v / inpainting) and regresses the
rectified-flow velocity (`cinedit.generator.flow`). The run directory holds `config.json`, `metrics.jsonl`,
TensorBoard logs in `tb/`, checkpoints in `ckpt/step-NNNNNN/` (with a `latest` pointer) and, at the end, the
generation pipeline in `model/` (`cinedit generator sample --ckpt <out_dir>/model`, or `load_pipeline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cinedit import runtime
from cinedit.configs import (
    BucketConfig,
    ConfigError,
    DataConfig,
    LoopConfig,
    preset,
    stage1_buckets,
    stage3_buckets,
)
from cinedit.configs import EMAConfig as BaseEMAConfig
from cinedit.data.buckets import mix_seed
from cinedit.data.cache_cmd import DEBUG_TOKENIZER, load_tokenizer, read_empty_text, text_identity, tokenizer_hash
from cinedit.data.dataset import CachedLatentDataset, VideoDataset
from cinedit.data.meta import read_meta
from cinedit.data.sampler import BucketLoader, build_dataloader, build_sampler
from cinedit.generator.conditions import COND_TYPES, STAGE1_I2V_WEIGHTS, ConditionMix
from cinedit.generator.flow import (
    CAPTION_DROPOUT,
    caption_dropout,
    flow_loss,
    interpolate,
    sample_timesteps,
    token_count,
    velocity_target,
)
from cinedit.generator.math import make_ids, make_txt_ids, pack
from cinedit.generator.model import PRESETS as MODEL_PRESETS
from cinedit.generator.model import MMDiT, MMDiTConfig
from cinedit.generator.parallel import ContextParallel, apply_activation_checkpointing
from cinedit.generator.sampler import SamplerConfig
from cinedit.generator.text import PRESETS as TEXT_PRESETS
from cinedit.generator.text import TextEncoder, TextEncoderConfig
from cinedit.parallel import Booster, ParallelConfig, build_booster
from cinedit.tokenizer.tiling import chunked_latents

KIND = "generator"
SAMPLE_DATA = runtime.SAMPLE_DATA
# Fields a resumed run may change without becoming a different run.
RUN_CONTROL = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.overwrite",
    "train.progress",
    "data.num_workers",
    "data.prefetch_factor",
)
EVAL_TIMESTEPS = (0.25, 0.5, 0.75)


# ----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    """Which MMDiT to train and what to start from; 0 widths are derived from the tokenizer and text encoder."""

    preset: str = "11b-dcae"  # a cinedit.generator.PRESETS name
    patch_size: int = 0  # 0: the preset's
    in_channels: int = 0  # packed token width; 0: tokenizer latent channels * patch_size**2
    context_in_dim: int = 0  # 0: the text encoder's txt width (4096 for T5-XXL, 384 for MiniLM)
    vec_in_dim: int = 0  # 0: the text encoder's vec width (768 for CLIP-L, 384 for MiniLM)
    # Activation checkpointing of the first n double / single blocks (-1: all of them).
    grad_ckpt_double: int = 0
    grad_ckpt_single: int = 0
    # Keep the checkpointed blocks' inputs in (pinned) CPU memory between forward and backward.
    grad_ckpt_offload: bool = False
    # "" (random init), our model folder (a previous stage's `<out_dir>/model/generator` or the whole
    # `<out_dir>/model` pipeline folder), or the release's single MMDiT .safetensors file.
    init_from: str = ""

    def validate(self) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(MODEL_PRESETS)}, got {self.preset!r}")
        if self.patch_size not in (0, 1, 2):
            raise ConfigError(f"model.patch_size must be 0 (the preset's), 1 or 2, got {self.patch_size}")
        for name in ("in_channels", "context_in_dim", "vec_in_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0: derived), got {getattr(self, name)}")
        for name in ("grad_ckpt_double", "grad_ckpt_single"):
            if getattr(self, name) < -1:
                raise ConfigError(f"model.{name} must be >= -1 (-1: every block), got {getattr(self, name)}")


@dataclass
class TokenizerConfig:
    """The frozen Video DC-AE whose latents the generator learns.

    `path`: a model folder (`save_pretrained`, a tokenizer run's `model/`) or the release's single .safetensors
    file; or `debug`: the debug preset with RANDOM (seeded) weights, for smoke runs and tests only.
    """

    path: str = ""
    # Encode clips longer than this many frames in overlapping temporal chunks (`tiling.frame_chunks`), so a
    # 128-frame 768px clip fits next to the MMDiT; 0 encodes whole clips.
    chunk_frames: int = 0

    def validate(self) -> None:
        if self.chunk_frames and (self.chunk_frames < 4 or self.chunk_frames % 4):
            raise ConfigError(f"tokenizer.chunk_frames must be 0 or a multiple of 4, got {self.chunk_frames}")


@dataclass
class GeneratorDataConfig(DataConfig):
    """Training data: decoded video (`meta`), or a `cinedit data cache` folder (`use_cache` and `cache_dir`)."""

    use_cache: bool = False
    text_cache_dir: str = ""  # text embeddings in another cache under the same keys ("" = in cache_dir)

    def validate(self) -> None:
        super().validate()
        if self.use_cache and not self.cache_dir:
            raise ConfigError("data.use_cache=true needs data.cache_dir (a folder written by `cinedit data cache`)")


@dataclass
class FlowConfig:
    """Rectified-flow training: caption dropout, the visual-condition mix and where the loss is taken."""

    caption_dropout: float = CAPTION_DROPOUT  # T5 and CLIP each replaced by the empty prompt, independently
    # Condition type -> weight (t2v, i2v_head, i2v_tail, i2v_loop); normalised to the non-inpainting share.
    conditions: dict[str, float] = field(default_factory=lambda: {"t2v": 1.0})
    # Share of samples with a random inpainting mask (ours; not in the release): half a box hole in every frame,
    # half a kept run of latent frames (`random_inpaint_mask`).
    inpaint_share: float = 0.0
    # False (ours): the loss covers only the region the model generates (`Condition.loss_mask`); the given
    # region is written back after sampling, so its prediction is never used. True: every token, as the
    # reference does for i2v.
    loss_on_given: bool = False

    def validate(self) -> None:
        if not 0 <= self.caption_dropout <= 1:
            raise ConfigError(f"flow.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0 <= self.inpaint_share < 1:
            raise ConfigError(f"flow.inpaint_share must be in [0, 1), got {self.inpaint_share}")
        allowed = [c for c in COND_TYPES if c != "inpaint"]
        unknown = sorted(set(self.conditions) - set(allowed))
        if unknown:
            raise ConfigError(
                f"flow.conditions: unknown types {unknown}; use {allowed} (inpainting is flow.inpaint_share)"
            )
        if min(self.conditions.values(), default=-1) < 0 or sum(self.conditions.values()) <= 0:
            raise ConfigError(f"flow.conditions needs non-negative weights with a positive sum, got {self.conditions}")

    def mix(self) -> ConditionMix:
        """The condition mix with inpainting folded in at its share."""
        total = sum(self.conditions.values())
        weights = {k: (1 - self.inpaint_share) * w / total for k, w in self.conditions.items() if w > 0}
        if self.inpaint_share > 0:
            weights["inpaint"] = self.inpaint_share
        return ConditionMix(weights)


@dataclass
class OptimConfig:
    """AdamW for the MMDiT (DESIGN.md: eps 1e-15, no weight decay, grad clip 1)."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-15
    weight_decay: float = 0.0  # gradient clipping is parallel.grad_clip (ZeRO clips inside its step)


@dataclass
class EMAConfig(BaseEMAConfig):
    """An fp32 EMA copy of the weights on every rank (off in the stage presets: 44 GB more for the 11B model)."""

    enabled: bool = False


@dataclass
class TrainConfig(LoopConfig):
    """The loop (`LoopConfig`), with fixed evaluation batches and the pipeline's frame rate."""

    eval_every: int = 1000  # flow loss of fixed batches at fixed t and noise (0: never)
    eval_batches: int = 4
    out_dir: str = "runs/generator"
    fps: float = 24.0  # frame rate written into the pipeline (clips are read at about 24 fps)

    def validate(self) -> None:
        super().validate()
        if self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches must be >= 1, got {self.eval_batches}")
        if self.fps <= 0:
            raise ConfigError(f"train.fps must be positive, got {self.fps}")


@dataclass
class GeneratorTrainConfig:
    """An MMDiT training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # ZeRO / DDP plugin, bf16, gradient clipping and context parallelism (cinedit.parallel).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SamplerConfig = field(default_factory=SamplerConfig)  # written into the pipeline for sampling

    def validate(self) -> None:
        # These check themselves in __post_init__, which overrides (setattr) skip: rebuild them.
        for name, cls in (("text", TextEncoderConfig), ("sample", SamplerConfig), ("parallel", ParallelConfig)):
            try:
                cls(**dataclasses.asdict(getattr(self, name)))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{name}: {e}") from None


def _text(name: str) -> TextEncoderConfig:
    return dataclasses.replace(TEXT_PRESETS[name])


@preset(KIND)
def debug() -> GeneratorTrainConfig:
    """The debug MMDiT (16 latent channels, patch 1, widths derived from MiniLM: 384 / 384) on the debug tokenizer
    with RANDOM weights and the sample data (built into `<out_dir>/sample_data` unless `--data.meta` is given):
    64px 8-frame clips and images, t2v + i2v (head, tail, loop) + 20% inpainting, EMA on, 20 steps.

    lr 1e-3 so a few steps show progress.
    """
    return GeneratorTrainConfig(
        model=ModelConfig(preset="debug"),
        tokenizer=TokenizerConfig(path=DEBUG_TOKENIZER),
        text=_text("debug"),
        data=GeneratorDataConfig(buckets=BucketConfig(table={"64px": {1: (1.0, 4), 8: (1.0, 2)}}), num_workers=0),
        flow=FlowConfig(conditions={"t2v": 1.0, "i2v_head": 1.0, "i2v_tail": 1.0, "i2v_loop": 1.0}, inpaint_share=0.2),
        optim=OptimConfig(lr=1e-3),
        ema=EMAConfig(enabled=True),
        train=TrainConfig(
            steps=20, log_every=1, eval_every=10, eval_batches=2, ckpt_every=10, out_dir="runs/generator_debug"
        ),
        sample=SamplerConfig(num_steps=10),
    )


@preset(KIND)
def stage1_256px_t2v() -> GeneratorTrainConfig:
    """Stage 1 (DESIGN.md "data, buckets, stages"): 256px text-to-video, lr 5e-5, the 11B DC-AE MMDiT.

    Needs `--tokenizer.path=` (the release Video DC-AE .safetensors file or a model folder) and `--data.meta=`
    (or `--data.use_cache=true --data.cache_dir=`). `model.init_from` is empty (random init); pass a release
    MMDiT file to fine-tune. `--model.preset=2b` fits one 80 GB GPU. Steps and intervals are our choice.
    """
    return GeneratorTrainConfig(
        model=ModelConfig(preset="11b-dcae"),
        tokenizer=TokenizerConfig(path=""),
        text=_text("release"),
        data=GeneratorDataConfig(buckets=stage1_buckets(), num_workers=4),
        flow=FlowConfig(conditions={"t2v": 1.0}),
        optim=OptimConfig(lr=5e-5),
        train=TrainConfig(out_dir="runs/generator_stage1_256px_t2v"),
    )


@preset(KIND)
def stage2_256px_ti2v() -> GeneratorTrainConfig:
    """Stage 2: 256px text/image-to-video, lr 1e-5, the stage-1 buckets, condition mix t2v / i2v head / tail / loop
    1 / 5 / 1 / 1.

    `model.init_from` defaults to empty: pass the previous stage's pipeline, `--model.init_from=<stage1 out_dir>/model`.
    """
    cfg = stage1_256px_t2v()
    cfg.flow = FlowConfig(conditions=dict(STAGE1_I2V_WEIGHTS))
    cfg.optim.lr = 1e-5
    cfg.train.out_dir = "runs/generator_stage2_256px_ti2v"
    return cfg


@preset(KIND)
def stage3_768px_ti2v() -> GeneratorTrainConfig:
    """Stage 3: 768px text/image-to-video, lr 5e-5, context parallelism 4 (ring attention), every block
    checkpointed, the stage-2 condition mix; clips encoded 32 frames at a time.

    `model.init_from` defaults to empty: pass the previous stage's pipeline, `--model.init_from=<stage2 out_dir>/model`.
    The number of processes must be a multiple of 4.
    """
    cfg = stage2_256px_ti2v()
    cfg.data.buckets = stage3_buckets()
    cfg.model.grad_ckpt_double = cfg.model.grad_ckpt_single = -1
    cfg.tokenizer.chunk_frames = 32
    cfg.optim.lr = 5e-5
    cfg.parallel.cp_size, cfg.parallel.cp_mode = 4, "ring"
    cfg.train.out_dir = "runs/generator_stage3_768px_ti2v"
    return cfg


@preset(KIND)
def debug_stage1() -> GeneratorTrainConfig:
    """CPU twin of stage 1 (`scripts/debug_stages.sh`): the debug MMDiT, text-to-video on 64px clips and images."""
    cfg = debug()
    cfg.flow = FlowConfig(conditions={"t2v": 1.0})
    cfg.ema.enabled = False  # as in the stage presets
    cfg.train.out_dir = "runs/debug_stage1"
    return cfg


@preset(KIND)
def debug_stage2() -> GeneratorTrainConfig:
    """CPU twin of stage 2: the same buckets, the stage-2 condition mix (t2v / i2v head / tail / loop 1/5/1/1), a
    lower learning rate; pass `--model.init_from=<debug_stage1 out_dir>/model` (the launch script does)."""
    cfg = debug_stage1()
    cfg.flow = FlowConfig(conditions=dict(STAGE1_I2V_WEIGHTS))
    cfg.optim.lr = 5e-4
    cfg.train.out_dir = "runs/debug_stage2"
    return cfg


@preset(KIND)
def debug_stage3() -> GeneratorTrainConfig:
    """CPU twin of stage 3: 128px clips, context parallelism 2 (ring attention; run it on 2 or 4 processes), every
    block checkpointed with offload, clips encoded 4 frames at a time; from `<debug_stage2 out_dir>/model`."""
    cfg = debug_stage2()
    cfg.data.buckets = BucketConfig(table={"128px": {1: (1.0, 2), 8: (1.0, 1)}, "64px": {1: (1.0, 4), 8: (1.0, 2)}})
    cfg.model.grad_ckpt_double = cfg.model.grad_ckpt_single = -1
    cfg.model.grad_ckpt_offload = True
    cfg.tokenizer.chunk_frames = 4
    cfg.optim.lr = 1e-3
    cfg.parallel.cp_size, cfg.parallel.cp_mode = 2, "ring"
    cfg.train.out_dir = "runs/debug_stage3"
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# build


def model_config(cfg: ModelConfig, latent_channels: int, txt_dim: int, vec_dim: int) -> MMDiTConfig:
    """The preset with the patch size and the widths the tokenizer and text encoder need (where left at 0)."""
    cfg.validate()
    base = MODEL_PRESETS[cfg.preset]()
    p = cfg.patch_size or base.patch_size
    want = latent_channels * p * p
    if cfg.in_channels and cfg.in_channels != want:
        raise ConfigError(
            f"model.in_channels={cfg.in_channels}, but the tokenizer's {latent_channels} latent channels at patch "
            f"{p} give {want}: leave it at 0"
        )
    widths = {"context_in_dim": cfg.context_in_dim or txt_dim, "vec_in_dim": cfg.vec_in_dim or vec_dim}
    for name, got in (("context_in_dim", txt_dim), ("vec_in_dim", vec_dim)):
        if widths[name] != got:
            raise ConfigError(f"model.{name}={widths[name]}, but the text encoder gives {got}: leave it at 0")
    try:
        return dataclasses.replace(base, patch_size=p, in_channels=want, **widths)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_model(cfg: ModelConfig, config: MMDiTConfig) -> MMDiT:
    """A freshly initialised MMDiT, or one loaded from `init_from` (see `ModelConfig`), checkpointed as asked."""
    from cinedit.generator.loading import load_pretrained, read_config
    from cinedit.modelio import CONFIG_NAME

    if not cfg.init_from:
        model = MMDiT(config)
    else:
        path = Path(cfg.init_from)
        if (path / "pipeline.json").is_file():
            path = path / "generator"
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            saved = read_config(path / CONFIG_NAME)
            if saved != config:
                diff = [f.name for f in dataclasses.fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
                raise ConfigError(f"model.init_from {path} is a different architecture (differs in {', '.join(diff)})")
        try:
            model = load_pretrained(path, config=config).float()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"model.init_from: {e}") from None
    n = lambda v: None if v == -1 else v
    apply_activation_checkpointing(
        model, n(cfg.grad_ckpt_double), n(cfg.grad_ckpt_single), offload=cfg.grad_ckpt_offload
    )
    return model


def resolve_meta(cfg: GeneratorTrainConfig, info: runtime.DistInfo) -> Path:
    """`data.meta`, or the sample dataset built once into `<out_dir>/sample_data`."""
    if cfg.data.meta:
        return Path(cfg.data.meta)
    from cinedit.data.sample import build_sample_data

    root = Path(cfg.train.out_dir) / SAMPLE_DATA
    meta = root / "meta.csv"
    if info.is_main and not meta.is_file():
        build_sample_data(root, overwrite=True, progress=cfg.train.progress)
    runtime.barrier()
    return meta


def check_cache(ds: CachedLatentDataset, cfg: GeneratorTrainConfig, tokenizer: Any) -> None:
    """Refuse a cache that was not written for this tokenizer and text encoder, or holds unscaled latents."""
    want_tok, want_text = tokenizer_hash(tokenizer), text_identity(cfg.text)
    for key in ds.keys:
        m = ds.latents.meta(key)
        if not m.get("scaled", False):
            raise ConfigError(
                f"cache entry {key!r} has no `scaled: true`: its latents are not divided by the tokenizer's scaling "
                f"factor; rebuild the cache with `cinedit data cache`"
            )
        if m.get("tokenizer", want_tok) != want_tok:
            raise ConfigError(
                f"cache entry {key!r} was encoded by tokenizer {m['tokenizer']}, tokenizer.path gives {want_tok}"
            )
        text_m = ds.texts.meta(key)
        if text_m.get("text_encoder", want_text) != want_text:
            raise ConfigError(
                f"cache entry {key!r} holds text embeddings of {text_m['text_encoder']}, the text section gives "
                f"{want_text}: set --text.* to the encoder the cache was made with"
            )
        if "vec" not in ds.texts.tensor_names(key):
            raise ConfigError(f"cache entry {key!r} has no pooled `vec` text embedding; rebuild the cache")


def build_dataset(cfg: GeneratorTrainConfig, info: runtime.DistInfo, tokenizer: Any) -> Dataset:
    """Cached latents + text embeddings, or decoded clips."""
    dcfg = cfg.data
    if dcfg.use_cache:
        try:
            ds = CachedLatentDataset(dcfg.cache_dir, dcfg.text_cache_dir or None)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.cache_dir: {e}") from None
        check_cache(ds, cfg, tokenizer)
        return ds
    return VideoDataset(read_meta(resolve_meta(cfg, info)), dcfg)


def build_loader(ds: Dataset, cfg: GeneratorTrainConfig, rank: int, size: int, seed: int) -> BucketLoader:
    dcfg = dataclasses.replace(cfg.data, seed=seed)
    sampler = build_sampler(ds, dcfg, rank, size)
    if len(sampler) == 0:
        raise ConfigError(
            f"{len(ds)} samples give no full batch with buckets {dcfg.buckets.table}: lower the batch sizes "
            f"(cached latents only fit the bucket shape they were encoded at)"
        )
    return build_dataloader(ds, sampler, dcfg.num_workers, dcfg.prefetch_factor)


@dataclass
class Trainer:
    """Everything a step touches."""

    cfg: GeneratorTrainConfig
    info: runtime.DistInfo
    model: nn.Module  # boosted
    optimizer: Any
    booster: Booster  # also holds the dp x cp layout
    ema: runtime.EMA | None
    tokenizer: Any  # VideoDCAE, frozen
    text: TextEncoder | None  # None when text embeddings come from the cache
    empty_txt: torch.Tensor  # (1, l, d) the empty prompt's T5 (or MiniLM) states
    empty_vec: torch.Tensor  # (1, d)
    conditions: ConditionMix
    dataset: Dataset
    loader: BucketLoader
    cp: ContextParallel | None = None  # shards each sample's sequence over the cp group (parallel.cp_size > 1)
    eval_data: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    step: int = 0

    @property
    def module(self) -> MMDiT:
        return self.booster.unwrap(self.model)

    @property
    def patch_size(self) -> int:
        return self.module.config.patch_size


def build_trainer(cfg: GeneratorTrainConfig, info: runtime.DistInfo) -> Trainer:
    """Tokenizer, text encoder (or cached embeddings), data, model, EMA, optimizer and booster."""
    from cinedit.generator.text import load_text_encoder

    runtime.seed_everything(cfg.train.seed)
    if not cfg.tokenizer.path:
        raise ConfigError(
            "tokenizer.path is empty: pass --tokenizer.path=/path/to/the release Video DC-AE .safetensors file (or a "
            "tokenizer model folder), or 'debug' for the random-weight debug tokenizer (smoke runs only)"
        )
    try:
        # Cached latents need the tokenizer only for the pipeline folder: keep it off the GPU then.
        tokenizer = load_tokenizer(cfg.tokenizer.path, "cpu" if cfg.data.use_cache else info.device)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer.path: {e}") from None
    if cfg.tokenizer.path == DEBUG_TOKENIZER and info.is_main:
        print("cinedit generator train: tokenizer 'debug' has RANDOM weights (smoke runs only)", file=sys.stderr)
    ds = build_dataset(cfg, info, tokenizer)
    text, empty = None, None
    if cfg.data.use_cache:
        empty = read_empty_text(cfg.data.text_cache_dir or cfg.data.cache_dir)
    if empty is None:
        text = load_text_encoder(cfg.text)
        e = text.empty(1)
        empty_txt, empty_vec = e.txt.float().to(info.device), e.vec.float().to(info.device)
    else:
        empty_txt, empty_vec = empty[0][None].float().to(info.device), empty[1][None].float().to(info.device)
    mcfg = model_config(cfg.model, tokenizer.config.latent_channels, empty_txt.shape[-1], empty_vec.shape[-1])
    model = build_model(cfg.model, mcfg)
    ema = None
    if cfg.ema.enabled:
        ema = runtime.EMA(model, cfg.ema.decay, cfg.ema.warmup)
        ema.module.to(info.device)
    o, pc = cfg.optim, cfg.parallel
    try:
        booster = build_booster(pc, info)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    model, optimizer = booster.boost(model, optimizer)
    layout = booster.layout
    cp = None
    if layout.cp_size > 1:
        ulysses = pc.ulysses_size() if pc.cp_mode == "hybrid" else None
        cp = ContextParallel(layout.cp_group, pc.cp_mode, ulysses)
    # Context-parallel group members read the same samples.
    loader = build_loader(ds, cfg, layout.dp_rank, layout.dp_size, cfg.data.seed)
    return Trainer(
        cfg, info, model, optimizer, booster, ema, tokenizer, text, empty_txt, empty_vec, cfg.flow.mix(), ds, loader, cp
    )


# ----------------------------------------------------------------------------------------------------------------------
# step and evaluation


def encode_batch(tr: Trainer, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 (b, c, t, h, w) scaled latents, txt (b, l, d), vec (b, d)), float32 on the device; frozen encoders."""
    dev = tr.info.device
    if "latent" in batch:
        x0 = batch["latent"].to(dev, non_blocking=True)
    else:
        video = batch["video"].to(dev, non_blocking=True)
        with torch.no_grad(), runtime.autocast(dev, tr.cfg.parallel.precision):
            chunks = tr.cfg.tokenizer.chunk_frames
            x0 = tr.tokenizer.encode_latents(video) if not chunks else chunked_latents(tr.tokenizer, video, chunks)
    if "txt" in batch:
        txt, vec = batch["txt"], batch["vec"]
    else:
        emb = tr.text.encode(batch["text"])
        txt, vec = emb.txt, emb.vec
    return x0.float(), txt.to(dev).float(), vec.to(dev).float()


def step_generator(tr: Trainer, step: int) -> torch.Generator:
    """The CPU generator of all of a step's draws: the same on any device, exact on resume, and shared by the
    members of a context-parallel group (seeded by the data-parallel rank)."""
    return torch.Generator().manual_seed(mix_seed(tr.cfg.train.seed, step, tr.booster.layout.dp_rank))


def flow_inputs(
    tr: Trainer, x0: torch.Tensor, txt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's keyword inputs for x_t (except `cond`, `txt`, `y_vec`) and the packed velocity target."""
    b, _, lt, lh, lw = x0.shape
    p, dev = tr.patch_size, x0.device
    inputs = {
        "img": pack(interpolate(x0, noise, t), p),
        "img_ids": make_ids(lt, lh // p, lw // p, batch=b, device=dev),
        "txt_ids": make_txt_ids(b, txt.shape[1], device=dev),
        "timesteps": t,
    }
    return inputs, pack(velocity_target(x0, noise), p)


def train_step(tr: Trainer, batch: dict[str, Any], step: int) -> dict[str, float]:
    """One MMDiT update on a batch; returns scalars to log."""
    cfg, dev = tr.cfg, tr.info.device
    x0, txt, vec = encode_batch(tr, batch)
    g = step_generator(tr, step)
    if cfg.flow.caption_dropout > 0:
        txt, vec = caption_dropout(txt, vec, tr.empty_txt, tr.empty_vec, cfg.flow.caption_dropout, generator=g)
    cond, _ = tr.conditions.condition(x0, g)
    b, _, lt, lh, lw = x0.shape
    p = tr.patch_size
    # The shift uses the real number of spatial tokens per latent frame (DESIGN.md: not the reference's /4).
    t = sample_timesteps(b, token_count(lh, lw, p), lt, generator=g).to(dev)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    inputs, target = flow_inputs(tr, x0, txt, t, noise)
    tr.model.train()
    with runtime.autocast(dev, cfg.parallel.precision):
        if tr.cp is None:
            pred = tr.model(txt=txt, y_vec=vec, cond=cond.tokens(p), **inputs)
        else:
            # Every rank of the group gets the whole prediction and takes the same loss (see ContextParallel).
            pred = tr.cp.forward(tr.model, txt=txt, y_vec=vec, cond=cond.tokens(p), **inputs)
    mask = None if cfg.flow.loss_on_given else cond.loss_mask(p)
    loss = flow_loss(pred, target, mask)
    tr.booster.backward(loss, tr.optimizer)
    grad_norm = tr.booster.step(tr.model, tr.optimizer, cfg.parallel.grad_clip)
    if tr.ema is not None:
        tr.ema.update(tr.module)
    return {
        # The mean over all ranks (context-parallel members hold equal copies), not rank 0's own batch.
        "loss": runtime.all_reduce_sum([float(loss.detach())], dev)[0] / tr.info.world_size,
        "grad_norm": grad_norm,
        "lr": tr.optimizer.param_groups[0]["lr"],
        "tokens": float(b * inputs["img"].shape[1]) / tr.booster.layout.cp_size,  # this rank's share
        "given_share": float(cond.mask.mean()),
    }


def build_eval_data(tr: Trainer) -> None:
    """Encode `train.eval_batches` fixed batches (their own seeded draw of the training data) once."""
    dp_rank, dp_size = tr.booster.layout.dp_rank, tr.booster.layout.dp_size
    loader = build_loader(tr.dataset, tr.cfg, dp_rank, dp_size, mix_seed(tr.cfg.data.seed, 0xE7A1))
    tr.eval_data = []
    for batch in loader:
        x0, txt, vec = encode_batch(tr, batch)
        tr.eval_data.append((x0.cpu(), txt.cpu(), vec.cpu()))
        if len(tr.eval_data) == tr.cfg.train.eval_batches:
            break


@torch.no_grad()
def evaluate(tr: Trainer) -> dict[str, float]:
    """Text-to-video flow loss of the EMA (else the trained) model on the fixed eval batches at t = 0.25, 0.5, 0.75,
    with fixed noise: a low-variance progress signal on training data, not a held-out score.
    """
    if not tr.eval_data:
        build_eval_data(tr)
    model = tr.ema.module if tr.ema is not None else tr.module
    model.eval()
    dev = tr.info.device
    sums = [0.0] * len(EVAL_TIMESTEPS)
    for i, (x0, txt, vec) in enumerate(tr.eval_data):
        x0, txt, vec = x0.to(dev), txt.to(dev), vec.to(dev)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(mix_seed(0xE7A1, i))).to(dev)
        for j, t_value in enumerate(EVAL_TIMESTEPS):
            t = torch.full((x0.shape[0],), t_value, device=dev)
            inputs, target = flow_inputs(tr, x0, txt, t, noise)
            with runtime.autocast(dev, tr.cfg.parallel.precision):
                pred = model(txt=txt, y_vec=vec, **inputs)
            sums[j] += float(flow_loss(pred, target))
    n = float(len(tr.eval_data))
    *sums, n = runtime.all_reduce_sum([*sums, n], dev)
    if n == 0:
        return {}
    out = {f"eval/loss_t{t_value}": s / n for t_value, s in zip(EVAL_TIMESTEPS, sums)}
    out["eval/loss"] = sum(sums) / (n * len(EVAL_TIMESTEPS))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints and the pipeline folder


def checkpoint_parts(tr: Trainer) -> dict[str, tuple[Any, nn.Module, Any]]:
    return {"model": (tr.booster, tr.model, tr.optimizer)}


def save(tr: Trainer, run_dir: Path) -> Path:
    """An atomic checkpoint of everything needed to continue exactly (see `runtime.save_training`)."""
    loaders = runtime.all_gather_objects(tr.loader.state_dict())
    # Every data rank's position is the same global batch count.
    state = {"loader": loaders[0]}
    return runtime.save_training(
        run_dir, tr.step, tr.info, checkpoint_parts(tr), tr.ema, state, tr.cfg.train.keep_checkpoints
    )


def load(tr: Trainer, path: Path) -> None:
    """Continue from a checkpoint folder written by `save`."""
    doc = runtime.load_training(path, tr.info, checkpoint_parts(tr), tr.ema)
    tr.loader.load_state_dict(doc["loader"])
    tr.step = int(doc["step"])


def export(tr: Trainer, out_dir: Path) -> Path:
    """The pipeline folder `cinedit generator sample --ckpt` reads: the generator (EMA if enabled), the tokenizer,
    the text-encoder config, the sampler settings and the frame rate."""
    from cinedit.generator.pipeline import save_pipeline

    generator = tr.ema.module if tr.ema is not None else tr.module
    return save_pipeline(out_dir, generator, tr.tokenizer, tr.cfg.text, tr.cfg.sample, tr.cfg.train.fps)


# ----------------------------------------------------------------------------------------------------------------------
# run directory and main loop


def batches(tr: Trainer):
    it = runtime.forever(tr.loader)
    return lambda step: next(it)


# Lambdas look the functions up at call time, so a test can monkeypatch `train_step` or `save`.
HOOKS = runtime.TrainHooks(
    kind=KIND,
    run_control=RUN_CONTROL,
    build=lambda cfg, info: build_trainer(cfg, info),
    batches=batches,
    train_step=lambda tr, batch, step: train_step(tr, batch, step),
    evaluate=lambda tr: evaluate(tr),
    save=lambda tr, run_dir: save(tr, run_dir),
    load=lambda tr, path: load(tr, path),
    export=lambda tr, out_dir: export(tr, out_dir),
)


def fit(cfg: GeneratorTrainConfig, preset_name: str | None = None) -> dict[str, float]:
    """Run (or continue) training; returns the last logged scalars and eval metrics."""
    return runtime.run_training(cfg, HOOKS, preset_name)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cinedit generator train`."""
    return runtime.add_train_cli(
        subparsers,
        KIND,
        fit,
        "train the MMDiT with rectified flow (t2v, i2v, inpainting)",
        "Train the MMDiT generator; a finished run writes the pipeline for `cinedit generator sample --ckpt` "
        "to <out_dir>/model.",
    )


def main(argv: list[str] | None = None) -> int:
    return runtime.train_main(KIND, add_cli, argv)


__all__ = [
    "EMAConfig",
    "FlowConfig",
    "GeneratorDataConfig",
    "GeneratorTrainConfig",
    "ModelConfig",
    "OptimConfig",
    "TokenizerConfig",
    "TrainConfig",
    "Trainer",
    "build_model",
    "build_trainer",
    "evaluate",
    "export",
    "fit",
    "load",
    "main",
    "model_config",
    "save",
    "train_step",
]


if __name__ == "__main__":
    sys.exit(main())
