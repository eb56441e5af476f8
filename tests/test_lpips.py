"""LPIPS on seeded random backbones in torchvision's key layout and the lpips package's real linear heads."""

from __future__ import annotations

import pytest
import torch

from cinedit.tokenizer.lpips import (
    LPIPS,
    NETS,
    LPIPSConfig,
    LPIPSUnavailable,
    alexnet_features,
    build_lpips,
    default_heads_path,
    lpips,
    lpips_video,
    vgg16_features,
)


def _save_backbone(path, net: str, seed: int = 0) -> str:
    """A torchvision-style classifier checkpoint: `features.*` plus `classifier.*` keys LPIPS must ignore."""
    torch.manual_seed(seed)
    feats = alexnet_features() if net == "alex" else vgg16_features()
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.1.weight"] = torch.randn(8, 16)
    sd["classifier.1.bias"] = torch.randn(8)
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions: extra intra-op threads only spin against each other on a busy 2-core runner (5x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["alex", "vgg"])
def metric(request, tmp_path_factory) -> LPIPS:
    path = _save_backbone(tmp_path_factory.mktemp("lpips") / f"{request.param}.pth", request.param)
    return LPIPS(request.param, backbone_path=path)


def _images(b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 48, 48, generator=g) * 2 - 1


def test_identical_is_zero_and_different_is_positive(metric):
    x, y = _images(seed=1), _images(seed=2)
    assert torch.equal(metric(x, x), torch.zeros(2))
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()


def test_symmetric(metric):
    x, y = _images(seed=1), _images(seed=2)
    torch.testing.assert_close(metric(x, y), metric(y, x))


def test_monotonic_in_noise_scale(metric):
    x = _images(b=1, seed=3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    d = torch.cat([metric(x, (x + s * noise).clamp(-1, 1)) for s in (0.02, 0.05, 0.1, 0.2, 0.4)])
    assert (d[1:] > d[:-1]).all(), d


def test_batch_equals_per_image(metric):
    x, y = _images(b=3, seed=5), _images(b=3, seed=6)
    single = torch.cat([metric(x[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(metric(x, y), single, atol=1e-6, rtol=1e-5)


def test_gradients_reach_inputs_not_weights(metric):
    x, y = _images(seed=7), _images(seed=8)
    x.requires_grad_(True)
    metric(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in metric.parameters())
    metric.train()
    assert not metric.training


def test_video_is_mean_over_frames(metric):
    g = torch.Generator().manual_seed(9)
    x = torch.rand(2, 3, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    manual = torch.stack([metric(x[:, :, t], y[:, :, t]) for t in range(3)], dim=1).mean(dim=1)
    torch.testing.assert_close(lpips_video(metric, x, y), manual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lpips_video(metric, x, y, frames_per_batch=4), manual, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_heads_come_from_lpips_package(net, tmp_path):
    heads = torch.load(default_heads_path(net), map_location="cpu", weights_only=True)
    m = LPIPS(net, backbone_path=_save_backbone(tmp_path / "b.pth", net))
    for k, (lin, c) in enumerate(zip(m.lins, NETS[net][2])):
        assert lin.weight.shape == (1, c, 1, 1)
        assert torch.equal(lin.weight, heads[f"lin{k}.model.1.weight"])
        # The official heads are trained with clamped non-negative weights.
        assert (lin.weight >= 0).all() and lin.weight.sum() > 0


def test_missing_backbone_is_unavailable(tmp_path, monkeypatch):
    # An empty path falls back to the hub cache; point both cache roots at an empty folder.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    for cfg in (LPIPSConfig(net="alex"), LPIPSConfig(net="alex", backbone=str(tmp_path / "nope.pth"))):
        with pytest.raises(LPIPSUnavailable) as err:
            build_lpips(cfg)
        msg = str(err.value)
        assert "cannot be downloaded" in msg and "alexnet-owt-7be5be79.pth" in msg
        assert "~/.cache/torch/hub/checkpoints" in msg and "LPIPSConfig.backbone" in msg
    with pytest.raises(LPIPSUnavailable, match="vgg16-397923af.pth"):
        build_lpips(LPIPSConfig(net="vgg"))


def test_build_finds_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    _save_backbone(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth", "alex")
    m = build_lpips(LPIPSConfig())
    x = _images(b=1)
    assert m(x, x).item() == 0.0


def test_wrong_architecture_is_a_clear_error(tmp_path):
    vgg = _save_backbone(tmp_path / "vgg.pth", "vgg")
    with pytest.raises(ValueError, match=r"net='alex'.*(unexpected keys|shape mismatch)"):
        LPIPS("alex", backbone_path=vgg)
    with pytest.raises(ValueError, match="shape mismatch"):
        LPIPS("alex", backbone_path=_save_backbone(tmp_path / "alex.pth", "alex"), heads_path=default_heads_path("vgg"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no `features"):
        LPIPS("alex", backbone_path=tmp_path / "other.pth")


def test_config_validates_net():
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPSConfig(net="squeeze").validate()


def test_lpips_function_per_video(tmp_path):
    """`cinedit.eval.lpips`: videos in, one value per video, from a config whose backbone is a local file."""
    import cinedit.eval

    path = _save_backbone(tmp_path / "alex.pth", "alex", seed=5)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, 3, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    cfg = LPIPSConfig(net="alex", backbone=path)
    d = cinedit.eval.lpips(x, y, cfg)
    assert cinedit.eval.lpips is lpips and d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, lpips_video(LPIPS("alex", backbone_path=path), x, y), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lpips(x[0], y[0], cfg), d[:1])  # one (C, T, H, W) video
    assert torch.equal(lpips(x, x, cfg), torch.zeros(2))
    with pytest.raises(LPIPSUnavailable, match="cannot be downloaded"):
        lpips(x, y, LPIPSConfig(net="alex", backbone=str(tmp_path / "missing.pth")))
