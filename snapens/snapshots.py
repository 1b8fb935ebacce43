"""Snapshots: one safetensors file per cycle end, `snapshots/cycle_XX.safetensors` in the run dir.

A snapshot holds the model's complete state_dict (BatchNorm buffers included) and string metadata: cycle, step,
epoch, lr, model name, number of classes, class names, the input normalisation and a hash of the resolved config,
so inference needs nothing else. safetensors never runs code on load (unlike pickle), and every write goes to a
temporary file in the same folder that is then renamed, so a reader never sees half a file (snapens.files).
"""

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from snapens.errors import SnapensError
from snapens.files import write_atomic

FORMAT = "snapens-1"
METADATA_KEY = "snapens"


def snapshot_path(run_dir: str | Path, cycle: int, swa: bool = False) -> Path:
    """Cycles count from 1 in file names: cycle_01 is the first snapshot, cycle_01_swa its cycle's SWA average."""
    return Path(run_dir) / "snapshots" / f"cycle_{cycle:02d}{'_swa' if swa else ''}.safetensors"


def save_snapshot(path: Path, model: torch.nn.Module, metadata: dict[str, Any], record: bool = False) -> None:
    """Save the model's state_dict with metadata (any JSON-serialisable values); with `record`, the file's SHA-256
    goes into its run's manifest (`verify` checks it before any reader uses the file)."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON: safetensors writes a dict's keys in hash order, which would make the
    # bytes of two identical snapshots differ.
    meta = {METADATA_KEY: json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    data = save(state, metadata=meta)
    write_atomic(path, data)
    entries = read_manifest(path.parent) if record else None
    earlier = any(f != path for f in path.parent.glob("*.safetensors"))
    if record and (entries is not None or not earlier):  # a run begun by an older snapens stays unverified
        write_manifest(path.parent, {**(entries or {}), path.name: hashlib.sha256(data).hexdigest()})


# ---- the manifest: which files a run wrote, and their bytes' SHA-256 -------------------------------------------------
# <run>/manifest.json, rewritten whole (atomically) after every snapshot of the run: a file in <run>/snapshots/
# whose bytes it does not list was not written by its run (a copy from another run) or was changed since (a flipped
# byte, a replaced file). The snapshot files themselves stay as they were, so equal runs stay bit-equal.
MANIFEST = "manifest.json"


def manifest_path(folder: Path) -> Path | None:
    """The manifest of a run's snapshots/ folder; None for any other folder (files outside a run)."""
    return folder.parent / MANIFEST if folder.name == "snapshots" else None


def read_manifest(folder: Path) -> dict[str, str] | None:
    """file name -> SHA-256 of the snapshots the run wrote into `folder`; None when there is no manifest (not a
    run's folder, a run of an older snapens, or files put there by hand)."""
    path = manifest_path(folder)
    if path is None or not path.exists():
        return None
    try:
        entries = json.loads(path.read_text())["snapshots"]
    except (OSError, ValueError, KeyError, TypeError):
        entries = None
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise SnapensError(f"{path} is damaged: the snapshots in {folder} cannot be verified; restore it from a "
                           "copy of the run")
    return entries


def write_manifest(folder: Path, entries: dict[str, str]) -> None:
    record = {"format": FORMAT, "snapshots": dict(sorted(entries.items()))}
    write_atomic(manifest_path(folder), (json.dumps(record, indent=1) + "\n").encode())


def verify(path: Path, digest: str) -> bool:
    """Refuse a snapshot whose bytes its run's manifest does not list under its name (or, for a file the run wrote
    and that was renamed since, under a name no file has any more): one line naming the file and the fix. False when
    there is no manifest (unverified), True when verified."""
    entries = read_manifest(path.parent)
    if entries is None:
        return False
    if path.name in entries:
        if entries[path.name] != digest:
            raise SnapensError(f"{path} has changed since its run wrote it (its SHA-256 is not the one in "
                               f"{manifest_path(path.parent)}): a damaged or replaced file; restore it from a copy or "
                               "remove it")
        return True
    renamed = [name for name, d in entries.items() if d == digest and not (path.parent / name).exists()]
    if not renamed:
        raise SnapensError(f"{path} is not a snapshot its run wrote ({manifest_path(path.parent)} does not list it): "
                           "a file copied into that folder; remove it, or move it out of snapshots/ and give it "
                           "with snapshots=[FILE]")
    return True


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a snapshot (decoded from its JSON); reads only the header."""
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise SnapensError(f"snapshot {path} does not exist: check the path") from None
    except (SafetensorError, OSError) as e:
        raise SnapensError(f"snapshot {path} is not a readable safetensors file ({e}); it is truncated or corrupt")
    try:
        metadata = json.loads(raw.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        raise SnapensError(f"snapshot {path} has damaged metadata (not JSON under '{METADATA_KEY}')") from None
    if not isinstance(metadata, dict) or metadata.pop("format", None) != FORMAT:
        raise SnapensError(f"{path} is not a snapens snapshot (no '{METADATA_KEY}' metadata of format {FORMAT})")
    return metadata


def load_snapshot(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, metadata) of a snapshot file."""
    metadata = read_metadata(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SnapensError(f"snapshot {path} is not a readable safetensors file ({e}); it is truncated or corrupt")
    return state, metadata


def load_into(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load a snapshot's weights into `model` and return its metadata. Every tensor must fit: names and shapes are
    compared first, so a mismatched snapshot leaves the model untouched (torch's load_state_dict would copy the
    tensors that fit before raising)."""
    state, metadata = load_snapshot(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        shapes = [k for k in expected.keys() & found.keys() if expected[k] != found[k]]
        problem = (f"{shapes[0]} has shape {list(found[shapes[0]])}, the model wants {list(expected[shapes[0]])}"
                   if shapes else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise SnapensError(f"snapshot {path} does not fit the model ({problem}): it was saved from "
                           f"{metadata.get('model')} with {metadata.get('num_classes')} classes")
    model.load_state_dict(state)
    return metadata


def list_snapshots(run_dir: str | Path, swa: bool = False) -> list[Path]:
    """The run's snapshot files in cycle order (swa: the cycles' SWA averages, cycle_XX_swa, instead)."""
    pattern = r"cycle_(\d+)_swa" if swa else r"cycle_(\d+)"
    found = [(re.fullmatch(pattern, p.stem), p) for p in (Path(run_dir) / "snapshots").glob("*.safetensors")]
    return [p for m, p in sorted((int(m[1]), p) for m, p in found if m)]


def prune_snapshots(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` cycles' snapshots (with their _swa siblings and cached logits); return what
    was deleted. Used for trainer.keep_snapshots, where the user asked for exactly this."""
    paths = list_snapshots(run_dir)
    doomed = []
    for path in paths[:max(len(paths) - keep, 0)]:
        doomed += [path, path.with_name(f"{path.stem}_swa.safetensors")]
        for name in (path.name, f"{path.stem}_swa.safetensors"):
            doomed += list((Path(run_dir) / "logits").glob(f"*/{name}"))
    deleted = [p for p in doomed if p.exists()]
    entries = read_manifest(Path(run_dir) / "snapshots")
    if entries is not None:  # the manifest first: a kill in between leaves files it no longer lists, never the reverse
        write_manifest(Path(run_dir) / "snapshots", {k: v for k, v in entries.items() if k not in
                                                     {p.name for p in deleted}})
    for p in deleted:
        p.unlink()
    return deleted


def snapshot_steps(schedule, every: int = 0, count: int | None = None) -> list[int]:
    """Where snapshots are taken: at the cycle ends; or every `every` updates and at the end, or at `count` evenly
    spaced points of a schedule without restarts (scheduler.cycles): the NoCycle baseline of Huang et al. 2017,
    arXiv 1704.00109, section 4. SWA windows and optimizer resets follow them."""
    total, ends = schedule.total_steps, schedule.cycle_ends()
    if every:
        return sorted(set(range(every, total, every)) | {total})
    if count and len(ends) == 1:
        return [k * total // count for k in range(1, count + 1)]
    return ends
