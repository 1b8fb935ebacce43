"""snapens: snapshot ensembles with SGDR for PyTorch (arXiv 1608.03983, 1704.00109).

For your own training loop: the schedules as LRSchedulers (`snapens.SGDR`, ...) and `snapens.SnapshotEnsemble`;
for a finished run's ensemble as one module (probabilities, predictions, export): `snapens.Ensemble`.
The full trainer is `python -m snapens.train`; evaluation of finished runs is `python -m snapens.ensemble`.
"""

from snapens.ensemble.ensemble import Ensemble
from snapens.ensemble.snapshot_ensemble import SnapshotEnsemble
from snapens.lr_scheduler import SGDR, Constant, Cosine, Cyclic, OneCycle, ScheduleLR, Snapshot, StepDecay

__all__ = ["SGDR", "Constant", "Cosine", "Cyclic", "Ensemble", "OneCycle", "ScheduleLR", "Snapshot",
           "SnapshotEnsemble", "StepDecay"]
