"""Parity of the KL tokenizers with the reference: the HunyuanVideo VAE (`hunyuanvae_*` fixtures) and the Flux 2D
autoencoder (`flux_ae_*`). Each fixture's model is rebuilt from its recorded reference config, loaded strictly with
the release's key names, and every stored output is recomputed: posterior mean and log-variance, the scaled latent,
its decode, the seeded posterior sample with its noise and decode, and (image fixtures) per-module hook outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from cinedit.eval.parity import Comparison, FixtureError, ParityReport, _weights
from cinedit.tokenizer import flux_ae, hunyuan

# The fixture README's suggestions for an fp32 CPU re-implementation: (atol, rtol) for latents and for pixels.
HUNYUAN_TOLERANCES = {"latent": (2e-5, 0.0), "decoded": (1e-4, 1e-4)}
FLUX_AE_TOLERANCES = {"latent": (1e-5, 0.0), "decoded": (1e-4, 0.0)}
PIXEL_OUTPUTS = ("decoded", "decoded_from_sampled")
# Hook outputs past the latent (decoder side) carry pixel-scale values and take the pixel tolerance.
DECODER_SIDE = ("decoder.", "post_quant_conv")
NOT_OUTPUTS = ("input",)


def _resolved(meta: dict, what: str) -> dict:
    ref = meta.get("constructor", {}).get("resolved_config")
    if ref is None:
        raise FixtureError(f"{what} fixture without constructor.resolved_config: cannot rebuild the model")
    return {**ref, **meta["constructor"].get("factory_kwargs", {})}


def _hooks(model: nn.Module, tensors: dict[str, Tensor]) -> tuple[dict[str, str], dict[str, Tensor], list]:
    """Forward hooks on every module whose output the fixture recorded (`intermediate.<module path>`):
    (wanted module -> tensor name, captured outputs, hook handles)."""
    wanted = {k.removeprefix("intermediate."): k for k in tensors if k.startswith("intermediate.")}
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name in wanted:
            # The first call's output: a tiled model would call a module once per tile.
            hook = lambda _m, _a, out, name=name: captured.setdefault(name, out.detach().clone())
            handles.append(module.register_forward_hook(hook))
    return wanted, captured, handles


def _replay(
    model: hunyuan.HunyuanVAE | flux_ae.FluxAE,
    tensors: dict[str, Tensor],
    sample_rng,
    tols: dict[str, tuple[float, float]],
    component: str,
) -> ParityReport:
    """Recompute every stored output of a KL-autoencoder fixture; `sample_rng()` gives the generator (or None
    after seeding the global RNG) for the sampled encode."""
    if "input" not in tensors:
        raise FixtureError("the fixture holds no `input` tensor")
    report = ParityReport("", component)
    x = tensors["input"]
    wanted, captured, handles = _hooks(model, tensors)
    done = set(NOT_OUTPUTS)

    def add(name: str, actual: Tensor) -> None:
        if name in tensors:
            atol, rtol = tols["decoded" if name in PIXEL_OUTPUTS else "latent"]
            report.add(name, actual, tensors[name], atol, rtol)
            done.add(name)

    with torch.no_grad():
        mean, logvar = model.posterior(x)
        add("posterior_mean", mean)
        add("posterior_logvar", logvar)
        latent = model.scaling_factor * (mean - model.shift_factor)
        add("latent", latent)
        # Decode the fixture's latent, so a decoder mismatch is not hidden behind (or blamed on) the encoder.
        add("decoded", model.decode_latents(tensors.get("latent", latent), num_frames=x.shape[2]))
        for handle in handles:  # the hooks record the plain encode and decode only
            handle.remove()
        if any(k in tensors for k in ("latent_sampled", "sample_eps", "decoded_from_sampled")):
            with torch.random.fork_rng(devices=[]):
                generator = sample_rng()
                sampled = model.encode_latents(x, sample=True, generator=generator)
            with torch.random.fork_rng(devices=[]):
                eps = torch.randn(mean.shape, generator=sample_rng(), dtype=torch.float32)
            add("sample_eps", eps)
            add("latent_sampled", sampled)
            add("decoded_from_sampled", model.decode_latents(tensors.get("latent_sampled", sampled), x.shape[2]))
    for name, key in sorted(wanted.items()):
        atol, rtol = tols["decoded" if name.startswith(DECODER_SIDE) else "latent"]
        done.add(key)
        if name not in captured:
            report.results.append(Comparison(f"{key} (no such module)", float("inf"), atol, rtol, False, ()))
        else:
            report.add(key, captured[name], tensors[key], atol, rtol)
    # An output this check does not know how to recompute is a failure, not a silent pass.
    for key in sorted(k for k in tensors if k not in done and not k.startswith("state_dict.")):
        report.results.append(Comparison(f"{key} (not replayed)", float("inf"), 0.0, 0.0, False, ()))
    return report


def _tolerances(defaults: dict[str, tuple[float, float]], tol: tuple[float, float] | None):
    return defaults if tol is None else {k: tol for k in defaults}


def check_hunyuan_vae(
    meta: dict, tensors: dict[str, Tensor], folder: Path, tol: tuple[float, float] | None
) -> ParityReport:
    """HunyuanVideo VAE: posterior, latent, decode, seeded sample (`sample_seed`, a torch.Generator), hooks."""
    config = hunyuan.config_from_reference(_resolved(meta, "HunyuanVAE"))
    model = hunyuan.HunyuanVAE(config).eval()
    state = _weights(meta, tensors, folder)
    try:
        model.load_state_dict(hunyuan.hunyuan_state_dict(state, config), strict=True)
    except ValueError as e:
        raise FixtureError(str(e)) from None
    seed = int(meta.get("sample_seed", 0))
    # The reference samples with diffusers' randn_tensor and the given torch.Generator.
    return _replay(
        model, tensors, lambda: torch.Generator().manual_seed(seed), _tolerances(HUNYUAN_TOLERANCES, tol), "hunyuan_vae"
    )


def check_flux_ae(
    meta: dict, tensors: dict[str, Tensor], folder: Path, tol: tuple[float, float] | None
) -> ParityReport:
    """Flux AE: posterior, latent, decode, the sample drawn from the global RNG after `sample_seed`, hooks."""
    config = flux_ae.config_from_reference(_resolved(meta, "Flux AE"))
    model = flux_ae.FluxAE(config).eval()
    state = flux_ae.flux_ae_state_dict(_weights(meta, tensors, folder), len(config.ch_mult))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FixtureError(
            f"the fixture's weights do not fit the Flux AE config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    seed = int(meta.get("sample_seed", 0))

    def global_rng() -> None:
        # The reference draws eps with torch.randn(mean.shape) right after torch.manual_seed(sample_seed).
        torch.manual_seed(seed)
        return None

    return _replay(model, tensors, global_rng, _tolerances(FLUX_AE_TOLERANCES, tol), "flux_ae")


def build_hunyuan_vae(reference_config: dict, state: dict[str, Tensor]) -> hunyuan.HunyuanVAE:
    """A HunyuanVideo VAE from the reference factory's arguments (release wrapper settings included) and weights."""
    config = hunyuan.config_from_reference(reference_config)
    model = hunyuan.HunyuanVAE(config).eval()
    model.load_state_dict(hunyuan.hunyuan_state_dict(state, config), strict=True)
    return model


def build_flux_ae(reference_config: dict, state: dict[str, Tensor]) -> flux_ae.FluxAE:
    """A Flux AE from the reference factory's arguments and its weights (BFL key names), strictly loaded."""
    config = flux_ae.config_from_reference(reference_config)
    model = flux_ae.FluxAE(config).eval()
    model.load_state_dict(flux_ae.flux_ae_state_dict(state, len(config.ch_mult)), strict=True)
    return model
