"""The ensemble tool behind `python -m snapens.ensemble run=DIR`: evaluate finished runs, predict on new images.

One forward pass per snapshot, one model in memory at a time: each snapshot's logits on the split are cached in its
run dir (logits/<split>/), and every ensemble in the report (last m, first m, every rule) is arithmetic on them.
Members are chosen by the user (members=...), never by looking at test accuracy. Nothing here unpickles a file or
writes into snapshots/."""

import csv
import io
import json
import logging
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from snapens.build import data_source, pick_device, pick_precision, subsets
from snapens.checkpoint import deciding_values, refuse_while_training
from snapens.config import check_inference_options, schema_of
from snapens.data import Split, choose, placement
from snapens.images import IMAGE_EXTENSIONS, read_images
from snapens.ensemble import calibration, members as found, metrics, rules, selection, uncertainty
from snapens.ensemble.cache import cached_logits, compute_logits, model_maker
from snapens.ensemble.report import build_report, format_report
from snapens.ensemble.plots import plot_accuracy_vs_members, plot_disagreement, plot_reliability
from snapens.errors import SnapensError
from snapens.schemas import DataConfig, default_dir
from snapens.files import refuse_to_replace, write_atomic, sweep_leftovers

log = logging.getLogger("snapens.ensemble")  # the command's name, as in every ensemble.log


def load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise SnapensError(f"{path} does not exist: it names the data to evaluate on (pass config=PATH)")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml's scanner and parser errors share no useful base class
        raise SnapensError(f"{path} is not a readable config ({type(e).__name__}); pass another config=PATH")


def same_data(a: DictConfig, b: DictConfig) -> bool:
    """The same images and splits: the data keys that decide a result (checkpoint.deciding_values: not how the
    images are held, nor keys added since at the value that trains as before), but where the files are and whether
    they may be downloaded."""
    def deciding(data: DictConfig) -> dict:
        values = deciding_values({"data": OmegaConf.to_container(data)})
        return {k: v for k, v in values.items() if k not in ("data.root", "data.download")}
    return deciding(a) == deciding(b)


def check_same_data(runs: list[Path], train_cfg: DictConfig, source) -> None:
    """Every run trained on the data `train_cfg` (from `source`) describes."""
    for run in runs:
        if not same_data(load_yaml(run / ".hydra" / "config.yaml").data, train_cfg.data):
            raise SnapensError(f"run {run} trained on other data than {source} describes (sizes, limits, "
                               "validation split or seed differ): an ensemble is scored on one data set")


def training_config(cfg: DictConfig) -> DictConfig:
    """The config whose data section names the images: `config=`, else the (first) run's. Every run evaluated must
    have trained on the same data, so that a val split is really held out and a test set is one test set."""
    if cfg.snapshots and not cfg.config:
        raise SnapensError("snapshots=[...] needs config=PATH, a training config.yaml that names the data")
    runs = [Path(r) for r in ([cfg.run] if cfg.run else cfg.runs)]
    train_cfg = load_yaml(Path(cfg.config) if cfg.config else runs[0] / ".hydra" / "config.yaml")
    check_same_data(runs, train_cfg, cfg.config or runs[0])
    if cfg.data_root:
        train_cfg.data.root = cfg.data_root
    return typed_data(train_cfg, cfg.config or runs[0] / ".hydra" / "config.yaml")


def typed_data(train_cfg: DictConfig, source) -> DictConfig:
    """The config with its data section typed by the schema training used: a hand-edited "abc" for a number is one
    line naming `source`, not a traceback."""
    if "data" not in train_cfg or "name" not in train_cfg.data:
        raise SnapensError(f"{source} has no data section naming the data set; pass config=PATH of a training run")
    try:
        schema = schema_of(train_cfg, "data") or DataConfig
        train_cfg.data = OmegaConf.merge(OmegaConf.structured(schema), train_cfg.data)
    except OmegaConfBaseException as e:
        raise SnapensError(f"{source}: data.{e.key}: {str(e).splitlines()[0]}") from None
    return train_cfg


# ---- the report ---------------------------------------------------------------------------------------------------
def report(cfg, paths, metas, logits, labels, out_dir: Path, logits_seconds: float, fitted: dict) -> dict:
    """ensemble.json (`build_report`'s report, why these members, curves, disagreement, logits time, and what was
    fitted on the validation split when there is one: `fitted`'s "chosen" members and "calibration") and the
    figures."""
    members = [{"file": str(p), "name": n, "cycle": m.get("cycle"), "step": m.get("step")}
               for p, n, m in zip(paths, found.names(paths), metas)]
    result = {**build_report(logits, labels, members, cfg.rule, cfg.bins, cfg.split),
              "why": f"members={cfg.members} as given; nothing was chosen by looking at {cfg.split} results",
              "curves": metrics.curves(logits, labels, bins=cfg.bins),
              "disagreement": metrics.disagreement(logits).tolist(),
              "gains": uncertainty.gains(logits, labels, cfg.rule, fitted.get("chosen", {}), found.names(paths),
                                         cfg.split),
              "logits_seconds": logits_seconds}  # wall time of reading or computing every member's logits
    result.update(fitted)
    write_atomic(out_dir / "ensemble.json", (json.dumps(result, indent=2) + "\n").encode())
    plot_report(result, logits, labels, cfg.bins, out_dir, source_of(paths, cfg.split))
    return result


def source_of(paths: list[Path], split: str) -> str:
    """Whose figures: the run dir of the members (the last two parts of each: <date>/<time>, or <sweep>/<job>)
    and the split."""
    runs = dict.fromkeys("/".join(p.resolve().parent.parent.parts[-2:]) for p in paths)
    return f"{', '.join(runs) if len(runs) <= 2 else f'{len(runs)} runs'}, {split}"


def plot_report(result: dict, logits: torch.Tensor, labels: torch.Tensor, bins: int, out_dir: Path,
                source: str = "") -> None:
    """accuracy_vs_members.png, disagreement.png and reliability.png (last snapshot and the whole ensemble), each
    titled with `source` (source_of)."""
    rule = result["rule"]
    plot_accuracy_vs_members(result["curves"], result["single"]["acc"], rule, out_dir / "accuracy_vs_members.png",
                             source)
    plot_disagreement(result["disagreement"], [s["name"] for s in result["snapshots"]], out_dir / "disagreement.png",
                      source)
    last = metrics.reliability(metrics.probabilities(logits[-1:]), labels, bins)
    full = metrics.reliability(metrics.probabilities(logits, rule), labels, bins, metrics.predictions(logits, rule))
    plot_reliability({f"last snapshot (ECE {result['single']['ece']:.4f})": last,
                      f"ensemble of {len(logits)} (ECE {result['ensemble']['ece']:.4f})": full},
                     out_dir / "reliability.png", source)


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
        raise SnapensError(f"predict={target} does not exist: give an image file or a folder of images")
    listed = sorted(p for p in target.rglob("*") if p.is_file())
    files = [p for p in listed if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise SnapensError(f"predict={target} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    warn_skipped([str(p) for p in listed if p not in files])
    return files


def warn_skipped(skipped: list[str]) -> None:
    if skipped:
        log.warning(f"skipped {len(skipped)} files that are not images ({', '.join(IMAGE_EXTENSIONS)}): "
                    f"{', '.join(skipped[:10])}{', ...' if len(skipped) > 10 else ''}")


def cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: one starting with =, +, - or @ (a formula to it) gets a leading '."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@") else text


def stored_probabilities(logits: torch.Tensor, rule: str, weights, how: dict) -> torch.Tensor:
    """The members' probabilities with weights and a temperature read from a file: checked where they are applied,
    a bad one said in one line naming where it came from."""
    try:
        return rules.probabilities(logits.double(), rule, weights, how["temperature"])
    except ValueError as e:
        raise SnapensError(f"{how['source']}: {e}; train or evaluate the run again to store new ones") from None


def predict(cfg, paths, metas, device, precision, out_dir: Path) -> Path:
    """predictions.csv: path, predicted class, its probability, and every class's probability; predictions.json:
    how the members were combined. Images are read as the training data was (RGB, resized to the snapshots' image
    size when they differ) and normalised with each snapshot's own training statistics, then combined with the
    configured rule (see `combination` for chosen members, weights and the temperature)."""
    files = image_files(Path(cfg.predict))
    found.check_same_classes(paths, metas)  # one class list names the columns
    how = found.combination(paths, cfg.run, cfg.rule, cfg.calibrate, cfg.chosen)
    height, width = metas[0]["image_size"]
    images = read_images(files, (height, width))
    split = Split(images, torch.zeros(len(files), dtype=torch.long)).to(device)  # once, all members
    members, weights = found.distinct(how)  # each file once, weighing as often as it was chosen
    uniform = how["weights"] is None and len(members) == len(how["members"])
    computed = compute_logits([(p, metas[paths.index(p)]) for p in members], split, cfg.batch_size, device,
                              model_maker(device), precision, cfg.channels_last, cfg.batched)
    logits, weights = torch.stack(computed), None if uniform else weights
    probs = stored_probabilities(logits, cfg.rule, weights, how)
    predicted = rules.predictions(logits, cfg.rule, weights)
    classes = metas[0]["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(map(cell, ["path", "class", "probability", *classes]))
    for file, k, p in zip(files, predicted.tolist(), probs.tolist()):
        writer.writerow([cell(str(file)), cell(classes[k]), f"{p[k]:.6f}", *(f"{q:.6f}" for q in p)])
    write_atomic(out_dir / "predictions.csv", table.getvalue().encode())  # whole, and never through a link
    record = {"members": [str(p) for p in how["members"]], "rule": cfg.rule, "temperature": how["temperature"],
              "weights": None if how["weights"] is None else how["weights"].tolist(), "source": how["source"]}
    write_atomic(out_dir / "predictions.json", (json.dumps(record, indent=2) + "\n").encode())
    log.info(f"{len(files)} images, {len(how['members'])} members ({cfg.rule}): {how['source']}")
    return out_dir / "predictions.csv"


def load_split(cfg: DictConfig, paths: list[Path], metas: list[dict]) -> tuple[Split, Split | None]:
    """The split to evaluate on, from the training config's data, with the members' classes; and the validation
    split to choose members on when that split is test (None without one)."""
    data = training_config(cfg).data
    train, test, classes = data_source(data)
    found.check_same_classes(paths, metas, classes)
    splits = choose(train, test, **subsets(data))  # the training images are not read, only their labels
    _, val, test = splits
    if cfg.split == "val" and val is None:
        raise SnapensError("split=val but the run held out no validation images (train with data.val_size=N)")
    place = placement(splits, data.get("storage", "memory"), data.get("workers", 0), data.get("memory_gib", 8))
    val = place(val)  # held as training held it (runs made before data.storage held theirs in memory)
    return (place(test), val) if cfg.split == "test" else (val, None)


def report_dir(cfg: DictConfig, paths: list[Path]) -> Path:
    """The folder the report goes to (`default_dir`), swept of the temporary files a killed call left there; out=
    inside the snapshots' folder is refused."""
    if cfg.out:
        out, folders = Path(cfg.out).resolve(), {p.parent.resolve() for p in paths}
        if folders & {out, *out.parents}:
            raise SnapensError(f"out={cfg.out} lies inside the snapshots' folder, which only training writes; give "
                               "another out=DIR")
    folder = Path(default_dir(cfg.out, cfg.run, cfg.split, cfg.swa, cfg.predict, "")
                  or HydraConfig.get().runtime.output_dir)
    sweep_leftovers(folder)
    return folder


def fit_on_validation(cfg, paths, metas, val: Split | None, logits, labels, device, precision) -> dict:
    """What is fitted on the validation split, when the run held one out, and only then scored on the test split:
    the members chosen (snapens.ensemble.selection) and, with calibrate=val, the temperatures (calibration)."""
    if val is None:
        return {}
    val_logits = cached_logits(paths, metas, val, "val", cfg.batch_size, device, model_maker(device), precision,
                               cfg.channels_last, cfg.batched)
    fitted = {"chosen": selection.choose(val_logits, val.labels, logits, labels, found.names(paths), cfg.rule)}
    temperatures = cfg.calibrate == "val" and calibration.calibrate_run(val_logits, val.labels, logits, labels,
                                                                         cfg.rule, cfg.bins)
    return {**fitted, "calibration": temperatures} if temperatures else fitted


def evaluate(cfg: DictConfig) -> float | None:
    """Check the options, compute (or read) each member's logits once, write the report; the ensemble accuracy.
    With predict=, only predictions.csv for the new images (None)."""
    check_inference_options(cfg)
    if cfg.chosen and not cfg.predict:
        raise SnapensError(f"chosen={cfg.chosen} is for predict=IMAGES (and snapens.export); the report already "
                           "scores every choice")
    found.check_chosen(cfg.chosen, cfg.run, cfg.members, cfg.swa)
    refuse_while_training([cfg.run] if cfg.run else cfg.runs)
    paths = [p for group in found.find(cfg.run, cfg.runs, cfg.snapshots, cfg.members, cfg.swa) for p in group]
    metas = found.read(paths)
    device = pick_device(cfg.device, key="device")
    precision = pick_precision(cfg.precision, device, key="precision")
    if cfg.predict:  # new images only: no report on a split
        out_dir = report_dir(cfg, paths)
        refuse_to_replace(out_dir / "predictions.csv", cfg.overwrite)
        log.info(f"predictions: {predict(cfg, paths, metas, device, precision, out_dir)}")
        return None
    split, val = load_split(cfg, paths, metas)
    out_dir = report_dir(cfg, paths)
    refuse_to_replace(out_dir / "ensemble.json", cfg.overwrite)
    start = time.perf_counter()
    logits = cached_logits(paths, metas, split, cfg.split, cfg.batch_size, device, model_maker(device), precision,
                           cfg.channels_last, cfg.batched)
    seconds = time.perf_counter() - start
    fitted = fit_on_validation(cfg, paths, metas, val, logits, split.labels, device, precision)
    result = report(cfg, paths, metas, logits, split.labels, out_dir, seconds, fitted)
    lines = [selection.format_choice(fitted["chosen"])] if "chosen" in fitted and len(paths) > 1 else []
    lines += [calibration.format_calibration(fitted["calibration"])] if "calibration" in fitted else []
    log.info("\n".join(["", format_report(result), *lines, "", format_curves(result), f"report: {out_dir}"]))
    return result["ensemble"]["acc"]
