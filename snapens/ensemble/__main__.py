"""Evaluate the snapshot ensemble of finished runs, and predict on new images: `python -m snapens.ensemble run=DIR`.

One forward pass per snapshot, one model in memory at a time: each snapshot's logits on the split are cached in its
run dir (logits/<split>/), and every ensemble in the report (last m, first m, every rule) is arithmetic on them.
Members are chosen by the user (members=...), never by looking at test accuracy. Nothing here unpickles a file or
writes into snapshots/."""

import csv
import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from snapens import cli
from snapens.build import build_data, model_from_metadata, pick_device, pick_precision
from snapens.config import CHOICES, register_configs, schema_of
from snapens.data import IMAGE_EXTENSIONS, Split, read_image
from snapens.ensemble import build_report, calibration, check_rule, format_report, metrics, selection
from snapens.ensemble.cache import cached_logits, compute_logits, file_digest
from snapens.ensemble.plots import plot_accuracy_vs_members, plot_disagreement, plot_reliability
from snapens.errors import SnapensError, exit_with
from snapens.files import write_atomic
from snapens.snapshots import list_snapshots, read_metadata

register_configs()
log = logging.getLogger(__name__)


# ---- what to evaluate ------------------------------------------------------------------------------------------
def find_members(cfg: DictConfig) -> list[list[Path]]:
    """The snapshot files to ensemble, one list per run (explicit files form one group), after `members`."""
    if sum([bool(cfg.run), bool(cfg.runs), bool(cfg.snapshots)]) != 1:
        raise SnapensError("give exactly one of run=DIR, runs=[DIR,...] or snapshots=[FILE,...]")
    if cfg.snapshots:
        groups = [[Path(p) for p in cfg.snapshots]]
        for p in groups[0]:
            if not p.is_file():
                raise SnapensError(f"snapshot {p} does not exist")
    else:
        groups = [_run_snapshots(Path(d), cfg.swa) for d in ([cfg.run] if cfg.run else cfg.runs)]
    return [select(group, cfg.members) for group in groups]


def _run_snapshots(run_dir: Path, swa: bool) -> list[Path]:
    if not run_dir.is_dir():
        raise SnapensError(f"run dir {run_dir} does not exist")
    paths = list_snapshots(run_dir, swa)
    if swa and not paths:
        raise SnapensError(f"run dir {run_dir} has no SWA snapshots (snapshots/cycle_XX_swa.safetensors): train "
                           "with trainer.swa.start=FRACTION, or leave out swa=true")
    if not paths:
        raise SnapensError(f"run dir {run_dir} has no snapshots (snapshots/cycle_XX.safetensors): "
                           "its training has not finished a cycle")
    order = {p: (read_metadata(p).get("cycle", 0), read_metadata(p).get("step", 0)) for p in paths}
    return sorted(paths, key=order.get)  # by the cycle and step the files say: a renamed file keeps its place


def refuse_copies(paths: list[Path]) -> None:
    """The same snapshot under two names (a copy) would count twice in the ensemble: one line naming both."""
    seen = {}
    for path in paths:
        digest = file_digest(path)
        if digest in seen:
            raise SnapensError(f"{seen[digest]} and {path} hold the same snapshot (identical bytes); remove the copy")
        seen[digest] = path


def select(paths: list[Path], spec) -> list[Path]:
    """all | last:K | first:K | [cycle numbers]: the members of one run, in cycle order."""
    if isinstance(spec, str) and spec == "all":
        return paths
    if isinstance(spec, str) and spec.split(":")[0] in ("last", "first") and spec.split(":")[-1].isdigit():
        return _select_end(paths, spec)
    if isinstance(spec, ListConfig | list) and spec and all(type(c) is int for c in spec):
        return _select_cycles(paths, list(spec))
    raise SnapensError(f"members={spec} is not allowed; use all, last:K, first:K or a list of cycle numbers")


def _select_end(paths: list[Path], spec: str) -> list[Path]:
    end, k = spec.split(":")[0], int(spec.split(":")[1])
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


def load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise SnapensError(f"{path} does not exist: it names the data to evaluate on (pass config=PATH)")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml's scanner and parser errors share no useful base class
        raise SnapensError(f"{path} is not a readable config ({type(e).__name__}); pass another config=PATH")


def same_data(a: DictConfig, b: DictConfig) -> bool:
    """The same images and splits: everything but where the files are and whether they may be downloaded."""
    a, b = OmegaConf.to_container(a), OmegaConf.to_container(b)
    return all(a.get(k) == b.get(k) for k in a.keys() | b.keys() if k not in ("root", "download"))


def training_config(cfg: DictConfig) -> DictConfig:
    """The config whose data section names the images: `config=`, else the (first) run's. Every run evaluated must
    have trained on the same data, so that a val split is really held out and a test set is one test set."""
    if cfg.snapshots and not cfg.config:
        raise SnapensError("snapshots=[...] needs config=PATH, a training config.yaml that names the data")
    runs = [Path(r) for r in ([cfg.run] if cfg.run else cfg.runs)]
    train_cfg = load_yaml(Path(cfg.config) if cfg.config else runs[0] / ".hydra" / "config.yaml")
    for run in runs:
        if not same_data(load_yaml(run / ".hydra" / "config.yaml").data, train_cfg.data):
            raise SnapensError(f"run {run} trained on other data than {cfg.config or runs[0]} describes (sizes, "
                               "limits, validation split or seed differ): an ensemble is scored on one data set")
    if cfg.data_root:
        train_cfg.data.root = cfg.data_root
    source = cfg.config or runs[0] / ".hydra" / "config.yaml"
    if "data" not in train_cfg or "name" not in train_cfg.data:
        raise SnapensError(f"{source} has no data section naming the data set; pass config=PATH of a training run")
    try:  # typed by the schema training used: a hand-edited "abc" for a number is one line, not a traceback
        train_cfg.data = OmegaConf.merge(OmegaConf.structured(schema_of(train_cfg, "data")), train_cfg.data)
    except OmegaConfBaseException as e:
        raise SnapensError(f"{source}: data.{e.key}: {str(e).splitlines()[0]}") from None
    return train_cfg


# ---- logits, one pass per snapshot --------------------------------------------------------------------------------
def check_same_classes(paths: list[Path], metas: list[dict], classes: list[str]) -> None:
    for path, meta in zip(paths, metas):
        if meta["classes"] != metas[0]["classes"]:
            raise SnapensError(f"snapshots {paths[0]} and {path} were trained on different class lists; "
                               "an ensemble needs the same classes in the same order")
    if metas[0]["classes"] != classes:
        raise SnapensError(f"snapshot {paths[0]} was trained on classes {metas[0]['classes'][:5]}..., "
                           f"the data has {classes[:5]}...: evaluate on the data it was trained on")


def build_snapshot_model(path: Path, meta: dict) -> torch.nn.Module:
    return model_from_metadata(meta.get("model_config"), f"snapshot {path}")


def model_maker(device: torch.device):
    """model_for(path, metadata) for cached_logits: builds a snapshot's model, reusing it while the config repeats."""
    built = {}

    def model_for(path: Path, meta: dict) -> torch.nn.Module:
        key = json.dumps(meta.get("model_config"), sort_keys=True)
        if key not in built:
            built.clear()  # one model in memory at a time
            built[key] = build_snapshot_model(path, meta).to(device)
        return built[key]

    return model_for


# ---- the report ---------------------------------------------------------------------------------------------------
def member_names(paths: list[Path]) -> list[str]:
    """cycle_XX, or run/cycle_XX when the members come from several runs."""
    several = len({p.parent for p in paths}) > 1
    return [f"{p.parent.parent.name}/{p.stem}" if several else p.stem for p in paths]


def report(cfg, paths, metas, logits, labels, out_dir: Path, logits_seconds: float, fitted: dict) -> dict:
    """ensemble.json (`build_report`'s report, why these members, curves, disagreement, logits time, and what was
    fitted on the validation split when there is one: `fitted`'s "chosen" members and "calibration") and the
    figures."""
    members = [{"file": str(p), "name": n, "cycle": m.get("cycle"), "step": m.get("step")}
               for p, n, m in zip(paths, member_names(paths), metas)]
    result = {**build_report(logits, labels, members, cfg.rule, cfg.bins, cfg.split),
              "why": f"members={cfg.members} as given; nothing was chosen by looking at {cfg.split} results",
              "curves": metrics.curves(logits, labels, bins=cfg.bins),
              "disagreement": metrics.disagreement(logits).tolist(),
              "logits_seconds": logits_seconds}  # wall time of reading or computing every member's logits
    result.update(fitted)
    write_atomic(out_dir / "ensemble.json", (json.dumps(result, indent=2) + "\n").encode())
    plot_report(result, logits, labels, cfg.bins, out_dir)
    return result


def plot_report(result: dict, logits: torch.Tensor, labels: torch.Tensor, bins: int, out_dir: Path) -> None:
    """accuracy_vs_members.png, disagreement.png and reliability.png (last snapshot and the whole ensemble)."""
    rule = result["rule"]
    plot_accuracy_vs_members(result["curves"], result["single"]["acc"], rule, out_dir / "accuracy_vs_members.png")
    plot_disagreement(result["disagreement"], [s["name"] for s in result["snapshots"]], out_dir / "disagreement.png")
    last = metrics.reliability(logits[-1].softmax(-1), labels, bins)
    full = metrics.reliability(metrics.probabilities(logits, rule), labels, bins, metrics.predictions(logits, rule))
    plot_reliability({"last snapshot": last, f"ensemble of {len(logits)}": full}, out_dir / "reliability.png")


def format_curves(result: dict) -> str:
    """Accuracy of the ensembles of the last m and of the first m snapshots, m = 1..M, for every rule."""
    curves = result["curves"]
    columns = [(end, rule) for end in ("last", "first") for rule in curves[end]]
    lines = ["accuracy of the last m / first m snapshots",
             f"{'m':<4}" + "".join(f"{end + ' ' + rule:>13}" for end, rule in columns)]
    for i in range(len(result["snapshots"])):
        lines.append(f"{i + 1:<4}" + "".join(f"{curves[end][rule][i]['acc']:>13.4f}" for end, rule in columns))
    return "\n".join(lines)


# ---- prediction on new images ---------------------------------------------------------------------------------------
def image_files(target: Path) -> list[Path]:
    """The image file, or the images under the folder (by extension); the other files there are named, skipped."""
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise SnapensError(f"predict={target} does not exist")
    found = sorted(p for p in target.rglob("*") if p.is_file())
    files = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise SnapensError(f"predict={target} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    skipped = [str(p) for p in found if p not in files]
    if skipped:
        log.warning(f"skipped {len(skipped)} files that are not images ({', '.join(IMAGE_EXTENSIONS)}): "
                    f"{', '.join(skipped[:10])}{', ...' if len(skipped) > 10 else ''}")
    return files


def stored_results(run: Path) -> list[tuple[Path, dict]]:
    """What snapens.train (results.json) and this tool (ensemble/test/ensemble.json) fitted on the run's validation
    split, in that order, for the files that exist and parse."""
    found = []
    for path in (run / "results.json", run / "ensemble" / "test" / "ensemble.json"):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


def combination(cfg: DictConfig, paths: list[Path]) -> dict:
    """How predict= combines the members: {"members": the paths, repeats kept, "weights": a weight per member or
    None (uniform), "temperature": T or None, "source": where that came from}. With chosen=NAME, the members (and
    weights) chosen on validation in the run's results.json; with calibrate=val, the temperature fitted on
    validation for exactly these members and rule, where one was stored (none: uncalibrated, said in the log)."""
    stored = stored_results(Path(cfg.run)) if cfg.run else []
    if cfg.chosen:
        return chosen_combination(cfg, paths, stored)
    names = [p.name for p in paths]
    for path, result in stored:  # the all-member calibration of a report on exactly these files and this rule
        fitted = result.get("calibration")
        files = [Path(f).name for f in result.get("ensemble", {}).get("members", [])]
        if cfg.calibrate == "val" and fitted and result.get("rule") == cfg.rule and files == names:
            return {"members": paths, "weights": None, "temperature": fitted["ensemble"]["temperature"],
                    "source": f"temperature fitted on validation, from {path}"}
    why = "calibrate=none" if cfg.calibrate == "none" else "no temperature stored for these members and rule"
    return {"members": paths, "weights": None, "temperature": None, "source": f"uncalibrated ({why})"}


def check_chosen(cfg: DictConfig) -> None:
    """chosen= names members of one run's own snapshots: said before any file is read."""
    if cfg.chosen and (not cfg.run or cfg.members != "all" or cfg.swa):
        raise SnapensError(f"chosen={cfg.chosen} takes the members the run chose on validation: give run=DIR alone "
                           "(no runs=, snapshots=, members= or swa=)")


def chosen_combination(cfg: DictConfig, paths: list[Path], stored: list[tuple[Path, dict]]) -> dict:
    """chosen=last_m|greedy|weighted: the members and weights results.json chose on validation."""
    results = dict(stored).get(Path(cfg.run) / "results.json", {})
    choice = results.get("chosen", {}).get(cfg.chosen)
    if not choice:
        raise SnapensError(f"chosen={cfg.chosen}: {cfg.run}/results.json records no such choice (members are chosen "
                           "when training holds out data.val_size=N; choices: last_m, greedy, weighted)")
    if results.get("rule") != cfg.rule:
        raise SnapensError(f"chosen={cfg.chosen} was chosen for rule={results.get('rule')}; pass that rule")
    by_name = {p.stem: p for p in paths}
    names = choice["members"] if "members" in choice else list(choice["weights"])
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SnapensError(f"chosen={cfg.chosen} names {missing[0]}, which {cfg.run}/snapshots/ no longer holds")
    weights = torch.tensor(list(choice["weights"].values()), dtype=torch.float64) if "weights" in choice else None
    temperature = choice.get("temperature") if cfg.calibrate == "val" else None
    return {"members": [by_name[n] for n in names], "weights": weights, "temperature": temperature,
            "source": f"chosen={cfg.chosen} from {cfg.run}/results.json"
                      + (", with its temperature fitted on validation" if temperature else ", uncalibrated")}


def predict(cfg, paths, metas, device, precision, out_dir: Path) -> Path:
    """predictions.csv: path, predicted class, its probability, and every class's probability; predictions.json:
    how the members were combined. Images are read as the training data was (RGB, resized to the snapshots' image
    size when they differ) and normalised with each snapshot's own training statistics, then combined with the
    configured rule (see `combination` for chosen members, weights and the temperature)."""
    files = image_files(Path(cfg.predict))
    how = combination(cfg, paths)
    height, width = metas[0]["image_size"]
    images = []
    for f in files:
        image = read_image(f, 0)
        images.append(image if tuple(image.shape[1:]) == (height, width) else read_image(f, (height, width)))
    split = Split(torch.stack(images), torch.zeros(len(files), dtype=torch.long)).to(device)  # once, all members
    distinct = list(dict.fromkeys(how["members"]))  # each file once, however often it was chosen
    computed = compute_logits([(p, metas[paths.index(p)]) for p in distinct], split, cfg.batch_size, device,
                              model_maker(device), precision, cfg.channels_last, cfg.batched)
    logits = dict(zip(distinct, computed))
    logits = torch.stack([logits[p] for p in how["members"]])
    if how["weights"] is not None:
        probs = selection.weighted_probabilities(logits, how["weights"], cfg.rule)
    else:
        probs = metrics.probabilities(logits, cfg.rule)
    if how["temperature"] is not None:
        probs = calibration.scale(probs, how["temperature"])
    predicted = probs.argmax(-1) if how["weights"] is not None else metrics.predictions(logits, cfg.rule)
    classes = metas[0]["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "probability", *classes])
        for file, k, p in zip(files, predicted.tolist(), probs.tolist()):
            writer.writerow([str(file), classes[k], f"{p[k]:.6f}", *(f"{q:.6f}" for q in p)])
    record = {"members": [str(p) for p in how["members"]], "rule": cfg.rule, "temperature": how["temperature"],
              "weights": None if how["weights"] is None else how["weights"].tolist(), "source": how["source"]}
    write_atomic(out_dir / "predictions.json", (json.dumps(record, indent=2) + "\n").encode())
    log.info(f"{len(files)} images, {len(how['members'])} members ({cfg.rule}): {how['source']}")
    return out_dir / "predictions.csv"


@hydra.main(version_base="1.3", config_path="../../conf", config_name="ensemble")
def main(cfg: DictConfig) -> float | None:
    try:
        return evaluate(cfg)
    except (SnapensError, OmegaConfBaseException) as e:
        cli.discard_unused_run_dir()
        exit_with(e)


def check_options(cfg: DictConfig) -> None:
    """The command line's own values; the rule through snapens.ensemble's one check."""
    if cfg.calibrate == "test":
        raise SnapensError("calibrate=test would fit the temperature on the images it is then scored on, so the test "
                           "NLL and ECE after it would be tuned on the test set; use calibrate=val (the run's "
                           "validation split: train with data.val_size=N) or calibrate=none")
    allowed = {"split": ("test", "val"), "device": CHOICES["trainer.device"], "precision": CHOICES["trainer.precision"],
               "calibrate": ("val", "none"), "chosen": (None, "last_m", "greedy", "weighted")}
    for key, choices in allowed.items():
        if cfg[key] not in choices:
            raise SnapensError(f"{key}={cfg[key]} is not allowed; choose one of: {', '.join(c for c in choices if c)}")
    try:
        check_rule(cfg.rule)
    except ValueError as e:
        raise SnapensError(str(e)) from None
    for key in ("bins", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise SnapensError(f"{key}={cfg[key]} must be a positive whole number")
    if cfg.predict and not Path(cfg.predict).exists():
        raise SnapensError(f"predict={cfg.predict} does not exist")


def read_members(cfg: DictConfig) -> tuple[list[Path], list[dict]]:
    """The member files, in order, and their metadata, which must be that of snapens.train."""
    paths = [p for group in find_members(cfg) for p in group]
    refuse_copies(paths)
    metas = [read_metadata(p) for p in paths]
    for path, meta in zip(paths, metas):
        missing = [k for k in ("classes", "mean", "std", "model_config", "image_size") if k not in meta]
        if missing:
            raise SnapensError(f"snapshot {path} lacks {', '.join(missing)} in its metadata: it was not written by "
                               "snapens.train")
    return paths, metas


def load_split(cfg: DictConfig, paths: list[Path], metas: list[dict]) -> tuple[Split, Split | None]:
    """The split to evaluate on, from the training config's data, with the members' classes; and the validation
    split to choose members on when that split is test (None without one)."""
    data = build_data(training_config(cfg).data)
    check_same_classes(paths, metas, data.classes)
    split = data.test if cfg.split == "test" else data.val
    if split is None:
        raise SnapensError("split=val but the run held out no validation images (train with data.val_size=N)")
    return split, data.val if cfg.split == "test" else None


def default_dir(out, run, split, swa, predict, fallback: str) -> str:
    """Where the report (or predictions.csv) and the log go: out=, else <run>/predictions with predict=, else
    <run>/ensemble/<split> (<split>_swa for SWA snapshots, so it never replaces the plain report), else `fallback`
    (outputs/ensemble/<date>/<time>: several runs or explicit files). Hydra's run dir is this (a resolver, so the
    log is written beside the report), unless out= points into a snapshots/ folder, which `report_dir` refuses."""
    if out:
        return fallback if "snapshots" in Path(str(out)).parts else str(out)
    if run and (Path(str(run)) / "snapshots").is_dir():  # nothing is made inside a dir that is not a run
        return str(Path(str(run)) / "predictions" if predict else
                   Path(str(run)) / "ensemble" / (f"{split}_swa" if swa else str(split)))
    return fallback


OmegaConf.register_new_resolver("snapens_report_dir", default_dir, replace=True)


def report_dir(cfg: DictConfig, paths: list[Path]) -> Path:
    """The folder the report goes to (`default_dir`); out= inside the snapshots' folder is refused."""
    if cfg.out:
        out, folders = Path(cfg.out).resolve(), {p.parent.resolve() for p in paths}
        if folders & {out, *out.parents}:
            raise SnapensError(f"out={cfg.out} lies inside the snapshots' folder, which only training writes; give "
                               "another out=DIR")
    return Path(default_dir(cfg.out, cfg.run, cfg.split, cfg.swa, cfg.predict, "")
                or HydraConfig.get().runtime.output_dir)


def fit_on_validation(cfg, paths, metas, val: Split | None, logits, labels, device, precision) -> dict:
    """What is fitted on the validation split, when the run held one out, and only then scored on the test split:
    the members chosen (snapens.ensemble.selection) and, with calibrate=val, the temperatures (calibration)."""
    if val is None:
        return {}
    val_logits = cached_logits(paths, metas, val, "val", cfg.batch_size, device, model_maker(device), precision,
                               cfg.channels_last, cfg.batched)
    fitted = {"chosen": selection.choose(val_logits, val.labels, logits, labels, member_names(paths), cfg.rule)}
    temperatures = cfg.calibrate == "val" and calibration.calibrate_run(val_logits, val.labels, logits, labels,
                                                                         cfg.rule, cfg.bins)
    return {**fitted, "calibration": temperatures} if temperatures else fitted


def evaluate(cfg: DictConfig) -> float | None:
    """Check the options, compute (or read) each member's logits once, write the report; the ensemble accuracy.
    With predict=, only predictions.csv for the new images (None)."""
    check_options(cfg)
    if cfg.chosen and not cfg.predict:
        raise SnapensError(f"chosen={cfg.chosen} is for predict=IMAGES (and snapens.export); the report already "
                           "scores every choice")
    check_chosen(cfg)
    paths, metas = read_members(cfg)
    device = pick_device(cfg.device, key="device")
    precision = pick_precision(cfg.precision, device, key="precision")
    if cfg.predict:  # new images only: no report on a split
        log.info(f"predictions: {predict(cfg, paths, metas, device, precision, report_dir(cfg, paths))}")
        return None
    split, val = load_split(cfg, paths, metas)
    out_dir = report_dir(cfg, paths)
    start = time.perf_counter()
    logits = cached_logits(paths, metas, split, cfg.split, cfg.batch_size, device, model_maker(device), precision,
                           cfg.channels_last, cfg.batched)
    seconds = time.perf_counter() - start
    fitted = fit_on_validation(cfg, paths, metas, val, logits, split.labels, device, precision)
    result = report(cfg, paths, metas, logits, split.labels, out_dir, seconds, fitted)
    lines = [selection.format_choice(fitted["chosen"])] if "chosen" in fitted else []
    lines += [calibration.format_calibration(fitted["calibration"])] if "calibration" in fitted else []
    log.info("\n".join(["", format_report(result), *lines, "", format_curves(result), f"report: {out_dir}"]))
    return result["ensemble"]["acc"]


if __name__ == "__main__":
    cli.run(main)
