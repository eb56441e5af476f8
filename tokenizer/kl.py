"""What the two KL tokenizers (the HunyuanVideo VAE and the Flux AE) share: the posterior's clamp and sampling, the
spatial size check, and the generator-side scaling `scaling_factor * (z - shift_factor)`.

A subclass provides `config` (with `scaling_factor`, `shift_factor`), `latent_shape`, `posterior(x) -> (mean,
logvar)` and `decode(z, num_frames=None)`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LOGVAR_RANGE = (-30.0, 20.0)  # the reference's clamp of the posterior log-variance


def sample_gaussian(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """mean + exp(logvar / 2) * eps, eps ~ N(0, 1) of mean's shape.

    eps is drawn in float32 on the generator's device (the CPU for None, i.e. the global torch RNG) and then moved,
    so a seed gives the same draw on every device and dtype, as in the reference.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)


def check_spatial(height: int, width: int, s: int) -> None:
    """Raise ValueError unless height and width are positive multiples of `s`, naming the sizes that work."""
    if height % s or width % s or height < s or width < s:
        fix = [f"{max(s, v // s * s)}" + (f" or {v // s * s + s}" if v % s else "") for v in (height, width)]
        raise ValueError(
            f"height and width must be multiples of {s}, got {height}x{width}: use height {fix[0]}, width {fix[1]}"
        )


class KLTokenizer(nn.Module):
    """The interface both KL tokenizers share with the Video DC-AE (`encode` / `decode` unscaled, `encode_latents` /
    `decode_latents` as the generator sees latents)."""

    native_tiling = True  # tiles itself (or needs no tiling); the DC-AE tiler must not cut it

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    def clamped(self, moments: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of the encoder's moments (b, 2c, ...), logvar clamped as the reference does."""
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Unscaled latent: the posterior mean, or a posterior sample (`sample`; the global RNG if no generator)."""
        mean, logvar = self.posterior(x)
        return sample_gaussian(mean, logvar, generator) if sample else mean

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x (posterior mean), with the same shape as x."""
        return self.decode(self.encode(x), num_frames=x.shape[2])

    def encode_latents(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Latents as the generator sees them (the reference's `encode`): scaling_factor * (encode(x) - shift)."""
        return self.scaling_factor * (self.encode(x, sample, generator) - self.shift_factor)

    def decode_latents(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Inverse of `encode_latents`: decode(z / scaling_factor + shift)."""
        return self.decode(z / self.scaling_factor + self.shift_factor, num_frames)


__all__ = ["LOGVAR_RANGE", "KLTokenizer", "check_spatial", "sample_gaussian"]
