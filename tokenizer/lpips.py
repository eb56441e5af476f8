"""LPIPS perceptual distance (Zhang et al. 2018) without torchvision: AlexNet / VGG16 feature stacks laid out like
torchvision's (so its ImageNet checkpoints load by key), plus the official linear heads shipped in the `lpips` package.

Nothing is downloaded: the backbone is a local torchvision-format file and the heads are read from the installed
`lpips` package's data files (the package itself is never imported; it would import torchvision).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange
from safetensors.torch import load_file

from cinedit.configs.tokenizer import LPIPSConfig

# net (cinedit.configs.tokenizer.LPIPS_NETS) -> (torch-hub file name, feature indices tapped after their ReLU,
# channels at each tap)
NETS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "alex": ("alexnet-owt-7be5be79.pth", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": ("vgg16-397923af.pth", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}

# LPIPS's input normalisation for [-1, 1] images (fixed constants of the reference, not ImageNet's mean/std).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot be built because its backbone or head weights are not on this machine."""


def alexnet_features() -> nn.Sequential:
    """torchvision's `AlexNet.features` (indices 0..12)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
    )


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` (13 convs, 5 max-pools, indices 0..30)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


def default_backbone_path(net: str) -> Path | None:
    """The torchvision checkpoint for `net` in `$TORCH_HOME/hub/checkpoints` or `~/.cache/torch/hub/checkpoints`."""
    name = NETS[net][0]
    roots = [Path(os.environ["TORCH_HOME"])] if os.environ.get("TORCH_HOME") else []
    roots.append(Path.home() / ".cache" / "torch")
    for root in roots:
        path = root / "hub" / "checkpoints" / name
        if path.is_file():
            return path
    return None


def default_heads_path(net: str) -> Path:
    """The official linear heads `weights/v0.1/<net>.pth` inside the installed lpips package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSUnavailable(
            "LPIPS linear heads not found: install the `lpips` package (pip install --no-deps lpips) "
            "or pass the heads file (LPIPSConfig.heads / --lpips.heads=PATH)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"


def _unavailable(net: str, reason: str) -> LPIPSUnavailable:
    name = NETS[net][0]
    return LPIPSUnavailable(
        f"LPIPS ({net}) needs ImageNet backbone weights that cannot be downloaded here: {reason}. "
        f"Put torchvision's {name} on this machine (usually found in ~/.cache/torch/hub/checkpoints/) "
        f"and pass its path as LPIPSConfig.backbone (e.g. --lpips.backbone=/path/to/{name})."
    )


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _check_and_load(module: nn.Module, sd: dict[str, torch.Tensor], what: str, prefix: str = "") -> None:
    """Strict load that names missing, unexpected and mis-shaped keys instead of a bare size error."""
    own = module.state_dict()
    missing = [prefix + k for k in sorted(set(own) - set(sd))]
    unexpected = [prefix + k for k in sorted(set(sd) - set(own))]
    shapes = [
        f"{prefix}{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:4]}{' ...' if len(shapes) > 4 else ''}")
        raise ValueError(f"{what} does not match the expected architecture: " + "; ".join(parts))
    module.load_state_dict(sd)


def load_backbone(features: nn.Sequential, path: str | Path, net: str) -> None:
    """Load the `features.*` entries of a torchvision classifier checkpoint (`classifier.*` is ignored)."""
    path = Path(path)
    sd = _read(path)
    feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    if not feats:
        raise ValueError(
            f"{path} has no `features.*` keys; expected a torchvision {net} checkpoint ({NETS[net][0]}), "
            f"got keys like {sorted(sd)[:4]}"
        )
    _check_and_load(features, feats, f"backbone {path} for net={net!r}", prefix="features.")


def load_heads(lins: nn.ModuleList, path: str | Path, net: str) -> None:
    """Load the lpips package's `linK.model.1.weight` heads into 1x1 convs."""
    path = Path(path)
    sd = _read(path)
    # The reference wraps each conv as Sequential(Dropout, Conv2d), hence `.model.1.`.
    mapped = {k.replace(".model.1.", ".", 1).replace("lin", "", 1): v for k, v in sd.items()}
    _check_and_load(lins, mapped, f"heads {path} for net={net!r}", prefix="lin")


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


class LPIPS(nn.Module):
    """Frozen LPIPS distance: `forward(x, y)` on (B, 3, H, W) images in [-1, 1] returns (B,)."""

    def __init__(self, net: str = "alex", backbone_path: str | Path = "", heads_path: str | Path | None = None):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {sorted(NETS)}, got {net!r}")
        if not backbone_path:
            raise _unavailable(net, "no backbone path was given")
        if not Path(backbone_path).is_file():
            raise _unavailable(net, f"{backbone_path} does not exist")
        heads_path = Path(heads_path) if heads_path else default_heads_path(net)
        if not heads_path.is_file():
            raise LPIPSUnavailable(f"LPIPS linear heads file {heads_path} does not exist (LPIPSConfig.heads)")

        self.net = net
        _, self.taps, channels = NETS[net]
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        load_backbone(self.features, backbone_path, net)
        load_heads(self.lins, heads_path, net)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # A metric/loss: always eval, even inside a model that is switched to train().
        return super().train(False)

    def tap(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features at the LPIPS taps of images already shifted/scaled."""
        out = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(_unit(x))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) images of equal shape, got {x.shape} and {y.shape}")
        # One backbone pass over both images halves the per-layer call overhead.
        b = x.shape[0]
        feats = self.tap((torch.cat([x, y]) - self.shift) / self.scale)
        dist = x.new_zeros(b)
        for f, lin in zip(feats, self.lins):
            dist = dist + lin((f[:b] - f[b:]).pow(2)).mean(dim=(1, 2, 3))
        return dist


def lpips_video(metric: LPIPS, x: torch.Tensor, y: torch.Tensor, frames_per_batch: int = 0) -> torch.Tensor:
    """LPIPS of (B, C, T, H, W) videos in [-1, 1]: per frame, then mean over frames -> (B,)."""
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"lpips_video expects two (B, C, T, H, W) videos of equal shape, got {x.shape} and {y.shape}")
    b, t = x.shape[0], x.shape[2]
    xf = rearrange(x, "b c t h w -> (b t) c h w")
    yf = rearrange(y, "b c t h w -> (b t) c h w")
    n = frames_per_batch or xf.shape[0]  # chunking bounds memory on long clips
    d = torch.cat([metric(xf[i : i + n], yf[i : i + n]) for i in range(0, xf.shape[0], n)])
    return rearrange(d, "(b t) -> b t", b=b, t=t).mean(dim=1)


def build_lpips(cfg: LPIPSConfig) -> LPIPS:
    """LPIPS from a config; an empty backbone path falls back to the torch hub cache, else LPIPSUnavailable."""
    cfg.validate()
    backbone = cfg.backbone or default_backbone_path(cfg.net)
    if not backbone:
        raise _unavailable(cfg.net, "LPIPSConfig.backbone is empty and the torch hub cache does not have it")
    return LPIPS(cfg.net, backbone, cfg.heads or None)


@functools.lru_cache(maxsize=4)
def _cached(net: str, backbone: str, heads: str) -> LPIPS:
    return build_lpips(LPIPSConfig(net, backbone, heads))


def lpips(x: torch.Tensor, y: torch.Tensor, metric: LPIPS | LPIPSConfig | None = None) -> torch.Tensor:
    """LPIPS per video (B,) of (B, C, T, H, W) videos in [-1, 1]: per frame, mean over frames (no gradients).

    `metric` is a built LPIPS, or a config (built once and cached); the default is AlexNet with its backbone from
    the torch hub cache. Raises LPIPSUnavailable when the weights are not on this machine.
    """
    if not isinstance(metric, LPIPS):
        cfg = metric or LPIPSConfig()
        metric = _cached(cfg.net, cfg.backbone, cfg.heads)
    if x.ndim == 4:  # (C, T, H, W): one video, as psnr / ssim take it
        x, y = x[None], y[None]
    p = metric.shift
    with torch.no_grad():
        # Frames go through the backbone 16 at a time: a long clip in one batch would hold all its activations.
        return lpips_video(metric, x.to(p.device, p.dtype), y.to(p.device, p.dtype), frames_per_batch=16).float()
