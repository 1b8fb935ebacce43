"""snapens: snapshot ensembles with SGDR for PyTorch (arXiv 1608.03983, 1704.00109).

For your own training loop: the schedules as LRSchedulers (`snapens.SGDR`, ...) and `snapens.SnapshotEnsemble`;
for a finished run's ensemble as one module (probabilities, predictions, export): `snapens.Ensemble`.
The full trainer is `python -m snapens.train`; evaluation of finished runs is `python -m snapens.ensemble`.
"""

import importlib

# Imported on first use (PEP 562), so that `python -m snapens.train --help` and a misspelt override answer before
# torch is imported (seconds on a loaded machine).
_HOMES = {"Ensemble": "snapens.ensemble.ensemble", "SnapshotEnsemble": "snapens.ensemble.snapshot_ensemble",
          **{name: "snapens.lr_scheduler"
             for name in ("SGDR", "Constant", "Cosine", "Cyclic", "OneCycle", "ScheduleLR", "Snapshot", "StepDecay")}}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'snapens' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__():
    return sorted([*globals(), *_HOMES])
