"""Fused kernels (`cinedit.generator.math`): the selection falls back to the plain path on CPU and without the
package, and where Liger-Kernel runs (CUDA + `liger_kernel`) the fused RMSNorm equals the plain one."""

from __future__ import annotations

import pytest
import torch

from cinedit.generator import math as gmath


def test_cpu_takes_the_plain_rms_norm(monkeypatch):
    x, w = torch.randn(3, 5, 64), torch.rand(64) + 0.5
    assert gmath.rms_norm_backend(x, w) == "plain"
    assert torch.equal(gmath.rms_norm(x, w), gmath.rms_norm_plain(x, w))
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    assert torch.allclose(gmath.rms_norm(x, w), want, atol=1e-6)
    monkeypatch.setenv("CINEDIT_FUSED", "2")
    with pytest.raises(ValueError, match="CINEDIT_FUSED"):
        gmath.fused_enabled()


def test_fused_switch_turns_the_fused_path_off(monkeypatch):
    monkeypatch.setenv("CINEDIT_FUSED", "0")
    assert not gmath.fused_enabled()
    x = torch.randn(2, 8)
    assert gmath.rms_norm_backend(x, torch.ones(8)) == "plain"


needs_liger = pytest.mark.skipif(
    not (torch.cuda.is_available() and gmath.liger_rms_norm() is not None), reason="needs CUDA and liger_kernel"
)


@needs_liger
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_liger_rms_norm_equals_the_plain_path(dtype, atol):
    torch.manual_seed(0)
    x = torch.randn(4, 77, 256, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(256, device="cuda", dtype=dtype)).requires_grad_()
    assert gmath.rms_norm_backend(x, w) == "liger"
    g = torch.randn_like(x)
    results = []
    for fn in (gmath.rms_norm_plain, gmath.rms_norm):
        x.grad = w.grad = None
        y = fn(x, w, 1e-6)
        y.backward(g)
        results.append((y.detach().float(), x.grad.float(), w.grad.float()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=atol, rtol=atol), (a - b).abs().max()
