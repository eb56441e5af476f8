"""Train the MMDiT generator: `cinedit generator train STAGE_OR_RUN_DIR --section.field=value ...`.

Also `python -m cinedit.generator.train ...`, under torchrun or `colossalai run` (`scripts/stage*.sh`). Each step
takes one bucketed batch of clips or images (or, with `--data.packing=true`, one pack of samples of mixed shapes
filled up to `data.tokens_per_batch` tokens, trained in one packed forward), encodes it with the frozen tokenizer
(or reads cached latents, `--data.use_cache=true`), embeds the captions with the frozen text encoder (or reads them
from the cache), drops captions to the empty prompt, draws a visual condition per sample (t2v / i2v / inpainting)
and regresses the rectified-flow velocity (`cinedit.generator.flow`). The run directory holds `config.json`,
`metrics.jsonl`, TensorBoard logs in `tb/`, checkpoints in `ckpt/step-NNNNNN/` (with a `latest` pointer), validation
samples in `samples/step_NNNNNNN/` (every `train.sample_every` steps) and, at the end, the generation pipeline in
`model/` (`cinedit generator sample --ckpt <out_dir>/model`, or `load_pipeline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cinedit.configs import ConfigError
from cinedit.configs.generator import (
    DEBUG_PROMPTS,
    DEBUG_TOKENIZER,
    GENERATOR_RUN_CONTROL,
    TEXT_WIDTHS,
    GeneratorModelConfig,
    GeneratorTrainConfig,
)
from cinedit.data.buckets import aspect_sizes, mix_seed, resolution_side
from cinedit.data.cache import read_empty_text
from cinedit.data.dataset import CachedLatentDataset, MockLatentDataset, VideoDataset, collate
from cinedit.data.meta import read_meta
from cinedit.data.sample import CLIPS, run_meta
from cinedit.data.sampler import BucketLoader, PackingSampler, build_dataloader, build_sampler, warn_never_batched
from cinedit.generator.conditions import Condition, ConditionMix
from cinedit.generator.control import (
    ControlAdapter,
    ControlAdapterConfig,
    ControlledMMDiT,
    freeze_backbone,
    save_adapter,
    unused_parameters,
)
from cinedit.generator.flow import (
    caption_dropout,
    flow_loss,
    interpolate,
    sample_timesteps,
    token_count,
    velocity_target,
)
from cinedit.generator.generate import InputError, output_path, read_prompts
from cinedit.generator.inference import InferenceError, Request, check_frames, sample_videos
from cinedit.generator.loading import load_pretrained, read_config
from cinedit.generator.lora import LORA_FILE, apply_lora, save_lora
from cinedit.generator.math import make_ids, make_txt_ids, pack
from cinedit.generator.model import PRESETS as MODEL_PRESETS
from cinedit.generator.model import MMDiT, MMDiTConfig
from cinedit.generator.packing import PackedBatch, Sample, packed_flow_losses
from cinedit.generator.parallel import ContextParallel, apply_activation_checkpointing
from cinedit.generator.pipeline import Pipeline, save_pipeline
from cinedit.generator.text import MINILM_MAX_LENGTH, TextEncoder, load_text_encoder, text_identity
from cinedit.runtime import cli as runtime_cli
from cinedit.runtime.booster import Booster, build_booster
from cinedit.runtime.checkpoint import load_training, save_training
from cinedit.runtime.dist import DistInfo, all_gather_objects, all_reduce_sum, autocast
from cinedit.runtime.ema import EMA
from cinedit.runtime.files import write_text
from cinedit.runtime.logs import MetricsLogger
from cinedit.runtime.modelio import CONFIG_NAME
from cinedit.runtime.rng import seed_everything
from cinedit.runtime.training import SAMPLES_DIR, TrainHooks, forever, run_training, samples_dir
from cinedit.tokenizer.commands import write_frames
from cinedit.tokenizer.loading import load_tokenizer, tokenizer_hash
from cinedit.tokenizer.tiling import chunked_latents

KIND = "generator"
EVAL_TIMESTEPS = (0.25, 0.5, 0.75)
CONTROL_ADAPTER_DIR = "control_adapter"  # a control run's export inside `<out_dir>/model/`


# ----------------------------------------------------------------------------------------------------------------------
# build


def model_config(cfg: GeneratorModelConfig, latent_channels: int, txt_dim: int, vec_dim: int) -> MMDiTConfig:
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


def build_model(cfg: GeneratorModelConfig, config: MMDiTConfig, dtype: torch.dtype = torch.float32) -> MMDiT:
    """A freshly initialised MMDiT, or one loaded from `init_from` (see `GeneratorModelConfig`), in `dtype`,
    checkpointed as asked."""
    if not cfg.init_from:
        model = MMDiT(config).to(dtype)
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
            model = load_pretrained(path, config=config).to(dtype)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"model.init_from: {e}") from None
    n = lambda v: None if v == -1 else v
    apply_activation_checkpointing(
        model, n(cfg.grad_ckpt_double), n(cfg.grad_ckpt_single), offload=cfg.grad_ckpt_offload
    )
    return model


def check_cache(ds: CachedLatentDataset, cfg: GeneratorTrainConfig, tokenizer: Any) -> None:
    """Refuse a cache that was not written for this tokenizer and text encoder, or holds unscaled latents, or whose
    captions disagree with `data.motion_score_suffix` (the cached text embeddings decide the captions)."""
    want_tok, want_text = tokenizer_hash(tokenizer), text_identity(cfg.text)
    suffix = cfg.data.motion_score_suffix
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
        _check_cached_suffix(key, text_m, m, suffix)


def _check_cached_suffix(key: str, text_m: dict, latent_m: dict, suffix: bool) -> None:
    """Refuse cached captions without the motion-score suffix when `data.motion_score_suffix` is on (the cache's
    `motion_score_suffix` record, or, in a cache that does not record it, whether the text ends in "motion score."),
    and cached captions recorded with it when it is off."""
    recorded = text_m.get("motion_score_suffix")
    if suffix:
        text = str(text_m.get("text", latent_m.get("text", "")))
        if recorded is False or (recorded is None and not text.rstrip().endswith("motion score.")):
            raise ConfigError(
                f"data.motion_score_suffix=true, but cache entry {key!r} holds text embeddings of captions without "
                f"the motion-score suffix ({text!r}), and the cached embeddings decide the captions: re-cache with "
                f"`cinedit data cache SCORED_META --out DIR ... --motion-score-suffix` (SCORED_META from "
                f"`cinedit data score`), or set --data.motion_score_suffix=false"
            )
    elif recorded is True:
        raise ConfigError(
            f"cache entry {key!r} holds text embeddings of captions with the motion-score suffix "
            f"(`cinedit data cache --motion-score-suffix`), but data.motion_score_suffix=false: set "
            f"--data.motion_score_suffix=true to train with them, or re-cache without --motion-score-suffix"
        )


def mock_text_dims(cfg: GeneratorTrainConfig) -> tuple[int, int]:
    """(txt, vec) widths of `data.mock` text states: `data.mock_text_dims`, else the text kind's."""
    txt, vec = cfg.data.mock_text_dims
    default = TEXT_WIDTHS[cfg.text.kind]
    return txt or default[0], vec or default[1]


def mock_dataset(cfg: GeneratorTrainConfig, tokenizer: Any) -> MockLatentDataset:
    """`data.mock`: random latents of every bucket's 16:9-nearest size and frame count, and random text states."""
    dcfg, shapes = cfg.data, []
    for res, frames in dcfg.buckets.table.items():
        sizes = aspect_sizes(resolution_side(res), dcfg.buckets.multiple)
        h, w = sizes[min(sizes, key=lambda r: abs(math.log(r * 16 / 9)))]
        shapes += [(t, h, w) for t in sorted(frames)]
    tokens = min(cfg.text.max_length, MINILM_MAX_LENGTH) if cfg.text.kind == "minilm" else cfg.text.max_length
    try:
        for shape in shapes:
            tokenizer.latent_shape(*shape)
    except ValueError as e:
        raise ConfigError(f"data.mock: a bucket shape does not fit the tokenizer ({e})") from None
    return MockLatentDataset(shapes, dcfg.mock_samples, tokenizer.latent_shape, tokens, mock_text_dims(cfg), dcfg.seed)


def build_dataset(cfg: GeneratorTrainConfig, info: DistInfo, tokenizer: Any) -> Dataset:
    """Cached latents + text embeddings, mock latents, or decoded clips."""
    dcfg = cfg.data
    if dcfg.mock:
        return mock_dataset(cfg, tokenizer)
    if dcfg.use_cache:
        try:
            ds = CachedLatentDataset(dcfg.cache_dir, dcfg.text_cache_dir or None)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.cache_dir: {e}") from None
        check_cache(ds, cfg, tokenizer)
        return ds
    source = run_meta(dcfg.meta, cfg.train.out_dir, cfg.train.progress)
    controls = cfg.control.columns() if cfg.control.enabled else ()
    # A file gone bad since indexing must not end the run.
    return VideoDataset(read_meta(source) if not controls else source, dcfg, replace_bad=True, controls=controls)


def sample_tokens(tokenizer: Any, patch_size: int, text_tokens: int) -> Callable[[int, int, int], int]:
    """What a pack's budget counts for a sample loaded at bucket shape (t, h, w): its latent's image tokens and its
    text tokens."""

    def tokens(t: int, h: int, w: int) -> int:
        _, lt, lh, lw = tokenizer.latent_shape(t, h, w)
        return lt * token_count(lh, lw, patch_size) + text_tokens

    return tokens


def build_loader(
    ds: Dataset,
    cfg: GeneratorTrainConfig,
    rank: int,
    size: int,
    seed: int,
    tokens: Callable[[int, int, int], int] | None = None,
    warn: bool = True,
) -> BucketLoader:
    """Bucketed batches, or with `data.packing` packs (lists of samples) of `tokens(t, h, w)` tokens each; `warn`:
    name the samples that no batch holds (data-parallel rank 0)."""
    dcfg = dataclasses.replace(cfg.data, seed=seed)
    if not dcfg.packing:
        sampler = build_sampler(ds, dcfg, rank, size)
        if len(sampler) == 0:
            raise ConfigError(
                f"{len(ds)} samples give no full batch with buckets {dcfg.buckets.table}: lower the batch sizes "
                f"(cached latents only fit the bucket shape they were encoded at)"
            )
        if warn and rank == 0:
            warn_never_batched(sampler)
        return build_dataloader(ds, sampler, dcfg.num_workers, dcfg.prefetch_factor)
    dcfg.validate()
    try:
        sampler = PackingSampler(
            ds,
            dcfg.buckets,
            tokens_per_batch=dcfg.tokens_per_batch,
            tokens=tokens,
            dp_rank=rank,
            dp_size=size,
            seed=dcfg.seed,
            frame_stride=dcfg.frame_stride,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(sampler) == 0:
        raise ConfigError(
            f"{len(ds)} samples give no full pack of data.tokens_per_batch={dcfg.tokens_per_batch} tokens for "
            f"{size} data-parallel rank(s): lower tokens_per_batch or add data (cached latents only fit the bucket "
            f"shape they were encoded at)"
        )
    # A pack mixes shapes: the step gets the list of samples, nothing stacked.
    return build_dataloader(ds, sampler, dcfg.num_workers, dcfg.prefetch_factor, collate_fn=list)


@dataclass(kw_only=True)
class Trainer:
    """Everything a step touches (built with keywords)."""

    cfg: GeneratorTrainConfig
    info: DistInfo
    model: nn.Module  # boosted
    optimizer: Any
    booster: Booster  # also holds the dp x cp layout
    ema: EMA | None
    tokenizer: Any  # VideoDCAE, frozen
    text: TextEncoder | None  # None when text embeddings come from the cache
    null_txt: torch.Tensor  # (1, l, d) the empty prompt's T5 (or MiniLM) states, for caption dropout
    null_vec: torch.Tensor  # (1, d) the empty prompt's pooled text vector
    conditions: ConditionMix
    dataset: Dataset
    loader: BucketLoader
    cp: ContextParallel | None = None  # shards each sample's sequence over the cp group (parallel.cp_size > 1)
    eval_data: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    eval_control: list[torch.Tensor] = field(default_factory=list)  # control.enabled: eval_data's control tokens
    prompts: list[str] = field(default_factory=list)  # the validation samples' (train.sample_every)
    step: int = 0

    @property
    def module(self) -> MMDiT:
        return self.booster.unwrap(self.model)

    @property
    def patch_size(self) -> int:
        return self.module.config.patch_size


def build_trainer(cfg: GeneratorTrainConfig, info: DistInfo) -> Trainer:
    """Tokenizer, text encoder (or cached embeddings), data, model, EMA, optimizer and booster."""
    seed_everything(cfg.train.seed)
    if not cfg.tokenizer.path:
        raise ConfigError(
            "tokenizer.path is empty: pass --tokenizer.path=/path/to/the release Video DC-AE .safetensors file (or a "
            "tokenizer model folder), or 'debug' for the random-weight debug tokenizer (smoke runs only)"
        )
    try:
        # Cached latents need the tokenizer only for the pipeline folder: keep it off the GPU then.
        tokenizer = load_tokenizer(cfg.tokenizer.path, "cpu" if cfg.data.use_cache or cfg.data.mock else info.device)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer.path: {e}") from None
    if cfg.tokenizer.path == DEBUG_TOKENIZER and info.is_main:
        print("cinedit generator train: tokenizer 'debug' has RANDOM weights (smoke runs only)", file=sys.stderr)
    ds = build_dataset(cfg, info, tokenizer)
    text, empty = None, None
    if cfg.data.use_cache:
        empty = read_empty_text(cfg.data.text_cache_dir or cfg.data.cache_dir)
    if cfg.data.mock:  # the empty prompt of random text states: zeros
        empty = (torch.zeros(ds.text_tokens, ds.text_dims[0]), torch.zeros(ds.text_dims[1]))
    if empty is None:
        text = load_text_encoder(cfg.text)
        e = text.empty(1)
        null_txt, null_vec = e.txt.float().to(info.device), e.vec.float().to(info.device)
    else:
        null_txt, null_vec = empty[0][None].float().to(info.device), empty[1][None].float().to(info.device)
    mcfg = model_config(cfg.model, tokenizer.config.latent_channels, null_txt.shape[-1], null_vec.shape[-1])
    prompts = validation_prompts(cfg, info, tokenizer, mcfg.patch_size)  # fails before the model is built
    for name, on in (("lora", cfg.lora.enabled), ("control", cfg.control.enabled)):
        if on and not cfg.model.init_from:
            raise ConfigError(
                f"{name}.enabled=true needs the base model to adapt: --model.init_from=PIPELINE_OR_GENERATOR (a "
                f"pipeline folder, a generator folder or the release's MMDiT .safetensors file)"
            )
    # An adapter run's frozen base is only read: bf16 on the GPU (never a whole fp32 copy), its adapters fp32.
    adapted = cfg.lora.enabled or cfg.control.enabled
    frozen_bf16 = adapted and info.device.type == "cuda" and cfg.parallel.precision == "bf16"
    model = build_model(cfg.model, mcfg, torch.bfloat16 if frozen_bf16 else torch.float32)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    if cfg.control.enabled:
        model = build_controlled(model, cfg)
    if cfg.model.compile:
        if cfg.control.enabled:
            raise ConfigError(
                "model.compile=true with control.enabled is not built (the adapter runs through hooks): "
                "pass --model.compile=false"
            )
        model.compile_blocks()
    ema = None
    if cfg.ema.enabled:
        ema = EMA(model, cfg.ema.decay, cfg.ema.warmup)
        ema.module.to(info.device)
    o, pc = cfg.optim, cfg.parallel
    try:
        booster = build_booster(pc, info)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA / control: the adapter(s) alone
    # foreach: the same update bit for bit as torch's CPU default (a loop over the tensors), and faster on CPU (see the
    # tokenizer trainer's `build_optimizer`).
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, foreach=True)
    model, optimizer = booster.boost(model, optimizer)
    layout = booster.layout
    cp = None
    if layout.cp_size > 1:
        ulysses = pc.ulysses_size() if pc.cp_mode == "hybrid" else None
        cp = ContextParallel(layout.cp_group, pc.cp_mode, ulysses)
    # Context-parallel group members read the same samples.
    tokens = sample_tokens(tokenizer, mcfg.patch_size, null_txt.shape[1])
    loader = build_loader(ds, cfg, layout.dp_rank, layout.dp_size, cfg.data.seed, tokens=tokens)
    return Trainer(
        cfg=cfg,
        info=info,
        model=model,
        optimizer=optimizer,
        booster=booster,
        ema=ema,
        tokenizer=tokenizer,
        text=text,
        null_txt=null_txt,
        null_vec=null_vec,
        conditions=ConditionMix(cfg.flow.weights()),
        dataset=ds,
        loader=loader,
        cp=cp,
        prompts=prompts,
    )


def build_controlled(model: MMDiT, cfg: GeneratorTrainConfig) -> ControlledMMDiT:
    """The frozen base with a control adapter (fp32) built from its config: the adapter's context blocks copy the
    base's first double blocks (`control.init_from_backbone`), its hint projections are zero. The adapter parameters
    that never get a gradient (`unused_parameters`) get `requires_grad=False`, so the optimizer, the gradient norm and
    the checkpoints hold only parameters that train (the export still writes them all)."""
    c = cfg.control
    acfg = ControlAdapterConfig(
        num_blocks=c.num_blocks,
        hint_blocks=c.hint_blocks,
        kinds=c.kinds(),
        reference=c.reference,
        init_from_backbone=c.init_from_backbone,
    )
    freeze_backbone(model)
    try:
        adapter = ControlAdapter.from_backbone(model, acfg).float()
    except ValueError as e:
        raise ConfigError(f"control: {e}") from None
    unused = set(unused_parameters(adapter))
    for name, p in adapter.named_parameters():
        p.requires_grad_(name not in unused)
    return ControlledMMDiT(model, adapter)


def encode_control(tr: Trainer, batch: dict[str, Any]) -> torch.Tensor:
    """Packed control tokens (b, l_img, in_channels * kinds) of a batch's `control` videos (b, K, 3, T, H, W): each
    kind encoded by the frozen tokenizer like the clip, packed like `img`, concatenated in `control.kind` order."""
    dev, p = tr.info.device, tr.patch_size
    video = batch["control"].to(dev, non_blocking=True)
    chunks = tr.cfg.tokenizer.chunk_frames
    tokens = []
    with torch.no_grad(), autocast(dev, tr.cfg.parallel.precision):
        for k in range(video.shape[1]):
            v = video[:, k]
            z = tr.tokenizer.encode_latents(v) if not chunks else chunked_latents(tr.tokenizer, v, chunks)
            tokens.append(pack(z.float(), p))
    return torch.cat(tokens, dim=-1)


def control_kwargs(tr: Trainer, control: torch.Tensor | None, x0: torch.Tensor) -> dict[str, Any]:
    """The controlled model's extra keywords (none without control): the control tokens, the reference latent (the
    clip's first latent frame, packed, when `control.reference`) and the hint scale."""
    if control is None:
        return {}
    reference = pack(x0[:, :, :1], tr.patch_size) if tr.cfg.control.reference else None
    return {"control": control, "reference": reference, "control_scale": tr.cfg.control.scale}


# ----------------------------------------------------------------------------------------------------------------------
# step and evaluation


def encode_batch(tr: Trainer, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 (b, c, t, h, w) scaled latents, txt (b, l, d), vec (b, d)), float32 on the device; frozen encoders."""
    dev = tr.info.device
    if "latent" in batch:
        x0 = batch["latent"].to(dev, non_blocking=True)
    else:
        video = batch["video"].to(dev, non_blocking=True)
        with torch.no_grad(), autocast(dev, tr.cfg.parallel.precision):
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
    """The model's keyword inputs for x_t (except `cond`, `txt`, `vec`) and the packed velocity target."""
    b, _, lt, lh, lw = x0.shape
    p, dev = tr.patch_size, x0.device
    inputs = {
        "img": pack(interpolate(x0, noise, t), p),
        "img_ids": make_ids(lt, lh // p, lw // p, batch=b, device=dev),
        "txt_ids": make_txt_ids(b, txt.shape[1], device=dev),
        "timesteps": t,
    }
    return inputs, pack(velocity_target(x0, noise), p)


def flow_draws(
    tr: Trainer, x0: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, g: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None, Condition]:
    """A batch's draws from the step generator g, in this order: caption dropout, visual condition, timesteps,
    noise. Returns the model's keyword inputs (all but control), the packed velocity target, the loss mask (None:
    every token) and the condition."""
    cfg, dev, p = tr.cfg, tr.info.device, tr.patch_size
    if cfg.flow.caption_dropout > 0:
        txt, vec = caption_dropout(txt, vec, tr.null_txt, tr.null_vec, cfg.flow.caption_dropout, generator=g)
    cond, _ = tr.conditions.condition(x0, g)
    b, _, lt, lh, lw = x0.shape
    # The shift uses the real number of spatial tokens per latent frame (DESIGN.md: not the reference's /4).
    t = sample_timesteps(b, token_count(lh, lw, p), lt, generator=g).to(dev)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    inputs, target = flow_inputs(tr, x0, txt, t, noise)
    inputs.update(txt=txt, vec=vec, cond=cond.tokens(p))
    mask = None if cfg.flow.loss_on_given else cond.loss_mask(p)
    return inputs, target, mask, cond


def update(tr: Trainer, loss: torch.Tensor) -> dict[str, float]:
    """Backward, optimizer step and EMA; the scalars every step logs (loss: the mean over all ranks, context-parallel
    members holding equal copies, not rank 0's own)."""
    tr.booster.backward(loss, tr.optimizer)
    grad_norm = tr.booster.step(tr.model, tr.optimizer, tr.cfg.parallel.grad_clip)
    if tr.ema is not None:
        tr.ema.update(tr.module)
    return {
        "loss": all_reduce_sum([float(loss.detach())], tr.info.device)[0] / tr.info.world_size,
        "grad_norm": grad_norm,
        "lr": tr.optimizer.param_groups[0]["lr"],
    }


def train_step(tr: Trainer, batch: dict[str, Any] | list[dict[str, Any]], step: int) -> dict[str, float]:
    """One MMDiT update on a batch (with `data.packing`, on a pack: `train_pack_step`); returns scalars to log."""
    if tr.cfg.data.packing:
        return train_pack_step(tr, batch, step)
    cfg, dev = tr.cfg, tr.info.device
    x0, txt, vec = encode_batch(tr, batch)
    inputs, target, mask, cond = flow_draws(tr, x0, txt, vec, step_generator(tr, step))
    # control.enabled: the model is a `ControlledMMDiT`, its forward the base's under `with_control`.
    extra = control_kwargs(tr, encode_control(tr, batch) if cfg.control.enabled else None, x0)
    tr.model.train()
    with autocast(dev, cfg.parallel.precision):
        if tr.cp is None:
            pred = tr.model(**inputs, **extra)
        else:
            # Every rank of the group gets the whole prediction and takes the same loss (see ContextParallel).
            pred = tr.cp.forward(tr.model, **inputs)
    loss = flow_loss(pred, target, mask)
    return {
        **update(tr, loss),
        "tokens": float(x0.shape[0] * inputs["img"].shape[1]) / tr.booster.layout.cp_size,  # this rank's share
        "given_share": float(cond.mask.mean()),
    }


def encode_pack(tr: Trainer, pack: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`encode_batch` of each sample of a pack, as a batch of one."""
    return [encode_batch(tr, collate([item])) for item in pack]


def pack_draws(
    tr: Trainer, encoded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], g: torch.Generator
) -> tuple[PackedBatch, list[torch.Tensor], list[torch.Tensor | None], list[Condition]]:
    """Each sample's `flow_draws` (as a batch of one, its own timestep shift), one sample after the other from g,
    and the pack of their model inputs; with the targets, loss masks and conditions in pack order."""
    samples, targets, masks, conds = [], [], [], []
    for x0, txt, vec in encoded:
        inputs, target, mask, cond = flow_draws(tr, x0, txt, vec, g)
        samples.append(Sample.from_inputs(inputs))
        targets.append(target)
        masks.append(mask)
        conds.append(cond)
    return PackedBatch.from_samples(samples), targets, masks, conds


def train_pack_step(tr: Trainer, pack: list[dict[str, Any]], step: int) -> dict[str, float]:
    """One MMDiT update on a pack of samples of mixed shapes: one packed forward through the boosted model (so DDP
    and the ColossalAI plugins synchronise gradients as for a batch); the loss is the mean of the per-sample flow
    losses, every sample weighing the same, as in a bucketed batch."""
    cfg, dev = tr.cfg, tr.info.device
    packed, targets, masks, conds = pack_draws(tr, encode_pack(tr, pack), step_generator(tr, step))
    tr.model.train()
    with autocast(dev, cfg.parallel.precision):
        pred = tr.model(**packed.inputs())
    loss = packed_flow_losses(packed.unpack_img(pred), targets, masks).mean()
    return {
        **update(tr, loss),
        "tokens": float(packed.img.shape[1]),  # this rank's real image tokens, as the bucketed step counts
        "given_share": sum(float(c.mask.mean()) for c in conds) / len(conds),
    }


def build_eval_data(tr: Trainer) -> None:
    """Encode `train.eval_batches` fixed batches (their own seeded draw of the training data, or of the held-out
    `control.eval_meta`) once; with control, their control tokens too."""
    dp_rank, dp_size = tr.booster.layout.dp_rank, tr.booster.layout.dp_size
    cc, ds = tr.cfg.control, tr.dataset
    if cc.enabled and cc.eval_meta:
        try:
            ds = VideoDataset(cc.eval_meta, tr.cfg.data, replace_bad=True, controls=cc.columns())
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"control.eval_meta: {e}") from None
    tokens = sample_tokens(tr.tokenizer, tr.patch_size, tr.null_txt.shape[1])
    seed = mix_seed(tr.cfg.data.seed, 0xE7A1)
    loader = build_loader(ds, tr.cfg, dp_rank, dp_size, seed, tokens=tokens, warn=False)  # a few fixed batches
    tr.eval_data, tr.eval_control = [], []
    for n, batch in enumerate(loader, 1):
        # A pack's samples have different shapes: each is a batch of its own (so every sample weighs the same).
        encoded = encode_pack(tr, batch) if tr.cfg.data.packing else [encode_batch(tr, batch)]
        tr.eval_data += [(x0.cpu(), txt.cpu(), vec.cpu()) for x0, txt, vec in encoded]
        if cc.enabled:
            tr.eval_control.append(encode_control(tr, batch).cpu())
        if n == tr.cfg.train.eval_batches:
            break


@torch.no_grad()
def evaluate(tr: Trainer) -> dict[str, float]:
    """Text-to-video flow loss of the EMA (else the trained) model on the fixed eval batches at t = 0.25, 0.5, 0.75,
    with fixed noise: a low-variance progress signal on training data, not a held-out score.

    With control: the loss with the batches' control (`eval/loss`, `eval/loss_control`) and with the control tokens
    replaced by zeros (`eval/loss_zero_control`), on the held-out `control.eval_meta` when it is given.
    """
    if not tr.eval_data:
        build_eval_data(tr)
    model = tr.ema.module if tr.ema is not None else tr.module
    model.eval()
    dev = tr.info.device
    runs = ("", "_zero_control") if tr.cfg.control.enabled else ("",)
    sums = [0.0] * (len(EVAL_TIMESTEPS) * len(runs))
    for i, (x0, txt, vec) in enumerate(tr.eval_data):
        x0, txt, vec = x0.to(dev), txt.to(dev), vec.to(dev)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(mix_seed(0xE7A1, i))).to(dev)
        control = tr.eval_control[i].to(dev) if tr.cfg.control.enabled else None
        for r, run in enumerate(runs):
            extra = control_kwargs(tr, control if not run else torch.zeros_like(control), x0)
            for j, t_value in enumerate(EVAL_TIMESTEPS):
                t = torch.full((x0.shape[0],), t_value, device=dev)
                inputs, target = flow_inputs(tr, x0, txt, t, noise)
                with autocast(dev, tr.cfg.parallel.precision):
                    pred = model(txt=txt, vec=vec, **inputs, **extra)
                sums[r * len(EVAL_TIMESTEPS) + j] += float(flow_loss(pred, target))
    n = float(len(tr.eval_data))
    *sums, n = all_reduce_sum([*sums, n], dev)
    if n == 0:
        return {}
    k = len(EVAL_TIMESTEPS)
    out = {f"eval/loss_t{t_value}": s / n for t_value, s in zip(EVAL_TIMESTEPS, sums)}
    out["eval/loss"] = sum(sums[:k]) / (n * k)
    if tr.cfg.control.enabled:
        out["eval/loss_control"] = out["eval/loss"]
        out["eval/loss_zero_control"] = sum(sums[k:]) / (n * k)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# validation samples

DEBUG_PROMPT_CLIPS = ("bunny_wakes", "suit_cyclist")  # the sample-data captions behind `DEBUG_PROMPTS`
PROMPTS_FILE = "prompts.txt"  # `DEBUG_PROMPTS` written into `<out_dir>/samples/`, for the record


def validation_prompts(cfg: GeneratorTrainConfig, info: DistInfo, tokenizer: Any, patch_size: int) -> list[str]:
    """The fixed prompts of `train.sample_every` ([] when it is 0), after checking that the tokenizer and the patch
    size take `train.sample_frames` and `train.sample_size`."""
    tc = cfg.train
    if not tc.sample_every:
        return []
    if cfg.data.mock:
        if info.is_main:
            print("cinedit generator train: data.mock: no validation samples (the model learns random latents)")
        return []
    if tc.sample_prompts == DEBUG_PROMPTS:
        texts = {c.name: c.text for c in CLIPS}
        prompts = [texts[name] for name in DEBUG_PROMPT_CLIPS]
        if info.is_main:
            write_text(Path(tc.out_dir) / SAMPLES_DIR / PROMPTS_FILE, "".join(p + "\n" for p in prompts))
    else:
        try:
            prompts = read_prompts(tc.sample_prompts, "train.sample_prompts")
        except InputError as e:
            raise ConfigError(str(e)) from None
    try:
        check_frames(tokenizer, tc.sample_frames)
    except InferenceError as e:
        raise ConfigError(f"train.sample_frames={tc.sample_frames} does not fit the tokenizer ({e})") from None
    multiple = tokenizer.spatial_compression * patch_size
    if any(side % multiple for side in tc.sample_size):
        raise ConfigError(
            f"train.sample_size={list(tc.sample_size)}: height and width must be multiples of {multiple} (tokenizer "
            f"compression x patch size)"
        )
    return prompts


@torch.no_grad()
def sample_validation(tr: Trainer, logger: MetricsLogger) -> None:
    """Text-to-video samples of the fixed prompts by the EMA (else the trained) model, each from the `sample`
    section's seed so that rounds compare, through the one sampling path (`sample_videos`): an mp4 (PNG for one
    frame) per prompt in `samples_dir(out_dir, step)` and a video in TensorBoard (`samples/<index>_<slug>`).

    The main rank samples alone with the plain forward: every rank holds the full weights (DDP, ZeRO-1/2, and
    context parallelism only splits activations, inside `ContextParallel.forward`); the others wait at the loop's
    barrier. The loop restores the RNG states afterwards.
    """
    if not tr.info.is_main or not tr.prompts:
        return
    cfg, tc, dev = tr.cfg, tr.cfg.train, tr.info.device
    if tr.text is None:  # the cache holds the training captions' embeddings; sampling needs the encoder itself
        tr.text = load_text_encoder(cfg.text)
    model = tr.ema.module if tr.ema is not None else tr.module
    sampler = dataclasses.replace(cfg.sample, num_steps=tc.sample_steps or cfg.sample.num_steps)
    pipe = Pipeline(
        generator=model, tokenizer=tr.tokenizer, text_encoder=tr.text, text_config=cfg.text, sampler=sampler, fps=tc.fps
    )

    def velocity(*args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(dev, cfg.parallel.precision):  # as in training and `evaluate`
            return model(*args, **kwargs).float()

    was_training = model.training
    model.eval()
    out = samples_dir(tc.out_dir, tr.step)
    try:
        for i, prompt in enumerate(tr.prompts):
            req = Request([prompt], tc.sample_frames, tuple(tc.sample_size), sampler)
            _, video = sample_videos(pipe, req, velocity=velocity)
            video = video[0].clamp(-1, 1)  # (3, T, H, W)
            path = write_frames(output_path(out, i, prompt, tc.sample_frames), video, tc.fps)
            logger.video(f"samples/{path.stem}", (video.transpose(0, 1) + 1) / 2, tr.step, tc.fps)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints and the pipeline folder


def checkpoint_parts(tr: Trainer) -> dict[str, tuple[Any, nn.Module, Any]]:
    return {"model": (tr.booster, tr.model, tr.optimizer)}


def save(tr: Trainer, run_dir: Path) -> Path:
    """An atomic checkpoint of everything needed to continue exactly (see `save_training`)."""
    loaders = all_gather_objects(tr.loader.state_dict())
    # Every data rank's position is the same global batch count.
    state = {"loader": loaders[0]}
    return save_training(run_dir, tr.step, tr.info, checkpoint_parts(tr), tr.ema, state, tr.cfg.train.keep_checkpoints)


def load(tr: Trainer, path: Path) -> None:
    """Continue from a checkpoint folder written by `save`."""
    doc = load_training(path, tr.info, checkpoint_parts(tr), tr.ema)
    tr.loader.load_state_dict(doc["loader"])
    tr.step = int(doc["step"])


def export(tr: Trainer, out_dir: Path) -> Path:
    """The pipeline folder `cinedit generator sample --ckpt` reads: the generator (EMA if enabled), the tokenizer,
    the text-encoder config, the sampler settings and the frame rate. A LoRA run writes its adapter instead:
    `lora.safetensors` + `adapter_config.json` (`cinedit generator sample --lora`, `merge-lora`); a control run its
    control adapter: `control_adapter/` (`cinedit generator sample --control-adapter`)."""
    if tr.cfg.lora.enabled:
        save_lora(tr.module, out_dir / LORA_FILE, base=tr.cfg.model.init_from)
        return out_dir
    if tr.cfg.control.enabled:
        save_adapter(tr.module.adapter, out_dir / CONTROL_ADAPTER_DIR)
        return out_dir
    generator = tr.ema.module if tr.ema is not None else tr.module
    return save_pipeline(out_dir, generator, tr.tokenizer, tr.cfg.text, tr.cfg.sample, tr.cfg.train.fps)


# ----------------------------------------------------------------------------------------------------------------------
# run directory and main loop


def batches(tr: Trainer):
    it = forever(tr.loader)
    return lambda step: next(it)


# Lambdas look the functions up at call time, so a test can monkeypatch `train_step` or `save`.
HOOKS = TrainHooks(
    kind=KIND,
    run_control=GENERATOR_RUN_CONTROL,
    build=lambda cfg, info: build_trainer(cfg, info),
    batches=batches,
    train_step=lambda tr, batch, step: train_step(tr, batch, step),
    evaluate=lambda tr: evaluate(tr),
    save=lambda tr, run_dir: save(tr, run_dir),
    load=lambda tr, path: load(tr, path),
    export=lambda tr, out_dir: export(tr, out_dir),
    sample=lambda tr, logger: sample_validation(tr, logger),
)


def fit(cfg: GeneratorTrainConfig, preset_name: str | None = None) -> dict[str, float]:
    """Run (or continue) training; returns the last logged scalars and eval metrics."""
    return run_training(cfg, HOOKS, preset_name)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cinedit generator train`."""
    return runtime_cli.add_train_cli(
        subparsers,
        KIND,
        fit,
        "train the MMDiT with rectified flow (t2v, i2v, inpainting)",
        "Train the MMDiT generator; a finished run writes the pipeline for `cinedit generator sample --ckpt` "
        "to <out_dir>/model.",
    )


def main(argv: list[str] | None = None) -> int:
    return runtime_cli.train_main(KIND, add_cli, argv)


__all__ = [
    "Trainer",
    "build_model",
    "build_trainer",
    "evaluate",
    "export",
    "fit",
    "load",
    "main",
    "model_config",
    "sample_validation",
    "save",
    "train_pack_step",
    "train_step",
    "validation_prompts",
]


if __name__ == "__main__":
    sys.exit(main())
