"""Checkpoint folders: written atomically (a temporary folder renamed when complete, a `latest` pointer), pruned,
and the sharded format every booster writes.

Sharded format (every rank writes whole tensors of its own share, balanced by size; an index maps names to files),
the same for every plugin and number of processes, so a run resumes on another one:

- ``model-RRRRR-of-WWWWW.safetensors`` + ``model.index.json`` (name -> file): the model state in the working dtype.
- ``optimizer-RRRRR-of-WWWWW.pt`` (``{name: {key: full tensor}}``) + ``optimizer.index.json`` (param groups with
  parameter names, name -> file).
- ``master-RRRRR-of-WWWWW.safetensors`` + ``master.index.json``: the fp32 master weights (ZeRO; their optimizer
  keeps the masters).

Every checkpoint folder also holds ``checksums.json`` (relative path -> SHA-256 and size of every other file in it),
written last, before the folder is renamed into place, and verified before a checkpoint is resumed from; folders
written before it existed are checked from their headers alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cinedit.configs.core import ConfigError
from cinedit.runtime.dist import DistInfo, all_gather_objects, barrier
from cinedit.runtime.ema import EMA
from cinedit.runtime.files import write_json, write_text
from cinedit.runtime.rng import load_rng_state, rng_state, save_rng_state, set_rng_state

CKPT_DIR = "ckpt"
LATEST = "latest"
STATE_FILE = "state.json"
INDEX = "{}.index.json"  # model / optimizer / master
CHECKSUMS = "checksums.json"  # {relative path: {"sha256": hex digest, "bytes": size}} of every other file


# ----------------------------------------------------------------------------------------------------------------------
# the sharded format


def shard_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}-{rank:05d}-of-{world:05d}" + (".pt" if kind == "optimizer" else ".safetensors")


def shard_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Which rank writes each tensor: largest first to the least loaded rank (the same answer on every rank)."""
    load, owners = [0] * world, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[name], load[r] = r, load[r] + sizes[name]
    return owners


def write_index(path: Path, kind: str, weight_map: dict[str, str], **extra: Any) -> None:
    (Path(path) / INDEX.format(kind)).write_text(json.dumps({**extra, "weight_map": weight_map}, indent=1) + "\n")


def read_index(path: Path, kind: str) -> dict[str, Any]:
    index = Path(path) / INDEX.format(kind)
    if not index.is_file():
        raise FileNotFoundError(f"{path} holds no {kind} checkpoint ({index.name} is missing)")
    return json.loads(index.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint folders


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """`<run_dir>/ckpt/step-000010`."""
    return Path(run_dir) / CKPT_DIR / f"step-{step:06d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `<run_dir>/ckpt/latest`, or None."""
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = Path(run_dir) / CKPT_DIR / pointer.read_text().strip()
    return path if path.is_dir() else None


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be read (missing, empty, truncated), checked from its header alone."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix == ".safetensors":
        try:  # the header's offsets must cover the file: a truncated file fails here
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types
            return f"is unreadable ({type(e).__name__}: {e})"
    elif path.suffix == ".pt" and not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory is last
        return "is truncated or not a torch file"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# checksums

# SHA-256 streams at about 350-550 MiB/s on one core of the 2-core dev machine (`file_sha256` of a 200 MiB file:
# 0.35-0.6 s), so verifying a 150 GB checkpoint (11B: weights, optimizer, masters) takes about 5 minutes: once per
# resume, never per step. When saving, every rank hashes a share of the files (balanced by size) in parallel.
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest, buf = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _folder_files(path: Path) -> dict[str, int]:
    """relative path -> size of every file in a checkpoint folder but the checksum manifest."""
    files = (p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != CHECKSUMS)
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in files}


def write_checksums(path: Path, info: DistInfo) -> None:
    """Write `path`/checksums.json once every rank's files are in `path` (collective): each rank hashes its share
    of the files, rank 0 writes the manifest (hashing itself any file another rank did not see)."""
    sizes = _folder_files(path)
    owners = shard_owners(sizes, info.world_size)
    mine = {f: {"sha256": file_sha256(path / f), "bytes": n} for f, n in sizes.items() if owners[f] == info.rank}
    parts = all_gather_objects(mine)
    if info.is_main:
        doc = {k: v for part in parts for k, v in part.items()}
        for f, n in _folder_files(path).items():
            if f not in doc:
                doc[f] = {"sha256": file_sha256(path / f), "bytes": n}
        write_json(path / CHECKSUMS, dict(sorted(doc.items())))


_verified: dict[Path, tuple] = {}  # folder -> its files' (name, size, mtime) when its checksums last matched


def _stamp(path: Path) -> tuple:
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()))


def checksum_problem(path: str | os.PathLike) -> str | None:
    """Which file of a checkpoint folder differs from its `checksums.json` (missing, another size, another SHA-256),
    or None (also for folders written before the manifest existed)."""
    path = Path(path)
    manifest = path / CHECKSUMS
    if not manifest.exists():
        return None
    try:
        doc = json.loads(manifest.read_text())
        listed = {str(f): (int(v["bytes"]), str(v["sha256"])) for f, v in doc.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{CHECKSUMS} is unreadable ({type(e).__name__}: {e})"
    stamp = _stamp(path)
    if _verified.get(path.resolve()) == stamp:
        return None
    for f, (size, _) in listed.items():  # sizes first: cheap
        if not (path / f).is_file():
            return f"{f}: missing ({CHECKSUMS} lists it)"
        if (path / f).stat().st_size != size:
            return f"{f}: size mismatch ({(path / f).stat().st_size} bytes, {size} when written)"
    for f, (_, sha) in listed.items():
        if file_sha256(path / f) != sha:
            return f"{f}: checksum mismatch (the file changed after it was written)"
    _verified[path.resolve()] = stamp
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes a checkpoint folder unusable (a missing, empty or truncated file, an unreadable index or
    state.json, a file that differs from its checksum), or None when every file it needs is there and intact."""
    path = Path(path)
    try:
        int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE} is missing or unreadable ({type(e).__name__}: {e})"
    parts = [p for p in sorted(path.iterdir()) if p.is_dir() and p.name != "rng"]
    if not parts:
        return "it holds no model folder"
    for part in parts:
        for kind in ("model", "optimizer", *(("master",) if (part / INDEX.format("master")).exists() else ())):
            index = part / INDEX.format(kind)
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                return f"{index.relative_to(path)} is missing or unreadable ({type(e).__name__})"
            for name in files:
                problem = _file_problem(part / name)
                if problem:
                    return f"{part.name}/{name} {problem}"
    for extra in [path / "ema.safetensors", *sorted((path / "rng").glob("rank-*"))]:
        problem = _file_problem(extra) if extra.exists() else None
        if problem:
            return f"{extra.relative_to(path)} {problem}"
    return checksum_problem(path)


def verify_checkpoint(path: Path) -> None:
    """Refuse (ConfigError) a checkpoint folder `checkpoint_problem` finds damaged, naming the file and the
    previous checkpoint to resume from instead."""
    problem = checkpoint_problem(path)
    if problem is None:
        return
    older = sorted(p for p in path.parent.glob("step-*") if p.is_dir() and p.name < path.name)
    instead = next((p for p in reversed(older) if checkpoint_problem(p) is None), None)
    hint = f"resume from the previous checkpoint {instead} instead" if instead else "no earlier checkpoint is intact"
    raise ConfigError(f"checkpoint {path} is damaged: {problem}; {hint} (or use --train.resume=auto)")


def resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The checkpoint `--train.resume=auto` continues from: the one `latest` names, or, when that one is damaged or
    `latest` is unreadable, the newest complete one; with a line per damaged checkpoint passed over. Checkpoint
    folders with none complete are an error (never a silent restart at step 0)."""
    root = Path(run_dir) / CKPT_DIR
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    latest = latest_checkpoint(run_dir)
    notes = []
    if latest is None and steps:
        notes.append(f"{root / LATEST} is missing or does not name a checkpoint folder")
    damaged = []
    for ckpt in ([latest] if latest is not None else []) + [p for p in steps if p != latest]:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, notes + [f"{d} is damaged ({why}); resuming from {ckpt.name} instead" for d, why in damaged]
        damaged.append((ckpt, problem))
    if damaged:
        listed = "; ".join(f"{d.name}: {why}" for d, why in damaged)
        raise ConfigError(
            f"no complete checkpoint in {root} ({listed}). Move the damaged folders out of {root} to start this run "
            f"again from step 0, or use another out_dir (--train.overwrite=true would delete them)"
        )
    return None, notes


def save_checkpoint(run_dir: str | os.PathLike, step: int, write: Callable[[Path], None], info: DistInfo) -> Path:
    """Write a checkpoint atomically: `write(tmp_dir)` runs on every rank into `.step-N.tmp`, then the ranks record
    every file's checksum (`write_checksums`), and rank 0 renames it to `step-N` and then points `latest` at it. An
    error inside `write` (a full disk) leaves `latest` on the previous checkpoint and, in a one-process run, removes
    the temporary folder; otherwise the next save removes it.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write(tmp)
        barrier()
        write_checksums(tmp, info)
    except BaseException:
        # A full disk mid-write: leave no half-written folder behind (`latest` still names the previous). With
        # several processes the others may still be writing into it: the next save removes it instead.
        if info.is_main and info.world_size == 1:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if info.is_main:
        if final.exists():  # the same step saved again (a resumed run): replace the old copy
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        write_text(final.parent / LATEST, final.name + "\n")
    barrier()
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the `latest` one); keep <= 0 keeps all."""
    if keep <= 0:
        return
    root = Path(run_dir) / CKPT_DIR
    latest = latest_checkpoint(run_dir)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in steps[:-keep]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p)


def save_training(
    run_dir: str | os.PathLike,
    step: int,
    info: DistInfo,
    parts: dict[str, tuple[Any, nn.Module, Any]],
    ema: EMA | None,
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """One atomic checkpoint of a training run (collective): for each `parts` entry `folder: (booster, model,
    optimizer)` the model and optimizer (sharded), every rank's RNG states, the EMA weights and `state.json` (step,
    EMA updates, world size, plugin, plus the trainer's `state`, e.g. loader positions). Then all but the newest
    `keep` checkpoints are removed (0: keep all)."""

    def write(path: Path) -> None:
        for folder, (booster, model, optimizer) in parts.items():
            (path / folder).mkdir(exist_ok=True)
            booster.save_model(model, path / folder)
            booster.save_optimizer(optimizer, path / folder)
        (path / "rng").mkdir(exist_ok=True)
        save_rng_state(rng_state(), path / "rng" / f"rank-{info.rank:05d}.safetensors")
        if info.is_main:
            if ema is not None:
                weights = {k: v.contiguous().cpu() for k, v in ema.module.state_dict().items()}
                save_file(weights, str(path / "ema.safetensors"))
            plugin = next(iter(parts.values()))[0].name
            doc = {"step": step, "ema_updates": ema.updates if ema is not None else 0, **state}
            write_json(path / STATE_FILE, {**doc, "world_size": info.world_size, "plugin": plugin})

    out = save_checkpoint(run_dir, step, write, info)
    if info.is_main:
        prune_checkpoints(run_dir, keep)
    return out


def load_training(
    path: Path, info: DistInfo, parts: dict[str, tuple[Any, nn.Module, Any]], ema: EMA | None
) -> dict[str, Any]:
    """Load what `save_training` wrote into `parts` and `ema` (under any process count); returns `state.json`.

    A part whose folder the checkpoint lacks (e.g. a discriminator added later) keeps its fresh state; a rank
    without a saved RNG file (more processes than were saved) keeps its seeded RNG. A damaged folder (a file that
    differs from its checksum) is refused (`verify_checkpoint`; not hashed again when `checkpoint_problem` has just
    found it intact).
    """
    verify_checkpoint(path)
    doc = json.loads((path / STATE_FILE).read_text())
    for i, (folder, (booster, model, optimizer)) in enumerate(parts.items()):
        if i == 0 or (path / folder).is_dir():
            booster.load_model(model, path / folder)
            booster.load_optimizer(optimizer, path / folder)
    if ema is not None:
        ema.module.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(info.device)))
        ema.updates = int(doc["ema_updates"])
    # .pt: checkpoints written before the RNG states were stored as safetensors
    candidates = [path / "rng" / f"rank-{info.rank:05d}{ext}" for ext in (".safetensors", ".pt")]
    rng = next((f for f in candidates if f.is_file()), None)
    if rng is not None:
        set_rng_state(load_rng_state(rng))
    return doc
