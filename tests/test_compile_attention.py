"""Regional compile (each block of the MMDiT and the DC-AE compiled on its own) equals eager, and the attention
function picks FlashAttention-3 / 2 when installed (CUDA, bf16 / fp16) and falls back to SDPA.

The tests compile with the `aot_eager` backend (Dynamo capture + AOTAutograd, no code generation): Inductor's C++
code generation takes minutes for these models on a 2-core CPU; `cinedit eval bench` times Inductor."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from cinedit.cli import main
from cinedit.configs.generator import PRESETS as CONFIGS
from cinedit.generator import math as gmath
from cinedit.generator.model import PRESETS, MMDiT
from cinedit.tokenizer.model import PRESETS as DCAE_PRESETS
from cinedit.tokenizer.model import VideoDCAE


def inputs(b: int = 2, side: int = 6, lt: int = 5):
    torch.manual_seed(1)
    n = side * side
    ids = torch.zeros(b, n, 3)
    ids[..., 1], ids[..., 2] = torch.arange(n) // side, torch.arange(n) % side
    return torch.randn(b, n, 16), ids, torch.randn(b, lt, 48), torch.zeros(b, lt, 3), torch.rand(b), torch.randn(b, 32)


def test_compiled_mmdit_equals_eager_forward_and_backward():
    torch.manual_seed(0)
    eager = MMDiT(PRESETS["debug"]())
    compiled = MMDiT(PRESETS["debug"]())
    compiled.load_state_dict(eager.state_dict())
    blocks = compiled.compile_blocks(backend="aot_eager")
    assert len(blocks) == 4 and list(compiled.state_dict()) == list(eager.state_dict())
    x = inputs()
    a, b = eager(*x), compiled(*x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_dcae_equals_eager():
    torch.manual_seed(0)
    eager = VideoDCAE(DCAE_PRESETS["debug"]()).eval()
    compiled = VideoDCAE(DCAE_PRESETS["debug"]()).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile_blocks(backend="aot_eager")
    x = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        za, zb = eager.encode(x), compiled.encode(x)
        torch.testing.assert_close(zb, za, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.decode(za), eager.decode(za), rtol=1e-5, atol=1e-5)


def test_the_trainer_compiles_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(MMDiT, "compile_blocks", lambda self, **kw: calls.append(type(self).__name__))
    argv = ["generator", "train", "debug", "--data.mock=true", "--data.mock_samples=2", "--model.compile=true"]
    assert main([*argv, f"--train.out_dir={tmp_path}", "--train.steps=1", "--train.progress=false"]) == 0
    assert calls == ["MMDiT"]
    assert CONFIGS["stage1_256px_t2v"]().model.compile and not CONFIGS["debug"]().model.compile


def fake_flash_module() -> types.ModuleType:
    """A stand-in FlashAttention package: `flash_attn_func` on (b, l, heads, d), computed with SDPA."""
    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    mod.flash_attn_func = flash_attn_func
    return mod


def test_attention_picks_flash_attention_when_installed_and_falls_back_to_sdpa(monkeypatch):
    gmath.flash_function.cache_clear()
    monkeypatch.delenv("CINEDIT_ATTENTION", raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # FA3 not installed
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert gmath.attention_backend("cuda", torch.bfloat16) == "sdpa"
    gmath.flash_function.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module())
    assert gmath.attention_backend("cuda", torch.bfloat16) == "fa2"
    assert gmath.attention_backend("cuda", torch.float32) == "sdpa"  # FlashAttention takes bf16 / fp16 only
    assert gmath.attention_backend("cpu", torch.bfloat16) == "sdpa"
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    torch.testing.assert_close(gmath.flash_attention(gmath.flash_function("fa2"), q, k, v), gmath.attention(q, k, v))
    monkeypatch.setenv("CINEDIT_ATTENTION", "fa3")
    with pytest.raises(ValueError, match="flash_attn_interface is not installed"):
        gmath.attention_backend("cuda", torch.bfloat16)
    monkeypatch.setenv("CINEDIT_ATTENTION", "fa2")
    assert gmath.attention_backend("cpu", torch.float32) == "fa2"
    gmath.flash_function.cache_clear()
