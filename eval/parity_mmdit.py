"""MMDiT parity: rebuild the generator from a fixture's reference config, load its weights (strict), replay
`model(img, img_ids, txt, txt_ids, timesteps, vec, cond, guidance)` and compare the output and the recorded
module outputs (forward hooks on the same module paths as the reference's).

The Open-Sora video MMDiT (`check_mmdit`) and the Flux.1-dev text-to-image model (`check_flux`: guidance
embedding, no cond_in, fused q/k/v weights split by the loader's adapter) share one replay.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import repeat

from cinedit.eval.parity import Comparison, FixtureError, ParityReport, _weights
from cinedit.generator.loading import has_fused_qkv, split_qkv_state_dict
from cinedit.generator.math import unpack
from cinedit.generator.model import MMDiT, config_from_reference

# Suggested by the fixtures' README for an fp32 CPU re-implementation (eager timestep embedding).
MMDIT_TOLERANCE = (2e-5, 0.0)
INPUTS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "vec")  # our names (see parity.fixture_inputs)


def _reference_pe(pe: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """Our RoPE table (b, 1, l, d/2, [cos, sin]) in the reference's recorded forms."""
    cos, sin = pe[:, 0, ..., 0], pe[:, 0, ..., 1]
    if layout == "rotate_half":  # (b, l, d): the half-size table repeated twice along the last dim
        return {
            "pe_embedder.cos": repeat(cos, "b l d -> b l (two d)", two=2),
            "pe_embedder.sin": repeat(sin, "b l d -> b l (two d)", two=2),
        }
    # Flux: (b, 1, l, d/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]].
    rot = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)
    return {"pe_embedder": rot[:, None]}


def check_mmdit(
    meta: dict, tensors: dict[str, torch.Tensor], folder: Path, tol: tuple[float, float] | None
) -> ParityReport:
    """MMDiT forward: `output`, `output_unpacked` and the `intermediate.*` module outputs."""
    return _replay(meta, tensors, folder, tol, "MMDiT", INPUTS)


def check_flux(
    meta: dict, tensors: dict[str, torch.Tensor], folder: Path, tol: tuple[float, float] | None
) -> ParityReport:
    """Flux.1-dev forward with its distilled `guidance`, weights in BFL's fused layout: as `check_mmdit`."""
    return _replay(meta, tensors, folder, tol, "Flux", (*INPUTS, "guidance"))


def _replay(
    meta: dict,
    tensors: dict[str, torch.Tensor],
    folder: Path,
    tol: tuple[float, float] | None,
    kind: str,
    inputs: tuple[str, ...],
) -> ParityReport:
    ref = dict(meta.get("config") or {})
    if not ref:
        raise FixtureError(f"{kind} fixture without a `config`: cannot rebuild the model")
    if "use_liger_rope" not in ref and "rope_layout" in meta:
        ref["rope_layout"] = meta["rope_layout"]
    missing = [name for name in (*inputs, "output") if name not in tensors]
    if missing:
        raise FixtureError(f"{kind} fixture lacks the tensors {missing}")
    atol, rtol = tol or MMDIT_TOLERANCE
    cfg = config_from_reference(ref)
    model = MMDiT(cfg).eval()
    state = _weights(meta, tensors, folder)
    if has_fused_qkv(state):  # the reference's default layout (Flux checkpoints): split as load_pretrained does
        state = split_qkv_state_dict(state, cfg)
    model.load_state_dict(state, strict=True)

    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        captured[name] = value

    for name in ("img_in", "cond_in", "time_in", "guidance_in", "vector_in", "txt_in"):
        module = getattr(model, name)
        if module is not None:
            module.register_forward_hook(lambda _m, _a, out, name=name: keep(name, out))
    model.pe_embedder.register_forward_hook(lambda _m, _a, out: captured.update(_reference_pe(out, cfg.rope_layout)))
    for i, block in enumerate(model.double_blocks):
        block.register_forward_hook(
            lambda _m, _a, out, i=i: captured.update(
                {f"double_blocks.{i}.img": out[0], f"double_blocks.{i}.txt": out[1]}
            )
        )
    for i, block in enumerate(model.single_blocks):
        block.register_forward_hook(lambda _m, _a, out, i=i: keep(f"single_blocks.{i}", out))
    # The reference's `final_layer.input_vec` is the modulation vector, `mod` here.
    model.final_layer.register_forward_pre_hook(
        lambda _m, args: captured.update({"final_layer.input_x": args[0], "final_layer.input_vec": args[1]})
    )

    report = ParityReport("", kind.lower())
    with torch.no_grad():
        out = model(*(tensors[name] for name in INPUTS), cond=tensors.get("cond"), guidance=tensors.get("guidance"))
    report.add("output", out, tensors["output"], atol, rtol)
    if "output_unpacked" in tensors:
        _, _, t, h, w = tensors["output_unpacked"].shape
        report.add("output_unpacked", unpack(out, cfg.patch_size, t, h, w), tensors["output_unpacked"], atol, rtol)
    for key in sorted(k for k in tensors if k.startswith("intermediate.")):
        name = key.removeprefix("intermediate.")
        if name in captured:
            report.add(key, captured[name], tensors[key], atol, rtol)
        else:
            report.results.append(Comparison(key, float("inf"), atol, rtol, False, ()))
    return report


def build_flux(reference_config: dict, state: dict[str, torch.Tensor]) -> MMDiT:
    """A Flux-style MMDiT from the reference's factory arguments and its (fused) weights, strictly loaded."""
    cfg = config_from_reference(reference_config)
    if has_fused_qkv(state):
        state = split_qkv_state_dict(state, cfg)
    model = MMDiT(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model
