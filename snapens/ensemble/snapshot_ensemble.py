"""`SnapshotEnsemble`: keep snapshots from your own training loop, and predict and evaluate with them.

    ensemble = snapens.SnapshotEnsemble(folder="snapshots", max_snapshots=5)   # or folder=None: kept in memory
    ...
        if scheduler.is_cycle_end:
            ensemble.add(model)
    print(ensemble.evaluate(test_loader)["ensemble"])   # {'acc': 0.945, 'nll': 0.21, 'ece': 0.02, ...}

Weights are copied at `add` (to the CPU, or to a safetensors file in `folder`), so training on does not change
them. One copy of the model serves as the container into which each member's weights are loaded in turn: only one
model is on the device at a time, and each member's logits come from exactly one pass over the loader.
"""

import copy
from pathlib import Path
from typing import Iterable

import torch

from snapens.ensemble.report import build_report
from snapens.ensemble.rules import check_rule, combine, probabilities
from snapens.errors import SnapensError
from snapens.precision import autocast
from snapens.snapshots import load_into, save_snapshot


class SnapshotEnsemble:
    """Snapshots of one architecture, the newest last.

    Args:
        folder: Where `add` writes `cycle_XX.safetensors` (numbered by the add count, from 1; an existing file is
            never overwritten); None keeps the weights in CPU memory.
        max_snapshots: Keep only the newest this many (older ones are dropped, their files deleted); None: all.
    """

    def __init__(self, folder: str | Path | None = None, max_snapshots: int | None = None):
        if max_snapshots is not None and max_snapshots < 1:
            raise ValueError(f"max_snapshots must be >= 1 or None, got {max_snapshots}")
        self.folder = Path(folder) if folder is not None else None
        taken = sorted(self.folder.glob("cycle_*.safetensors")) if self.folder is not None else []
        if taken:  # said now, not after the first cycle of training
            raise SnapshotEnsembleError(f"{self.folder} already holds snapshots ({taken[0].name}, ...); give the "
                                        "ensemble an empty folder (nothing was overwritten)")
        self.max_snapshots = max_snapshots
        self.members: list[dict[str, torch.Tensor] | Path] = []
        self.added = 0
        self._model: torch.nn.Module | None = None

    def __len__(self) -> int:
        return len(self.members)

    def add(self, model: torch.nn.Module, **metadata) -> None:
        """Copy the model's current weights in as the newest member (metadata goes into the file, if any)."""
        if self._model is None:
            self._model = copy.deepcopy(model).cpu()
        elif set(self._model.state_dict()) != set(model.state_dict()):
            raise SnapshotEnsembleError("this model's state_dict keys differ from the first member's: an ensemble "
                                        "holds snapshots of one architecture")
        self.added += 1
        if self.folder is None:
            self.members.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        else:
            path = self.folder / f"cycle_{self.added:02d}.safetensors"
            if path.exists():
                raise SnapshotEnsembleError(f"{path} already exists; give the ensemble an empty folder (nothing "
                                            "was overwritten)")
            save_snapshot(path, model, {"cycle": self.added, **metadata})
            self.members.append(path)
        while self.max_snapshots is not None and len(self.members) > self.max_snapshots:
            dropped = self.members.pop(0)
            if isinstance(dropped, Path):
                dropped.unlink()

    @torch.no_grad()
    def logits(self, loader: Iterable, device: str | torch.device = "cpu",
               precision: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """M x N x C float32 logits of every member, oldest first (one pass over `loader` each), and the labels
        when the loader yields (inputs, labels) pairs. The loader must give the same inputs in the same order on
        every pass (no shuffling)."""
        if not self.members:
            raise SnapshotEnsembleError("the ensemble is empty: add(model) at least one snapshot first")
        device = torch.device(device)
        out, labels = [], None
        for member in self.members:
            if isinstance(member, Path):
                load_into(self._model, member)
            else:
                self._model.load_state_dict(member)
            model = self._model.to(device).eval()
            batches, ys = [], []
            with autocast(device, precision):
                for batch in loader:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    batches.append(model(x.to(device)).float())
                    if isinstance(batch, (tuple, list)):
                        ys.append(batch[1].cpu())
            out.append(torch.cat(batches).cpu())
            these = torch.cat(ys) if ys else None
            if labels is not None and not torch.equal(labels, these):
                raise SnapshotEnsembleError("the loader gave other labels on another pass: pass a loader that "
                                            "yields the same images in the same order every time (shuffle=False)")
            labels = these
        self._model.cpu()
        return torch.stack(out), labels

    def predict(self, loader: Iterable, rule: str = "logits", device: str | torch.device = "cpu",
                precision: torch.dtype | None = None) -> torch.Tensor:
        """N x C ensemble scores (mean logits, mean probabilities, or votes; see snapens.ensemble.rules.combine);
        their argmax is the prediction."""
        check_rule(rule)  # before the passes over the loader
        return combine(self.logits(loader, device, precision)[0], rule)

    def probabilities(self, loader: Iterable, rule: str = "logits", weights: torch.Tensor | None = None,
                      temperature: float | None = None, device: str | torch.device = "cpu",
                      precision: torch.dtype | None = None) -> torch.Tensor:
        """float64 N x C probabilities of the ensemble: `snapens.ensemble.rules.probabilities` of the members'
        logits with the given weights (M, oldest first; None: uniform) and temperature (None: unscaled)."""
        check_rule(rule)
        return probabilities(self.logits(loader, device, precision)[0].double(), rule, weights, temperature)

    def evaluate(self, loader: Iterable, rule: str = "logits", device: str | torch.device = "cpu",
                 precision: torch.dtype | None = None, bins: int = 15) -> dict:
        """Accuracy, NLL and ECE of each member, of the newest alone ("single") and of the ensemble under `rule`,
        from one pass per member over a loader of (inputs, labels): `snapens.ensemble.build_report`'s shape, the
        one of results.json, with "split" None. A member's cycle is its add number (that of its file name), its
        file the path in `folder` (None in memory), its step None."""
        check_rule(rule)
        logits, labels = self.logits(loader, device, precision)
        if labels is None:
            raise SnapshotEnsembleError("evaluate needs a loader of (inputs, labels) pairs")
        first = self.added - len(self.members) + 1  # older members were dropped by max_snapshots
        members = [{"file": str(m) if isinstance(m, Path) else None, "name": f"cycle_{first + i:02d}",
                    "cycle": first + i, "step": None} for i, m in enumerate(self.members)]
        return build_report(logits, labels, members, rule, bins, split=None)


class SnapshotEnsembleError(SnapensError, ValueError):
    """A misuse of SnapshotEnsemble (empty, mixed architectures, a loader that shuffles, a taken file name)."""
