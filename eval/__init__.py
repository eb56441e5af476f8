"""cinedit.eval: reconstruction reports, VBench, benchmarks and parity checks, on top of every subsystem.

The per-video metrics live one layer down, where the tokenizer's loss and validation use them too
(`cinedit.tokenizer.metrics`: PSNR, SSIM; `cinedit.tokenizer.lpips`: the LPIPS network and metric); they are
re-exported here as the eval suite's metric functions: `from cinedit.eval import psnr, ssim, lpips`.
"""

from cinedit.tokenizer.lpips import lpips
from cinedit.tokenizer.metrics import psnr, ssim

__all__ = ["lpips", "psnr", "ssim"]
