"""The resumable state of a training run: `checkpoints/last.ckpt` in the run dir.

It holds only tensors and plain Python values, written with torch.save and read with `torch.load(weights_only=True)`
(no code runs on load), and goes through the same write-to-temporary-then-rename as snapshots, so a kill -9 at any
moment leaves either the previous checkpoint or the new one under the final name. Schedules are functions of the
step (snapens.schedules), so the step alone restores the learning rate: torch's stateful schedulers have a long
record of wrong rates after a resume (pytorch issues 88791, 52236, 65342).
"""

import io
import random
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapens.errors import SnapensError
from snapens.snapshots import write_atomic


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file (RuntimeError, UnpicklingError, EOFError)
        raise SnapensError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           "move it away to start the run again from scratch") from None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream the run draws from: torch (CPU and CUDA), the data generator, Python's and NumPy's."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": generator.get_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["data"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))


HARMLESS = ("trainer.device", "trainer.num_threads", "trainer.log_every", "trainer.resume", "trainer.checkpoint_every",
            "trainer.on_nonfinite", "trainer.max_skipped", "ensemble.", "logger.")


def deciding_values(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config's leaves by dotted key, without those that cannot change the result (HARMLESS)."""
    leaves = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(deciding_values(value, f"{name}."))
        elif not name.startswith(HARMLESS):
            leaves[name] = value
    return leaves


def differing_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config trees and could change the result."""
    a, b = deciding_values(saved), deciding_values(current)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


@contextmanager
def stop_requests():
    """While inside, SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before preemption) do not kill the process: their
    names collect in the yielded list, which the loop checks after each update, to checkpoint and exit cleanly."""
    received: list[str] = []

    def note(signum, frame):
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
