"""Euler sampling of the rectified flow with text and image classifier-free guidance.

Image-to-video runs three passes per step, batched as [text + image, empty text + image, empty text + no image]
(the last with the condition tokens zeroed) and combines v = v3 + g_img (v2 - v3) + g_txt (v1 - v2). Text-only
sampling runs two passes, v = v2 + g_txt (v1 - v2). The velocity model is any callable
`model(img, img_ids, txt, txt_ids, timesteps, vec, cond=None)` on packed tokens (vec: the pooled text vector).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cinedit.configs.generator import SamplerConfig
from cinedit.generator.conditions import Condition
from cinedit.generator.flow import get_schedule, token_count
from cinedit.generator.math import make_ids, make_txt_ids, pack, unpack

OSCI_START = 10  # oscillating guidance leaves the first steps alone
WRITE_BACK = ("all", "first", "none")


def _oscillate(scale: float, step: int, on: bool) -> float:
    return 1.0 if on and step >= OSCI_START and step % 2 == 1 else scale


def guidance_scales(
    step: int, num_steps: int, num_latent_frames: int, cfg: SamplerConfig
) -> tuple[float, torch.Tensor]:
    """(text scale, image scale per latent frame (T,) float32) applied at a step.

    With temporal_osci and an image scale above 1, the image scale rises linearly over the latent frames from 1 at
    frame 0 (next to the given image) to an upper bound that itself falls linearly from g_img to 1 over the steps.
    """
    text_gs = _oscillate(cfg.guidance, step, cfg.text_osci)
    image_gs = _oscillate(cfg.guidance_img, step, cfg.image_osci)
    if cfg.temporal_osci and image_gs > 1.0:
        upper = torch.linspace(image_gs, 1.0, num_steps + 1)[step]
        return text_gs, torch.linspace(1.0, float(upper), num_latent_frames)
    return text_gs, torch.full((num_latent_frames,), float(image_gs))


def euler_step(x: torch.Tensor, pred: torch.Tensor, t_curr: float, t_next: float) -> torch.Tensor:
    """One Euler step of dx/dt = pred from t_curr to t_next (t_next < t_curr when sampling)."""
    return x + (t_next - t_curr) * pred


def _rows(x: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    # per-sample inputs (batch or 1 rows) -> n * batch rows
    return torch.cat([x.expand(batch, *x.shape[1:])] * n)


def denoise(
    model: Callable[..., torch.Tensor],
    img: torch.Tensor,
    img_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    vec: torch.Tensor,
    neg_txt: torch.Tensor,
    neg_vec: torch.Tensor,
    timesteps: list[float] | torch.Tensor,
    cfg: SamplerConfig,
    cond: torch.Tensor | None = None,
    image_guidance: bool = True,
    num_frames: int | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate packed noise img (B, L, D) from timesteps[0] to timesteps[-1]; returns the packed result.

    Args:
        neg_txt, neg_vec: the empty (negative) prompt, one row or B rows.
        cond: packed condition tokens (B, L, D_cond); with image_guidance (and cond) three passes per step,
            else two (cond, if any, is then given to both).
        num_frames: latent frames for the per-frame image scale (default: from the t column of img_ids).
        on_step: called as on_step(step, img, raw model output) before each update.
    """
    cfg.validate()
    timesteps = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    batch = img.shape[0]
    three = cond is not None and image_guidance
    n = 3 if three else 2
    neg_vec = neg_vec.reshape(-1, vec.shape[-1])
    txt_all = torch.cat([_rows(txt, batch, 1), _rows(neg_txt, batch, n - 1)])
    vec_all = torch.cat([_rows(vec, batch, 1), _rows(neg_vec, batch, n - 1)])
    img_ids_all, txt_ids_all = _rows(img_ids, batch, n), _rows(txt_ids, batch, n)
    cond_all = None
    if cond is not None:
        cond_all = torch.cat([cond, cond, torch.zeros_like(cond)] if three else [cond, cond])
    frame = img_ids[..., 0].long().expand(batch, -1)  # latent frame of each token
    num_frames = num_frames or int(frame.max()) + 1
    for step, (t_curr, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((n * batch,), t_curr, dtype=img.dtype, device=img.device)
        raw = model(torch.cat([img] * n), img_ids_all, txt_all, txt_ids_all, t_vec, vec_all, cond=cond_all)
        text_gs, image_gs = guidance_scales(step, len(timesteps) - 1, num_frames, cfg)
        if three:
            v1, v2, v3 = raw.chunk(3)
            image_gs = image_gs.to(img)[frame].unsqueeze(-1)  # (B, L, 1)
            pred = v3 + image_gs * (v2 - v3) + text_gs * (v1 - v2)
        else:
            v1, v2 = raw.chunk(2)
            pred = v2 + text_gs * (v1 - v2)
        if on_step is not None:
            on_step(step, img, raw)
        img = euler_step(img, pred, t_curr, t_next)
    return img


@torch.no_grad()
def sample(
    model: Callable[..., torch.Tensor],
    cfg: SamplerConfig,
    shape: tuple[int, int, int, int, int],
    patch_size: int,
    txt: torch.Tensor,
    vec: torch.Tensor,
    neg_txt: torch.Tensor,
    neg_vec: torch.Tensor,
    condition: Condition | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    write_back: str = "all",
    trace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample latents (B, C, T, H, W) from seeded noise; the given region of the condition is written back.

    condition=None is for models without a condition input; an all-zero (t2v) condition is given to the model
    but needs no image guidance, so it samples with two passes. The noise is one draw of the whole (B, ...) shape
    from a CPU generator seeded with cfg.seed, as the release draws it (so it is the same on any device).

    Args:
        write_back: "all" (every sample's given region), "first" (only batch item 0's, as the release does) or
            "none".
        trace: if given, filled with the noise `z`, `timesteps`, `trajectory` (steps + 1, B, L, C: the model
            input per step, the result last), `model_outputs` (steps, passes * B, L, C) and `denoised`.
    """
    cfg.validate()
    if write_back not in WRITE_BACK:
        raise ValueError(f"write_back must be one of {WRITE_BACK}, got {write_back!r}")
    b, _, t, h, w = shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))  # on CPU: same on any device
    img = pack(noise.to(device, dtype), patch_size)
    img_ids = make_ids(t, h // patch_size, w // patch_size, batch=b, device=device)
    timesteps = get_schedule(cfg.num_steps, token_count(h, w, patch_size), t, cfg.shift, cfg.shift_alpha)
    cond = None
    if condition is not None:
        condition = Condition(condition.mask.to(device, dtype), condition.masked_ref.to(device, dtype))
        cond = condition.tokens(patch_size)
    txt, vec, neg_txt, neg_vec = (x.to(device, dtype) for x in (txt, vec, neg_txt, neg_vec))
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    on_step = None if trace is None else (lambda _i, x, raw: steps.append((x.float().cpu(), raw.float().cpu())))
    out = denoise(
        model,
        img,
        img_ids,
        txt,
        make_txt_ids(b, txt.shape[1], device=device),
        vec,
        neg_txt,
        neg_vec,
        timesteps,
        cfg,
        cond=cond,
        image_guidance=condition is not None and condition.has_given,
        num_frames=t,
        on_step=on_step,
    )
    if trace is not None:
        trace.update(_trace(noise, timesteps, steps, out))
    x = unpack(out, patch_size, t, h, w)
    if condition is None or write_back == "none":
        return x
    if write_back == "first":
        x = x.clone()
        x[:1] = Condition(condition.mask[:1], condition.masked_ref[:1]).write_back(x[:1])
        return x
    return condition.write_back(x)


def _trace(noise, timesteps, steps, out) -> dict[str, torch.Tensor]:
    return {
        "z": noise,
        "timesteps": torch.as_tensor(timesteps, dtype=torch.float32),
        "trajectory": torch.stack([x for x, _ in steps] + [out.float().cpu()]),
        "model_outputs": torch.stack([raw for _, raw in steps]),
        "denoised": out.float().cpu(),
    }


@torch.no_grad()
def sample_distilled(
    model: Callable[..., torch.Tensor],
    shape: tuple[int, int, int, int, int],
    patch_size: int,
    txt: torch.Tensor,
    vec: torch.Tensor,
    num_steps: int,
    guidance: float,
    seed: int,
    shift: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A guidance-distilled model (Flux.1-dev) without classifier-free guidance: one pass per step with the
    guidance strength as an input, `img += (t_next - t) * model(img, ..., guidance=g)`; latents (B, C, T, H, W)."""
    b, _, t, h, w = shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    img = pack(noise.to(device, dtype), patch_size)
    img_ids = make_ids(t, h // patch_size, w // patch_size, batch=b, device=device)
    txt, vec = txt.to(device, dtype), vec.to(device, dtype)
    txt_ids = make_txt_ids(b, txt.shape[1], device=device)
    timesteps = get_schedule(num_steps, token_count(h, w, patch_size), t, shift).tolist()
    g = torch.full((b,), float(guidance), dtype=dtype, device=device)
    steps = []
    for t_curr, t_next in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((b,), t_curr, dtype=dtype, device=device)
        pred = model(img, img_ids, txt, txt_ids, t_vec, vec, guidance=g)
        if trace is not None:
            steps.append((img.float().cpu(), pred.float().cpu()))
        img = euler_step(img, pred, t_curr, t_next)
    if trace is not None:
        trace.update(_trace(noise, timesteps, steps, img))
    return unpack(img, patch_size, t, h, w)
