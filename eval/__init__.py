"""cinedit.eval: per-video metrics (psnr, ssim, lpips), reconstruction reports, VBench, benchmarks and parity checks.

`cinedit.eval.lpips` is the metric function; the LPIPS network itself is imported from its module as usual
(`from cinedit.eval.lpips import LPIPS, LPIPSConfig, build_lpips`).
"""

from cinedit.eval.lpips import lpips
from cinedit.eval.metrics import psnr, ssim

__all__ = ["lpips", "psnr", "ssim"]
