"""Numerical parity with the public reference: rebuild a model from a fixture's recorded config, load its
weights with the release's key names (strict), replay the recorded call and compare every stored output.

Fixture format (shared/fixtures/README.md): `NAME.json` records the component, the reference constructor
config, the call and the tensor file; `NAME.safetensors` holds `state_dict.<key>` weights, the inputs and
the outputs. A fixture may take its weights from another file (`weights_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from cinedit.generator.model import MMDiT
from cinedit.generator.model import config_from_reference as mmdit_config
from cinedit.tokenizer.model import VideoDCAE, config_from_reference

# Suggested by the fixtures' README for an fp32 CPU re-implementation: variant -> (atol, rtol).
DCAE_TOLERANCES = {"refinit": (1e-5, 0.0), "randw": (1e-4, 1e-4)}
DEFAULT_TOLERANCE = (1e-4, 1e-4)


class FixtureError(ValueError):
    """A fixture this command cannot read or does not know how to replay."""


@dataclass
class Comparison:
    name: str
    max_abs_diff: float
    atol: float
    rtol: float
    ok: bool
    shape: tuple[int, ...]


@dataclass
class ParityReport:
    fixture: str
    component: str
    results: list[Comparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def add(self, name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
        if actual.shape != expected.shape:
            self.results.append(Comparison(name, float("inf"), atol, rtol, False, tuple(actual.shape)))
            return
        diff = (actual.double() - expected.double()).abs()
        ok = bool((diff <= atol + rtol * expected.double().abs()).all())
        self.results.append(Comparison(name, float(diff.max()), atol, rtol, ok, tuple(actual.shape)))


# The fixture-input adapter, the one place where the reference's tensor names meet ours: the reference calls the
# pooled text vector (CLIP pooled output) `y_vec`, cinedit calls it `vec` from the cache to the model.
REFERENCE_INPUT_NAMES = {"y_vec": "vec"}


def fixture_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fixture's tensors under our names (REFERENCE_INPUT_NAMES); names already ours are kept."""
    return {REFERENCE_INPUT_NAMES.get(k, k): v for k, v in tensors.items()}


def read_fixture(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(json, tensors under our names, folder) of a fixture given its .json (or .safetensors) path."""
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise FixtureError(f"{path}: no such fixture; pass the fixture's .json file")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FixtureError(f"{path}: not valid JSON ({e})") from None
    if "keys" in meta and "file" not in meta:
        return meta, {}, path.parent  # a schema: key names and shapes only
    tensor_file = path.parent / meta.get("file", path.with_suffix(".safetensors").name)
    if not tensor_file.is_file():
        raise FixtureError(f"{path}: its tensor file {tensor_file.name} is missing beside it")
    return meta, fixture_inputs(load_file(str(tensor_file))), path.parent


def _weights(meta: dict, tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    if "weights_file" in meta:
        tensors = load_file(str(folder / meta["weights_file"]))
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    if not state:
        raise FixtureError("the fixture holds no `state_dict.*` weights (nor names a weights_file)")
    return state


def check_dcae(meta: dict, tensors: dict[str, torch.Tensor], folder: Path, tol: tuple[float, float] | None):
    """Video DC-AE: encode(input) -> latent, decode(latent) -> reconstruction, and per-module intermediates."""

    ref_cfg = meta.get("constructor", {}).get("resolved_config")
    if ref_cfg is None:
        raise FixtureError("DC-AE fixture without constructor.resolved_config: cannot rebuild the model")
    atol, rtol = tol or DCAE_TOLERANCES.get(meta.get("variant", ""), DEFAULT_TOLERANCE)
    model = VideoDCAE(config_from_reference(ref_cfg)).eval()
    model.load_state_dict(_weights(meta, tensors, folder), strict=True)
    report = ParityReport("", "dcae")
    captured: dict[str, torch.Tensor] = {}
    wanted = {k.removeprefix("intermediate."): k for k in tensors if k.startswith("intermediate.")}
    for name, module in model.named_modules():
        if name in wanted:
            module.register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out))
    with torch.no_grad():
        if "input" in tensors and "latent" in tensors:
            report.add("latent", model.encode(tensors["input"]), tensors["latent"], atol, rtol)
        if "latent" in tensors and "reconstruction" in tensors:
            # The recorded reconstruction says how many frames the latent decodes to.
            frames = tensors["reconstruction"].shape[2]
            report.add("reconstruction", model.decode(tensors["latent"], frames), tensors["reconstruction"], atol, rtol)
    for name, key in sorted(wanted.items()):
        if name not in captured:
            report.results.append(Comparison(f"intermediate.{name}", float("inf"), atol, rtol, False, ()))
        else:
            report.add(f"intermediate.{name}", captured[name], tensors[key], atol, rtol)
    return report


def check_schema(meta: dict, tensors: dict[str, torch.Tensor], folder: Path, tol) -> ParityReport:
    """A full-size state-dict schema: our model built on the meta device from the recorded config has exactly
    its keys and shapes (reported as the number of mismatches) and parameter count."""
    text = meta.get("component", "").lower()
    with torch.device("meta"):
        if "dc-ae" in text:
            model = VideoDCAE(config_from_reference(meta["resolved_config"]))
        elif "mmdit" in text:
            model = MMDiT(mmdit_config(meta["config"]))
        else:
            raise FixtureError(f"schema of an unknown component {meta.get('component')!r}")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {k: tuple(v["shape"]) for k, v in meta["keys"].items()}
    missing, unexpected = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    wrong = sorted(k for k in set(ref) & set(ours) if ref[k] != ours[k])
    report = ParityReport("", "schema")
    for name, bad in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        report.results.append(Comparison(name, float(len(bad)), 0.0, 0.0, not bad, (len(ref),)))
    params = sum(v.numel() for v in model.parameters())
    want = meta.get("total_parameters", params)
    report.results.append(Comparison("parameter count", float(abs(params - want)), 0.0, 0.0, params == want, ()))
    return report


# component -> check(meta, tensors, folder, tol) -> ParityReport; "module:function" entries import lazily.
CHECKS = {
    "schema": check_schema,
    "dcae": check_dcae,
    "mmdit": "cinedit.eval.parity_mmdit:check_mmdit",
    "sampling_tables": "cinedit.eval.parity_sampling:check_sampling_tables",
    "sampling_i2v": "cinedit.eval.parity_sampling:check_sampling_i2v",
    "hunyuan_vae": "cinedit.eval.parity_vae:check_hunyuan_vae",
    "flux_ae": "cinedit.eval.parity_vae:check_flux_ae",
    "flux": "cinedit.eval.parity_mmdit:check_flux",
    "pipeline": "cinedit.eval.parity_pipeline:check_pipeline",
}


def component_of(meta: dict, path: Path) -> str:
    """Which check a fixture needs, from its `component` text, its keys or its file name."""
    text = f"{meta.get('component', '')} {path.name}".lower()
    if "keys" in meta and "file" not in meta:
        return "schema"
    if "components" in meta or path.name.startswith("pipeline_"):
        return "pipeline"
    if "hunyuan_vae" in text or "hunyuanvae" in text:
        return "hunyuan_vae"
    if "autoencoder_2d" in text or "flux_ae" in text:
        return "flux_ae"
    if "img_flux" in text or "flux_dev" in text:
        return "flux"
    if "dc-ae" in text or "dcae" in text:
        return "dcae"
    if "mmdit_config" in meta or "sampling_i2v" in text or "denoise" in str(meta.get("call", "")).lower():
        return "sampling_i2v"
    if "mmdit" in text:
        return "mmdit"
    if "sampling" in text or "timestep" in text:
        return "sampling_tables"
    raise FixtureError(
        f"{path.name}: unknown component {meta.get('component')!r}; this command replays: {', '.join(CHECKS)}"
    )


def _check_fn(kind: str):
    check = CHECKS[kind]
    if isinstance(check, str):
        import importlib

        module, _, name = check.partition(":")
        try:
            check = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise FixtureError(f"{kind} fixtures are not supported by this version of cinedit") from None
    return check


def check_fixture(path: str | Path, atol: float | None = None, rtol: float | None = None) -> ParityReport:
    """Replay one fixture and compare every stored output (tolerances from the fixture's variant unless given)."""
    path = Path(path)
    meta, tensors, folder = read_fixture(path)
    kind = component_of(meta, path)
    tol = None if atol is None and rtol is None else (atol or 0.0, rtol or 0.0)
    report = _check_fn(kind)(meta, tensors, folder, tol)
    report.fixture, report.component = path.name, kind
    if not report.results:
        raise FixtureError(f"{path.name}: no stored outputs to compare")
    return report
