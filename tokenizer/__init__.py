"""cinedit.tokenizer: the Video DC-AE and what trains and scores it. Above `cinedit.data`; the generator and the
eval suite build on it.

- `model` + `math`: the network and its presets; `loading`: model folders, the release file, image DC-AE inflation
- `losses`: L1 + LPIPS and the 3D PatchGAN; `metrics`: PSNR, SSIM; `lpips`: the LPIPS network and metric
- `tiling`: tiled encode / decode; `train`, `commands`: `cinedit tokenizer train | reconstruct | encode | decode`
"""

from cinedit.tokenizer.loading import init_from_image_dcae, load_pretrained, save_pretrained
from cinedit.tokenizer.model import PRESETS, DCAEConfig, VideoDCAE, config_from_reference, load_weights

__all__ = [
    "PRESETS",
    "DCAEConfig",
    "VideoDCAE",
    "config_from_reference",
    "init_from_image_dcae",
    "load_pretrained",
    "load_weights",
    "save_pretrained",
]
