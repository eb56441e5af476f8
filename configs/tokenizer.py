"""The tokenizer trainer's run schema and presets: `cinedit tokenizer train debug|f32t4c128 ...`.

Each preset is a function returning a `TokenizerTrainConfig`; `PRESETS` registers them (see `cinedit.configs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cinedit.configs.core import ConfigError, check_adamw
from cinedit.configs.data import BucketConfig, DataConfig
from cinedit.configs.parallel import ParallelConfig
from cinedit.configs.train import RUN_CONTROL, EMAConfig, LoopConfig

# The Video DC-AE presets of `cinedit.tokenizer.model.PRESETS` (a test keeps the two in step).
DCAE_PRESETS = ("f32t4c128", "f32t4c256", "debug", "demo")
# `tokenizer.path` / `cinedit data cache --tokenizer` value for the debug preset with random (seeded) weights.
DEBUG_TOKENIZER = "debug"
LPIPS_NETS = ("alex", "vgg")
LR_DECAYS = ("constant", "cosine")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# Fields a resumed tokenizer run may change: the loop's, and the start of the adversarial phase (phase 2 continues
# a phase-1 run).
TOKENIZER_RUN_CONTROL = (*RUN_CONTROL, "disc.start")


@dataclass
class LPIPSConfig:
    """Which LPIPS network to build and where its local weight files are."""

    net: str = "alex"
    backbone: str = ""  # torchvision-format ImageNet checkpoint; "" looks in the torch hub cache
    heads: str = ""  # linear heads; "" uses the lpips package's weights/v0.1/<net>.pth

    def validate(self) -> None:
        if self.net not in LPIPS_NETS:
            raise ConfigError(f"LPIPSConfig.net must be one of {sorted(LPIPS_NETS)}, got {self.net!r}")


@dataclass
class TokenizerModelConfig:
    """Which Video DC-AE to train and what to start from."""

    preset: str = "f32t4c128"  # a cinedit.tokenizer.PRESETS name
    # "" (random init), our model folder (save_pretrained), a release .safetensors file, or an image DC-AE
    # folder / hub id that diffusers' AutoencoderDC loads (inflated to 3D).
    init_from: str = ""
    # Regional torch.compile (`VideoDCAE.compile_blocks`: each block on its own); on in the f32t4c128 preset.
    compile: bool = False
    # From scratch (init_from ""): every residual branch starts as zero (`VideoDCAE.zero_residual_branches`).
    zero_init: bool = True
    # Weight layout of the model being trained: "channels_last" (NDHWC conv weights, which oneDNN's conv3d backward
    # runs 1.35x faster on CPU), "contiguous", or "auto": channels_last on CPU unless the plugin is ZeRO (which
    # flattens every weight with view(-1)), contiguous on CUDA (not measured there yet).
    memory_format: str = "auto"

    def validate(self) -> None:
        if self.preset not in DCAE_PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(DCAE_PRESETS)}, got {self.preset!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(
                f"model.memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}"
            )


@dataclass
class TokenizerDataConfig(DataConfig):
    """Training data plus the held-out clips: a seeded share of the videos, never trained on (images all train)."""

    val_fraction: float = 0.05
    val_max: int = 64  # at most this many held-out clips
    square: bool = True  # crop every bucket to a square of the same pixel count (DC-AE trains on square crops)
    # Training windows (`TrainCrops`): read each sample at a seeded scale in [1, crop_scale] times its bucket's size
    # and cut a seeded random window of the bucket's size (1: the whole frame, resized); `flip` mirrors half of them.
    # Both off in the release recipe; on in `debug`, where a handful of clips must give many distinct windows.
    crop_scale: float = 1.0
    flip: bool = False
    eval_frames: int = 32  # held-out clips are read at (eval_frames, eval_size, eval_size)
    eval_size: int = 256
    eval_batch: int = 1

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_size % 32 or self.eval_size < 32:
            raise ConfigError(f"data.eval_size must be a positive multiple of 32, got {self.eval_size}")
        if self.eval_frames != 1 and self.eval_frames % 4:
            raise ConfigError(f"data.eval_frames must be 1 or a multiple of 4, got {self.eval_frames}")
        if self.eval_batch < 1:
            raise ConfigError(f"data.eval_batch must be >= 1, got {self.eval_batch}")
        if not 1 <= self.crop_scale <= 8:
            raise ConfigError(f"data.crop_scale must be in [1, 8] (1: whole frames), got {self.crop_scale}")


@dataclass
class LossConfig:
    """Reconstruction loss weights; LPIPS uses VGG16 (its ImageNet backbone is a local file, see `lpips`)."""

    l1_weight: float = 1.0
    # Squared error, the quantity PSNR measures; off in the release recipe (L1 + LPIPS), on in `debug`.
    mse_weight: float = 0.0
    lpips_weight: float = 0.5
    lpips: LPIPSConfig = field(default_factory=lambda: LPIPSConfig(net="vgg"))
    lpips_frames_per_batch: int = 0  # chunk LPIPS over frames to bound memory (0: all at once)
    # Latent regulariser: latent_weight * mean(z^2) of the encoder's (unscaled) latents, images and videos alike.
    # Off (0) in the release recipe; it bounds the latent scale a generator needs (see `latent_regulariser`).
    latent_weight: float = 0.0

    def validate(self) -> None:
        if min(self.l1_weight, self.mse_weight, self.lpips_weight, self.latent_weight) < 0:
            raise ConfigError(
                f"loss weights must be >= 0, got l1 {self.l1_weight}, mse {self.mse_weight}, lpips "
                f"{self.lpips_weight}, latent {self.latent_weight}"
            )


@dataclass
class DiscConfig:
    """The adversarial phase: a 3D PatchGAN trained with the hinge loss from step `start` on."""

    start: int = -1  # first step with the adversarial loss; -1: never (phase 1 only)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    weight: float = 0.05  # multiplies the adaptive weight
    max_adaptive: float = 1e4  # adaptive weight clamp [0, max_adaptive]
    layers: int = 5
    filters: int = 64

    def validate(self) -> None:
        if self.start < -1:
            raise ConfigError(f"disc.start must be a step >= 0, or -1 for no adversarial phase, got {self.start}")
        if self.layers < 1 or self.filters < 1:
            raise ConfigError(f"disc.layers and disc.filters must be >= 1, got {self.layers}, {self.filters}")
        check_adamw("disc", self.lr, self.betas, 1e-8, self.weight_decay)

    @property
    def enabled(self) -> bool:
        return self.start >= 0


@dataclass
class TokenizerOptimConfig:
    """AdamW for the autoencoder."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0  # gradient clipping is parallel.grad_clip (ZeRO clips inside its step)
    # Schedule (`lr_at`): linear warm-up over `warmup_steps`, then "constant" (the release recipe) or "cosine" decay
    # to min_lr_ratio * lr at train.steps.
    warmup_steps: int = 0
    decay: str = "constant"
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        check_adamw("optim", self.lr, self.betas, self.eps, self.weight_decay)
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay not in LR_DECAYS:
            raise ConfigError(f"optim.decay must be one of {list(LR_DECAYS)}, got {self.decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of (1-based) step `step` of a `total`-step run."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.decay == "constant" or total <= self.warmup_steps:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TokenizerLoopConfig(LoopConfig):
    """The loop (`LoopConfig`), with the share of image steps and TensorBoard previews."""

    out_dir: str = "runs/tokenizer"
    image_share: float = 0.2  # share of steps (one process) or of ranks (several) on image batches
    log_images: int = 1  # held-out reconstructions written to TensorBoard at each evaluation

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if not 0 <= self.image_share <= 1:
            raise ConfigError(f"train.image_share must be in [0, 1], got {self.image_share}")


@dataclass
class TokenizerTrainConfig:
    """A Video DC-AE training run."""

    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TokenizerLoopConfig = field(default_factory=TokenizerLoopConfig)
    # ZeRO / DDP plugin, bf16 and gradient clipping (cinedit.runtime.booster); no context parallelism here.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if self.parallel.cp_size != 1:
            raise ConfigError(
                "parallel.cp_size must be 1 for the tokenizer: its clips are short enough for one process (long "
                "inputs are tiled at inference)"
            )


# ----------------------------------------------------------------------------------------------------------------------
# presets


def f32t4c128() -> TokenizerTrainConfig:
    """The release recipe (DESIGN.md "Facts: Video DC-AE"): 256px square clips of 32 frames and 256px images.

    Phase 1 (reconstruction) by default; phase 2 is `--disc.start=STEP` (also when resuming a phase-1 run).
    Needs `--data.meta=...` and the VGG16 backbone (`--loss.lpips.backbone=/path/to/vgg16-397923af.pth`).
    Batch sizes per GPU (1 clip, 4 images) are our choice; the release does not state them.
    """
    return TokenizerTrainConfig(
        model=TokenizerModelConfig(preset="f32t4c128", compile=True),
        data=TokenizerDataConfig(buckets=BucketConfig(table={"256px": {1: (1.0, 4), 32: (1.0, 1)}}), num_workers=4),
        train=TokenizerLoopConfig(out_dir="runs/tokenizer_f32t4c128"),
    )


def debug() -> TokenizerTrainConfig:
    """The debug model on the sample data (built into `<out_dir>/sample_data` unless `--data.meta` is given):
    64px square 8-frame clips and images, 20 steps, adversarial phase from step 5, held-out reconstructions to
    `samples/` every 10 steps.

    LPIPS weight 0: no ImageNet VGG16 weights exist on the development machine; give
    `--loss.lpips_weight=0.5 --loss.lpips.backbone=PATH` where they do. lr 1e-3 so a few steps show progress.
    Latent regulariser 1e-2 (`LossConfig.latent_weight`): without it the latents' std runs into the thousands, image
    latents ~20x smaller than video ones; with it (150 steps, scripts/tokenizer_study.py) std ~0.4 (video) / ~0.3
    (image), for ~0.7 dB of held-out PSNR at that length.
    """
    return TokenizerTrainConfig(
        model=TokenizerModelConfig(preset="debug"),
        data=TokenizerDataConfig(
            buckets=BucketConfig(table={"64px": {1: (1.0, 4), 8: (1.0, 2)}}),
            num_workers=0,
            val_fraction=0.25,
            val_max=4,
            eval_frames=8,
            eval_size=64,
            eval_batch=2,
            crop_scale=2.0,
            flip=True,
            decode_cache_mb=512,  # the sample data decoded once (125 MiB): 15% of a CPU step was decoding
        ),
        loss=LossConfig(lpips_weight=0.0, mse_weight=1.0, latent_weight=1e-2),
        disc=DiscConfig(start=5, filters=8),
        optim=TokenizerOptimConfig(lr=1e-3),
        train=TokenizerLoopConfig(
            steps=20, log_every=1, eval_every=10, sample_every=10, ckpt_every=10, out_dir="runs/tokenizer_debug"
        ),
    )


PRESETS: dict[str, Callable[[], TokenizerTrainConfig]] = {"debug": debug, "f32t4c128": f32t4c128}
