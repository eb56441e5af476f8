"""Video DC-AE training losses: L1 (+ squared error) + LPIPS reconstruction, and the adversarial phase's 3D PatchGAN.

Phase 1 trains on `ReconstructionLoss` alone (L1 + 0.5 * LPIPS on VGG16 features, per frame; no KL: the
autoencoder is deterministic), optionally plus `latent_regulariser` (a penalty on the latents' second moment).
Phase 2 adds `PatchDiscriminator3D` with the hinge loss; the generator's adversarial term is weighted adaptively
(`adaptive_weight`) so its gradient at the decoder's last layer stays commensurate with the reconstruction gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cinedit.configs.tokenizer import DiscConfig, LossConfig
from cinedit.tokenizer.lpips import LPIPS, build_lpips, lpips_video


class ReconstructionLoss(nn.Module):
    """l1_weight * |x - rec| + mse_weight * (x - rec)^2 + lpips_weight * LPIPS(x, rec) per frame, each a mean over
    the batch -> scalar."""

    def __init__(
        self,
        l1_weight: float = 1.0,
        lpips_weight: float = 0.0,
        lpips: LPIPS | None = None,
        chunk: int = 0,
        mse_weight: float = 0.0,
    ):
        super().__init__()
        if lpips_weight > 0 and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS network")
        self.l1_weight, self.lpips_weight, self.chunk, self.mse_weight = l1_weight, lpips_weight, chunk, mse_weight
        self.lpips = lpips if lpips_weight > 0 else None

    def forward(self, x: Tensor, rec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, rec = x.float(), rec.float()
        l1 = (x - rec).abs().mean()
        parts = {"l1": l1.detach()}
        loss = self.l1_weight * l1
        if self.mse_weight > 0:
            mse = (x - rec).square().mean()
            parts["mse"] = mse.detach()
            loss = loss + self.mse_weight * mse
        if self.lpips is not None:
            p = lpips_video(self.lpips, rec, x, self.chunk).mean()
            parts["lpips"] = p.detach()
            loss = loss + self.lpips_weight * p
        return loss, parts


def latent_regulariser(z: Tensor, weight: float) -> Tensor:
    """weight * mean(z^2) (in float32): a penalty on the latents' second moment, so on their scale and their mean.

    The encoder's output has no normalisation and the decoder's blocks are RMSNorm'd, so nothing in the
    reconstruction loss fixes the latent scale: without this term it drifts (the `debug` preset reached a std of
    ~2e4, with image latents far smaller than video ones). Exactly 0 (no graph) when weight is 0.
    """
    if weight == 0:
        return torch.zeros((), device=z.device)
    return weight * z.float().square().mean()


def latent_moments(z: Tensor) -> tuple[float, float, float]:
    """(count, sum, sum of squares) of z in float64: summed over batches / ranks, they give a mean and std."""
    z = z.detach().double()
    return float(z.numel()), float(z.sum()), float(z.square().sum())


def moments_std(count: float, total: float, squares: float) -> tuple[float, float]:
    """(mean, std) from `latent_moments` sums (population std, floored at 0)."""
    mean = total / count
    return mean, max(squares / count - mean * mean, 0.0) ** 0.5


def build_reconstruction_loss(cfg: LossConfig) -> ReconstructionLoss:
    """The loss of a config; with lpips_weight > 0 and no VGG16 backbone file it raises `LPIPSUnavailable`."""
    cfg.validate()
    metric = build_lpips(cfg.lpips) if cfg.lpips_weight > 0 else None
    return ReconstructionLoss(cfg.l1_weight, cfg.lpips_weight, metric, cfg.lpips_frames_per_batch, cfg.mse_weight)


class PatchDiscriminator3D(nn.Module):
    """NLayer PatchGAN made 3D: (b, 3, t, h, w) -> patch logits (b, 1, t', h', w').

    `layers` strided convs (kernel (3, 4, 4), stride 2, padding 1; BatchNorm3d + LeakyReLU 0.2 after all but the
    first), widths filters * min(2^i, 8), then a stride-1 conv + BatchNorm3d + LeakyReLU and a stride-1 conv to
    one logit per patch. The temporal kernel is 3 rather than 4 so that a single frame (an image, t = 1) keeps
    one temporal position at every layer; 5 layers need h, w >= 32, which every DC-AE input satisfies. The
    final convs are 3x3x3 with padding 1 so small inputs keep their last patch.
    """

    def __init__(self, in_channels: int = 3, filters: int = 64, layers: int = 5):
        super().__init__()
        ops: list[nn.Module] = []
        c_prev = in_channels
        for i in range(layers):
            c = filters * min(2**i, 8)
            ops.append(nn.Conv3d(c_prev, c, (3, 4, 4), stride=2, padding=1, bias=i == 0))
            if i > 0:
                ops.append(nn.BatchNorm3d(c))
            ops.append(nn.LeakyReLU(0.2, inplace=True))
            c_prev = c
        c = filters * min(2**layers, 8)
        ops += [
            nn.Conv3d(c_prev, c, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm3d(c),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c, 1, 3, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*ops)
        self.layers = layers
        self.init_weights()

    def init_weights(self) -> None:
        """The usual PatchGAN init: conv weights N(0, 0.02), BatchNorm gains N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        min_side = 2**self.layers
        if x.ndim != 5 or min(x.shape[-2:]) < min_side:
            raise ValueError(f"expected (b, c, t, h, w) with h, w >= {min_side}, got {tuple(x.shape)}")
        return self.main(x)


def build_discriminator(cfg: DiscConfig) -> PatchDiscriminator3D:
    cfg.validate()
    return PatchDiscriminator3D(3, cfg.filters, cfg.layers)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) (the VQGAN convention)."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """The generator's side of the hinge game: -mean(logits_fake)."""
    return -logits_fake.mean()


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, max_weight], detached.

    Both losses must still hold their graphs (this uses `retain_graph`); call before `backward`.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


__all__ = [
    "DiscConfig",
    "LossConfig",
    "PatchDiscriminator3D",
    "ReconstructionLoss",
    "adaptive_weight",
    "build_discriminator",
    "build_reconstruction_loss",
    "generator_adv_loss",
    "hinge_d_loss",
    "latent_moments",
    "latent_regulariser",
    "moments_std",
]
