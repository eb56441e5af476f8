"""cinedit.generator: the MMDiT video generator and what trains and samples it (model, RoPE/attention math, loading,
text encoders, rectified flow, conditions, sampler, trainer, `cinedit generator sample`, and `cinedit data cache`,
which needs the tokenizer and the text encoders). Above `cinedit.tokenizer`; the eval suite and the demo build on it.

Importing it (or `cinedit.generator.model`) loads no parallelism: the context-parallel attention and activation
checkpointing are in `cinedit.generator.parallel`, applied from outside by the trainer.
"""

from cinedit.generator.loading import infer_config, load_pretrained, save_pretrained
from cinedit.generator.math import make_ids, make_txt_ids, pack, unpack
from cinedit.generator.model import PRESETS, MMDiT, MMDiTConfig, config_from_reference

__all__ = [
    "PRESETS",
    "MMDiT",
    "MMDiTConfig",
    "config_from_reference",
    "infer_config",
    "load_pretrained",
    "make_ids",
    "make_txt_ids",
    "pack",
    "unpack",
    "save_pretrained",
]
