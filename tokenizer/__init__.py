"""cinedit.tokenizer: the Video DC-AE and what trains and scores it. Above `cinedit.data`; the generator and the
eval suite build on it.

- `model` + `math`: the network and its presets; `loading`: model folders, the release files (`load_tokenizer` reads
  all three tokenizers), image DC-AE inflation
- `hunyuan`, `flux_ae`: the HunyuanVideo VAE and the Flux AE (diffusers networks behind the DC-AE's interface)
- `losses`: L1 + LPIPS and the 3D PatchGAN; `metrics`: PSNR, SSIM; `lpips`: the LPIPS network and metric
- `tiling`: tiled encode / decode; `train`, `commands`: `cinedit tokenizer train | reconstruct | encode | decode`
"""

from cinedit.tokenizer.flux_ae import FluxAE, FluxAEConfig
from cinedit.tokenizer.hunyuan import HunyuanVAE, HunyuanVAEConfig
from cinedit.tokenizer.loading import init_from_image_dcae, load_pretrained, load_tokenizer, save_pretrained
from cinedit.tokenizer.model import PRESETS, DCAEConfig, VideoDCAE, config_from_reference, load_weights

__all__ = [
    "PRESETS",
    "DCAEConfig",
    "FluxAE",
    "FluxAEConfig",
    "HunyuanVAE",
    "HunyuanVAEConfig",
    "VideoDCAE",
    "config_from_reference",
    "init_from_image_dcae",
    "load_pretrained",
    "load_tokenizer",
    "load_weights",
    "save_pretrained",
]
