"""Which snapshots are an ensemble's members, and with which weights and temperature: found in run dirs, selected
with the one `members=` grammar, checked to belong together, and (chosen=) taken from what training chose on
validation. Plain arguments, no config: the ensemble tool, predict=, export, the distillation teacher and
`Ensemble.from_run` all call these."""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from snapens.ensemble import rules
from snapens.errors import SnapensError
from snapens.files import file_digest
from snapens.snapshots import list_snapshots, read_metadata, verify

REQUIRED = ("classes", "mean", "std", "model_config", "image_size")  # what snapens.train writes into every snapshot
MAX_SIDE = 4096  # pixels: data.image_size's bound (snapens.config), so no file makes predict= resize beyond it
CHOICES = ("last_m", "greedy", "weighted")  # what training chooses on validation (snapens.ensemble.selection)


def find(run: str | Path | None = None, runs: Sequence = (), snapshots: Sequence = (), members="all",
         swa: bool = False) -> list[list[Path]]:
    """The snapshot files to ensemble, one list per run (explicit files form one group), each after `members`."""
    if sum([bool(run), bool(runs), bool(snapshots)]) != 1:
        raise SnapensError("give exactly one of run=DIR, runs=[DIR,...] or snapshots=[FILE,...]")
    if snapshots:
        groups = [[Path(p) for p in snapshots]]
        for p in groups[0]:
            if not p.is_file():
                raise SnapensError(f"snapshot {p} does not exist: check the path, or give run=DIR for a run's own")
    else:
        groups = [run_snapshots(Path(d), swa) for d in ([run] if run else runs)]
    return [select(group, members) for group in groups]


def run_snapshots(run_dir: Path, swa: bool = False) -> list[Path]:
    """A run dir's snapshots (its SWA averages with `swa`), ordered by the cycle and step their files say."""
    if not run_dir.is_dir():
        raise SnapensError(f"run dir {run_dir} does not exist: give the folder a training wrote (snapshots/ and "
                           "results.json in it)")
    paths = list_snapshots(run_dir, swa)
    if swa and not paths:
        raise SnapensError(f"run dir {run_dir} has no SWA snapshots (snapshots/cycle_XX_swa.safetensors): train "
                           "with trainer.swa.start=FRACTION, or leave out swa=true")
    if not paths:
        raise SnapensError(f"run dir {run_dir} has no snapshots (snapshots/cycle_XX.safetensors): "
                           "its training has not finished a cycle")
    metas = {p: read_metadata(p) for p in paths}
    for path, meta in metas.items():
        check_metadata(path, meta)
    return sorted(paths, key=lambda p: (metas[p].get("cycle", 0), metas[p].get("step", 0)))  # a renamed file keeps
    # its place


def select(paths: list[Path], spec="all") -> list[Path]:
    """The members= grammar: all | last:K | first:K | [cycle numbers]; the chosen files of one run, in cycle
    order."""
    if isinstance(spec, str):
        end, _, k = spec.partition(":")
        if spec == "all":
            return paths
        if end in ("last", "first") and k.isdigit():
            return _select_end(paths, spec, end, int(k))
    elif isinstance(spec, Sequence) and spec and all(type(c) is int for c in spec):
        return _select_cycles(paths, list(spec))
    raise SnapensError(f"members={spec} is not allowed; use all, last:K, first:K or a list of cycle numbers")


def _select_end(paths: list[Path], spec: str, end: str, k: int) -> list[Path]:
    if not 1 <= k <= len(paths):
        raise SnapensError(f"members={spec} needs 1 <= K <= {len(paths)} (the number of snapshots)")
    return paths[-k:] if end == "last" else paths[:k]


def _select_cycles(paths: list[Path], cycles: list[int]) -> list[Path]:
    by_cycle = {read_metadata(p)["cycle"]: p for p in paths}  # the cycle the file says, whatever its name
    missing = [c for c in cycles if c not in by_cycle]
    if missing:
        raise SnapensError(f"members={cycles}: no snapshot for cycle {missing[0]}; "
                           f"the run has cycles {sorted(by_cycle)}")
    if len(set(cycles)) != len(cycles):
        raise SnapensError(f"members={cycles} names a cycle twice")
    return [by_cycle[c] for c in sorted(cycles)]  # cycle order: "last" and "first" keep their meaning


def read(paths: list[Path]) -> list[dict]:
    """The members' metadata, which must be that of snapens.train; a file its run's manifest does not list with
    these bytes (another run's, or a changed one) and the same snapshot under two names (a copy, which would count
    twice) are refused."""
    for path, digest in zip(paths, unique_digests(paths)):
        verify(path, digest)
    metas = [read_metadata(p) for p in paths]
    for path, meta in zip(paths, metas):
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise SnapensError(f"snapshot {path} lacks {', '.join(missing)} in its metadata: it was not written by "
                               "snapens.train")
        check_metadata(path, meta)
    return metas


def _numbers(values, positive: bool = False) -> bool:
    """A non-empty list of at most 4 finite numbers (one per channel), each > 0 with `positive`."""
    return isinstance(values, list) and 0 < len(values) <= 4 and all(
        type(x) in (int, float) and math.isfinite(x) and (x > 0 or not positive) for x in values)


def _whole(n) -> bool:
    return type(n) is int and n >= 0


# What snapens.train writes under each metadata key: (check(value, metadata), as said in the error).
METADATA = {
    "classes": (lambda c, meta: isinstance(c, list) and 0 < len(c) == len(set(c)) and all(type(n) is str for n in c)
                and _outputs(meta) in (None, len(c)), "distinct class names, one per model output"),
    "mean": (lambda m, meta: _numbers(m), "finite numbers, one per channel"),
    "std": (lambda s, meta: _numbers(s, positive=True) and len(s) == len(meta.get("mean") or []),
            "numbers > 0, one per channel of mean"),
    "image_size": (lambda s, meta: isinstance(s, list) and len(s) == 2 and all(_whole(n) and 0 < n <= MAX_SIDE
                                                                               for n in s),
                   f"[height, width], each 1 to {MAX_SIDE} pixels"),
    "cycle": (lambda n, meta: _whole(n), "a whole number >= 0"),
    "step": (lambda n, meta: _whole(n), "a whole number >= 0"),
}


def _outputs(meta: dict) -> int | None:
    """The model's number of outputs, where its config says one (a malformed config is the allow-list's to refuse)."""
    model = meta.get("model_config")
    outputs = model.get("num_classes") if isinstance(model, dict) else None
    return outputs if type(outputs) is int else None


def check_metadata(path: Path, meta: dict) -> None:
    """The metadata's values typed and bounded before anything is built or resized from them (a file may come from
    anyone): distinct class names, one per model output; finite statistics, std > 0; an image size of at most
    MAX_SIDE pixels a side; whole cycle and step numbers (METADATA). Keys absent are left to `read`'s REQUIRED."""
    for key, (valid, need) in METADATA.items():
        if key in meta and not valid(meta[key], meta):
            raise SnapensError(f"snapshot {path} has {key}={str(meta[key])[:80]} in its metadata, where snapens.train "
                               f"writes {need}: the file was changed or not written by snapens")


def unique_digests(paths: list[Path]) -> list[str]:
    """Each file's SHA-256; a missing file, and the same snapshot under two names (a copy, which would count twice),
    refused in one line."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise SnapensError(f"snapshot {missing[0]} does not exist: check the path, or give run=DIR for a run's own")
    seen, digests = {}, [file_digest(path) for path in paths]
    for path, digest in zip(paths, digests):
        if digest in seen:
            raise SnapensError(f"{seen[digest]} and {path} hold the same snapshot (identical bytes); remove the copy")
        seen[digest] = path
    return digests


def check_same_classes(paths: list[Path], metas: list[dict], classes: list[str] | None = None) -> None:
    """Every member trained on one class list, in one order (and that of the data, when `classes` is given)."""
    for path, meta in zip(paths, metas):
        if meta["classes"] != metas[0]["classes"]:
            raise SnapensError(f"snapshots {paths[0]} and {path} were trained on different class lists; "
                               "an ensemble needs the same classes in the same order")
    if classes is not None and metas[0]["classes"] != classes:
        raise SnapensError(f"snapshot {paths[0]} was trained on classes {metas[0]['classes'][:5]}..., "
                           f"the data has {classes[:5]}...: evaluate on the data it was trained on")


def check_same_inputs(paths: list[Path], metas: list[dict]) -> None:
    """Every member normalises the same kind of image (statistics and size): what one module taking images needs."""
    for path, meta in zip(paths, metas):
        if (meta["mean"], meta["std"], meta["image_size"]) != (metas[0]["mean"], metas[0]["std"],
                                                               metas[0]["image_size"]):
            raise SnapensError(f"{path} was trained on other inputs than {paths[0]} (statistics or image size): "
                               "one ensemble module takes one kind of image")


def names(paths: list[Path]) -> list[str]:
    """cycle_XX, or run/cycle_XX when the members come from several runs, with as many of the run dir's parents as
    it takes to tell the runs apart (two sweeps' job 0: sweepA/0/cycle_01, sweepB/0/cycle_01)."""
    if len({p.parent for p in paths}) == 1:
        return [p.stem for p in paths]
    for depth in range(1, max(len(p.parts) for p in paths)):
        named = ["/".join(p.parent.parent.parts[-depth:] + (p.stem,)) for p in paths]
        if len(set(named)) == len(named):
            return named
    return [str(p) for p in paths]


def check_chosen(chosen: str | None, run, members="all", swa: bool = False) -> None:
    """chosen= names members of one run's own snapshots: said before any file is read."""
    if chosen and chosen not in CHOICES:
        raise SnapensError(f"chosen={chosen} is not allowed; choose one of: {', '.join(CHOICES)}")
    if chosen and (not run or members != "all" or swa):
        raise SnapensError(f"chosen={chosen} takes the members the run chose on validation: give run=DIR alone "
                           "(no runs=, snapshots=, members= or swa=)")


def stored_results(run: Path) -> list[tuple[Path, dict]]:
    """What snapens.train (results.json) and the ensemble tool (ensemble/test/ensemble.json) fitted on the run's
    validation split, in that order, for the files that exist and parse."""
    found = []
    for path in (run / "results.json", run / "ensemble" / "test" / "ensemble.json"):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


def combination(paths: list[Path], run: str | Path | None, rule: str, calibrate: str = "val",
                chosen: str | None = None) -> dict:
    """How the members are combined: {"members": the paths, repeats kept, "weights": a weight per member or None
    (uniform), "temperature": T or None, "source": where that came from}. With `chosen`, the members (and weights)
    chosen on validation in the run's results.json; with calibrate="val", the temperature fitted on validation for
    exactly these members and rule, where one was stored (none: uncalibrated, said in "source")."""
    stored = stored_results(Path(run)) if run else []
    if chosen:
        return _chosen_combination(paths, Path(run), rule, calibrate, chosen, stored)
    found = _stored_temperature(paths, rule, stored) if calibrate == "val" else None
    if found:
        return {"members": paths, "weights": None, "temperature": found[1],
                "source": f"temperature fitted on validation, from {found[0]}"}
    why = "calibrate=none" if calibrate == "none" else "no temperature stored for these members and rule"
    return {"members": paths, "weights": None, "temperature": None, "source": f"uncalibrated ({why})"}


def _stored_temperature(paths: list[Path], rule: str, stored: list[tuple[Path, dict]]) -> tuple[Path, float] | None:
    """(file, T) of the all-member calibration of a report on exactly these files and this rule, if any."""
    files = [p.name for p in paths]
    for path, result in stored:
        fitted = result.get("calibration")
        stored_files = [Path(f).name for f in result.get("ensemble", {}).get("members", [])]
        if fitted and result.get("rule") == rule and stored_files == files and \
                fitted["ensemble"]["temperature"] is not None:  # None: the fit found no errors to fit on
            check_stored(path, fitted["ensemble"]["temperature"])
            return path, fitted["ensemble"]["temperature"]
    return None


def check_stored(path: Path, temperature=None, weights: torch.Tensor | None = None) -> None:
    """A temperature (finite, > 0) and weights (finite, >= 0, summing to 1) read from a run's file, checked before
    use: a negative T would turn each prediction's order around, NaN weights every probability. The checks are
    snapens.ensemble.rules' own; the message names the file."""
    try:
        if temperature is not None and type(temperature) not in (int, float):
            raise ValueError("not a number")
        rules.check_temperature(temperature)
    except ValueError:
        raise SnapensError(f"{path} holds temperature {temperature}, which must be a finite number > 0: the file was "
                           "changed; train again, or pass calibrate=none") from None
    try:
        rules.check_weights(weights, len(weights) if weights is not None else 0)
    except ValueError:
        raise SnapensError(f"{path} holds weights {weights.tolist()}, which must be finite, >= 0 and sum to 1: the "
                           "file was changed; train again, or leave out chosen=") from None


def _chosen_combination(paths: list[Path], run: Path, rule: str, calibrate: str, chosen: str,
                        stored: list[tuple[Path, dict]]) -> dict:
    choice = _stored_choice(run, rule, chosen, dict(stored).get(run / "results.json", {}))
    by_name = {p.stem: p for p in paths}
    picked = choice["members"] if "members" in choice else list(choice["weights"])
    missing = [n for n in picked if n not in by_name]
    if missing:
        raise SnapensError(f"chosen={chosen} names {missing[0]}, which {run}/snapshots/ no longer holds")
    weights = torch.tensor(list(choice["weights"].values()), dtype=torch.float64) if "weights" in choice else None
    temperature = choice.get("temperature") if calibrate == "val" else None
    check_stored(run / "results.json", temperature, weights)
    return {"members": [by_name[n] for n in picked], "weights": weights, "temperature": temperature,
            "source": f"chosen={chosen} from {run}/results.json"
                      + (", with its temperature fitted on validation" if temperature else ", uncalibrated")}


def _stored_choice(run: Path, rule: str, chosen: str, results: dict) -> dict:
    choice = results.get("chosen", {}).get(chosen)
    if not choice:
        raise SnapensError(f"chosen={chosen}: {run}/results.json records no such choice (members are chosen "
                           f"when training holds out data.val_size=N; choices: {', '.join(CHOICES)})")
    if results.get("rule") != rule:
        raise SnapensError(f"chosen={chosen} was chosen for rule={results.get('rule')}; pass that rule")
    return choice


def distinct(how: dict) -> tuple[list[Path], torch.Tensor]:
    """A `combination`'s members each once, with its weight: the stored weights, or the share of picks (a member
    chosen twice by greedy selection weighs twice)."""
    unique = list(dict.fromkeys(how["members"]))
    count = len(how["members"])
    per_pick = torch.full((count,), 1 / count, dtype=torch.float64) if how["weights"] is None else \
        torch.as_tensor(how["weights"], dtype=torch.float64)
    if per_pick.shape != (count,):
        raise ValueError(f"weights must be {count} numbers, one per member, got {per_pick.tolist()}")
    weights = torch.zeros(len(unique), dtype=torch.float64)
    for path, w in zip(how["members"], per_pick.tolist()):
        weights[unique.index(path)] += w
    return unique, weights
