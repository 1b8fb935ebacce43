"""The report of a finished run's ensemble: every snapshot, the last one alone and the ensemble of all, on test
(and on validation, where members are chosen and temperatures fitted before test is read), with the verdict.

`build_report` is the one shape of results (results.json, ensemble.json, `SnapshotEnsemble.evaluate`);
`evaluate_run` is the end-of-run evaluation snapens.train writes into results.json. Nothing is chosen on test.
"""

from pathlib import Path
from typing import Callable

import torch

from snapens.data import Split
from snapens.ensemble import calibration, metrics, selection, uncertainty
from snapens.ensemble.cache import cached_logits
from snapens.snapshots import list_snapshots, read_metadata


def build_report(logits: torch.Tensor, labels: torch.Tensor, members: list[dict], rule: str = "logits",
                 bins: int = 15, split: str | None = "test") -> dict:
    """The one shape of ensemble results: results.json, ensemble.json and `SnapshotEnsemble.evaluate`.

    Args:
        logits: M x N x C, member m's logits on the N evaluation images (labels: N true classes), in cycle order.
        members: M dicts {"file": its path as the caller names it, or None for weights kept in memory, "name": a
            short label, "cycle", "step": None where unknown}.
        rule, bins, split: see `combine`; the ECE's confidence bins; the split's name (None where unknown).
    Returns:
        {"split", "num_images", "rule", "snapshots": [member + {acc, nll, ece}], "single": the last snapshot's
        entry, "ensemble": {acc, nll, ece, rule, members: each member's file, or its name when it has none}};
        accuracies and ECE are fractions, NLL is in nats (None for a vote; see `metrics.scores`).
    """
    snapshots = [{**member, **metrics.scores(logits[i:i + 1], labels, "logits", bins)}
                 for i, member in enumerate(members)]
    return {
        "split": split, "num_images": len(labels), "rule": rule, "snapshots": snapshots, "single": snapshots[-1],
        "ensemble": {**metrics.scores(logits, labels, rule, bins), "rule": rule,
                     "members": [s["file"] or s["name"] for s in snapshots]},
    }


def ensemble_report(logits: torch.Tensor, labels: torch.Tensor, paths: list[Path], metadata: list[dict],
                    rule: str = "logits", *, bins: int = 15, split: str = "test") -> dict:
    """`build_report` of the snapshots of one run dir, each named by its file name (cycle_XX.safetensors); `paths`
    and `metadata` (with cycle and step) are the M snapshot files, in cycle order."""
    members = [{"file": p.name, "name": p.stem, "cycle": m["cycle"], "step": m["step"]}
               for p, m in zip(paths, metadata)]
    return build_report(logits, labels, members, rule, bins, split)


def format_report(report: dict) -> str:
    """The one table of a `build_report` result: each snapshot, the last one alone and the ensemble."""
    def row(label: str, cycle, step, scores: dict) -> str:
        cells = [cycle, step, f"{scores['acc']:.4f}", None if scores["nll"] is None else f"{scores['nll']:.4f}",
                 f"{scores['ece']:.4f}"]
        return f"{label:<24}" + "".join(f"{'-' if c is None else c:>8}" for c in cells)

    e = report["ensemble"]
    lines = [f"{'snapshot':<24}" + "".join(f"{h:>8}" for h in ("cycle", "step", "acc", "nll", "ece"))]
    lines += [row(s["name"], s["cycle"], s["step"], s) for s in report["snapshots"]]
    if len(report["snapshots"]) == 1:  # a distilled student, a one-cycle run: nothing to ensemble
        lines.append("one snapshot: no ensemble to compare with it")
    else:
        lines.append(row("single (last snapshot)", "", "", report["single"]))
        lines.append(row(f"ensemble of {len(e['members'])} ({e['rule']})", "", "", e))
    split = f" {report['split']}" if report["split"] else ""
    lines.append(f"on {report['num_images']}{split} images")
    return "\n".join(lines)


def evaluate_run(run_dir: Path, test: Split, val: Split | None, rule: str, batch_size: int, device: torch.device,
                 model_for: Callable[[Path, dict], torch.nn.Module], precision: torch.dtype | None = None,
                 channels_last: bool = False, restarts: bool = True) -> dict:
    """Every snapshot of the run read back from its file (its logits kept in logits/<split>/) and `build_report`
    on test; with a validation split also the report on it, the members chosen on it (selection.choose) and the
    temperatures fitted on it (calibration), each only then scored on test; each gain's paired interval
    (uncertainty); and the verdict (`restarts`: whether the schedule restarts, which the advice depends on)."""
    paths = list_snapshots(run_dir)
    metas, names = [read_metadata(p) for p in paths], [p.stem for p in paths]
    logits = {name: cached_logits(paths, metas, split, name, batch_size, device, model_for, precision, channels_last)
              for name, split in (("test", test), ("val", val)) if split is not None}
    result = ensemble_report(logits["test"], test.labels, paths, metas, rule)
    if val is not None:  # what a sweeper may tune on, and members chosen on it, never on test
        result["val"] = ensemble_report(logits["val"], val.labels, paths, metas, rule, split="val")
        result["chosen"] = selection.choose(logits["val"], val.labels, logits["test"], test.labels, names, rule)
        fitted = calibration.calibrate_run(logits["val"], val.labels, logits["test"], test.labels, rule)
        if fitted:  # a temperature per model, fitted on validation (Guo et al. 2017); predict= applies it
            result["calibration"] = fitted
    result["gains"] = uncertainty.gains(logits["test"], test.labels, rule, result.get("chosen", {}), names)
    result["verdict"] = selection.verdict(result, restarts=restarts)
    return result


def format_run(result: dict) -> str:
    """The log's end-of-run lines: the report, the choices on validation, the temperatures and the verdict."""
    lines = ["", format_report(result)]
    one = len(result["snapshots"]) == 1  # no ensemble: no members to choose, no gain to judge
    if "chosen" in result and not one:
        lines.append(selection.format_choice(result["chosen"]))
    if "calibration" in result:
        lines.append(calibration.format_calibration(result["calibration"]))
    return "\n".join(lines + ([] if one else [selection.format_verdict(result["verdict"])]))
