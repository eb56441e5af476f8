"""cinedit.eval: metrics (PSNR, SSIM, LPIPS), parity checks, reports and benchmarks."""

from cinedit.eval.metrics import psnr, ssim

__all__ = ["psnr", "ssim"]
