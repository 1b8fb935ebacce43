"""Each snapshot's logits on a split, computed once and kept beside the run's snapshots.

`<run>/logits/<split>/cycle_XX.safetensors` holds the N x C float32 logits of `<run>/snapshots/cycle_XX.safetensors`
together with the SHA-256 of the snapshot file and of the split's images and labels, and the precision and layout
they were computed in. A cache entry is reused only while all of these still match, so a retrained snapshot, a
different test subset or bf16 logits where fp32 ones are asked for are recomputed, never mixed up.
"""

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from snapens.batches import eval_batches
from snapens.data import Split, split_digest
from snapens.ensemble.batched import same_architecture, stacked_logits
from snapens.errors import SnapensError
from snapens.files import file_digest, sweep_leftovers, write_atomic
from snapens.models import model_from_metadata
from snapens.precision import autocast, describe, layout
from snapens.snapshots import load_into

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: Split, mean, std, batch_size: int, device: torch.device,
                   precision: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Logits of `model` (in eval mode, moved to `device` in the given layout) for every image of the split, under
    autocast to `precision` (None: fp32): float32 N x C, on the CPU. The batches' logits stay on the device until
    the end, so the pass never waits on a copy back to the host."""
    model.to(device, memory_format=layout(channels_last)).eval()
    with autocast(device, precision):
        out = [model(x).float() for x, _ in eval_batches(split, batch_size, mean, std, device, channels_last)]
    return torch.cat(out).cpu()


def cache_path(snapshot: Path, split_name: str) -> Path | None:
    """<run>/snapshots/cycle_XX.safetensors -> <run>/logits/<split>/cycle_XX.safetensors; None for a snapshot that
    is not in a run's snapshots/ folder (nothing is written beside files we do not own)."""
    if snapshot.parent.name != "snapshots":
        return None
    return snapshot.parent.parent / "logits" / split_name / snapshot.name


def read_cached(path: Path | None, key: dict, rows: int) -> torch.Tensor | None:
    """The cached logits if the file exists, is readable, was made from exactly `key`, is N x C with N = `rows` and
    still holds the bytes whose SHA-256 was stored with them (an edited file, negated or NaN logits say, is
    recomputed, never trusted); else None (also for no path)."""
    if path is None:
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if json.loads(metadata.get("key", "null")) != key:
                return None
            logits = f.get_tensor("logits")
    except (FileNotFoundError, SafetensorError, OSError, ValueError):
        return None  # missing or damaged: recompute
    if logits.dim() != 2 or len(logits) != rows or metadata.get("logits_sha256") != tensor_digest(logits):
        return None
    return logits


def write_cached(path: Path | None, key: dict, logits: torch.Tensor) -> None:
    """The logits with their key and digest at `path` (nothing for None); a read-only run dir can still be
    evaluated, just not cached (a warning)."""
    if path is None:
        return
    metadata = {"key": json.dumps(key, sort_keys=True), "logits_sha256": tensor_digest(logits)}
    try:
        write_atomic(path, save({"logits": logits.contiguous()}, metadata=metadata))
    except SnapensError as e:
        log.warning(f"logits not cached: {e}")


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()


def model_maker(device: torch.device) -> Callable[[Path, dict], torch.nn.Module]:
    """model_for(path, metadata) for cached_logits: builds a snapshot's model, reusing it while the config repeats."""
    built = {}

    def model_for(path: Path, meta: dict) -> torch.nn.Module:
        key = json.dumps(meta.get("model_config"), sort_keys=True)
        if key not in built:
            built.clear()  # one model in memory at a time
            built[key] = model_from_metadata(meta.get("model_config"), f"snapshot {path}").to(device)
        return built[key]

    return model_for


def cached_logits(paths: list[Path], metas: list[dict], split: Split, split_name: str, batch_size: int,
                  device: torch.device, model_for: Callable[[Path, dict], torch.nn.Module],
                  precision: torch.dtype | None = None, channels_last: bool = False,
                  batched: bool = False) -> torch.Tensor:
    """M x N x C logits of the snapshots on the split: read from the cache, or computed once and cached.
    `model_for(path, metadata)` gives a model of the snapshot's architecture (its weights are then loaded), so one
    model is in memory at a time; with `batched`, the snapshots to compute are loaded together and run in one
    vmapped pass when they share an architecture and input statistics (snapens.ensemble.batched). Each snapshot is
    normalised with its own training statistics. precision and channels_last are as in `predict_logits`."""
    split_sha = split_digest(split)
    keys = {path: {"snapshot_sha256": file_digest(path), "split_sha256": split_sha,
                   "computed_in": describe(precision, channels_last, device)} for path in paths}
    found = {path: logits for path in paths
             if (logits := read_cached(cache_path(path, split_name), keys[path], len(split))) is not None}
    missing = [(path, meta) for path, meta in zip(paths, metas) if path not in found]
    if missing:
        on_device = split.to(device)  # moved to the device once, for all the snapshots to compute
        found.update(zip([p for p, _ in missing], compute_logits(missing, on_device, batch_size, device, model_for,
                                                                   precision, channels_last, batched)))
        write_all(missing, split_name, keys, found)
    return torch.stack([found[p] for p in paths])


def write_all(missing: list[tuple[Path, dict]], split_name: str, keys: dict, found: dict) -> None:
    """The logits computed for `missing` into their cache files, after sweeping a killed call's half-written ones."""
    caches = {path: cache_path(path, split_name) for path, _ in missing}
    for folder in {cache.parent for cache in caches.values() if cache}:
        sweep_leftovers(folder)
    for path, cache in caches.items():
        write_cached(cache, keys[path], found[path])


def compute_logits(members: list[tuple[Path, dict]], split: Split, batch_size: int, device: torch.device,
                   model_for, precision, channels_last: bool, batched: bool) -> list[torch.Tensor]:
    """Each (path, metadata)'s logits on the split (already on the device): one model at a time, or all in one
    vmapped pass when `batched` and they share an architecture and input statistics."""
    stats = {(tuple(meta["mean"]), tuple(meta["std"])) for _, meta in members}
    if batched and len(members) > 1 and len(stats) == 1:
        models = []
        for path, meta in members:
            model = copy.deepcopy(model_for(path, meta))  # model_for reuses one model per architecture
            load_into(model, path)
            models.append(model)
        if same_architecture(models):
            mean, std = next(iter(stats))
            return list(stacked_logits(models, split, mean, std, batch_size, device, precision, channels_last))
    out = []
    for path, meta in members:
        model = model_for(path, meta)
        load_into(model, path)
        out.append(predict_logits(model, split, meta["mean"], meta["std"], batch_size, device, precision,
                                  channels_last))
    return out
