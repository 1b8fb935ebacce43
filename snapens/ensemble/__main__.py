"""Evaluate the snapshot ensemble of finished runs, and predict on new images: `python -m snapens.ensemble run=DIR`.

One forward pass per snapshot, one model in memory at a time: each snapshot's logits on the split are cached in its
run dir (logits/<split>/), and every ensemble in the report (last m, first m, every rule) is arithmetic on them.
Members are chosen by the user (members=...), never by looking at test accuracy. Nothing here unpickles a file or
writes into snapshots/.
"""

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

from snapens.build import build_data, model_from_metadata, pick_device, pick_precision
from snapens.config import CHOICES, register_configs
from snapens.data import IMAGE_EXTENSIONS, Split, read_image
from snapens.ensemble import predict_logits
from snapens.ensemble import metrics
from snapens.ensemble.cache import cached_logits
from snapens.ensemble.plots import plot_accuracy_vs_members, plot_disagreement, plot_reliability
from snapens.errors import SnapensError, exit_with
from snapens.snapshots import list_snapshots, load_into, read_metadata, write_atomic

register_configs()
log = logging.getLogger(__name__)


# ---- what to evaluate ------------------------------------------------------------------------------------------
def find_members(cfg: DictConfig) -> list[list[Path]]:
    """The snapshot files to ensemble, one list per run (explicit files form one group), after `members`."""
    given = [bool(cfg.run), bool(cfg.runs), bool(cfg.snapshots)]
    if sum(given) != 1:
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
    return paths


def select(paths: list[Path], spec) -> list[Path]:
    """all | last:K | first:K | [cycle numbers]: the members of one run, in cycle order."""
    if isinstance(spec, str) and spec == "all":
        return paths
    if isinstance(spec, str) and spec.split(":")[0] in ("last", "first") and spec.split(":")[-1].isdigit():
        end, k = spec.split(":")[0], int(spec.split(":")[1])
        if not 1 <= k <= len(paths):
            raise SnapensError(f"members={spec} needs 1 <= K <= {len(paths)} (the number of snapshots)")
        return paths[-k:] if end == "last" else paths[:k]
    if isinstance(spec, ListConfig | list) and spec and all(type(c) is int for c in spec):
        by_cycle = {int(p.stem.split("_")[1]): p for p in paths}
        missing = [c for c in spec if c not in by_cycle]
        if missing:
            raise SnapensError(f"members={list(spec)}: no snapshot for cycle {missing[0]}; "
                               f"the run has cycles {sorted(by_cycle)}")
        if len(set(spec)) != len(spec):
            raise SnapensError(f"members={list(spec)} names a cycle twice")
        return [by_cycle[c] for c in sorted(spec)]  # cycle order: "last" and "first" keep their meaning
    raise SnapensError(f"members={spec} is not allowed; use all, last:K, first:K or a list of cycle numbers")


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
def report(cfg, paths, logits, labels, out_dir: Path, logits_seconds: float) -> dict:
    names = [f"{p.parent.parent.name}/{p.stem}" if len({q.parent for q in paths}) > 1 else p.stem for p in paths]
    per_snapshot = [{"file": str(p), "name": n, **metrics.scores(logits[i:i + 1], labels, "logits", cfg.bins)}
                    for i, (p, n) in enumerate(zip(paths, names))]
    curves = metrics.curves(logits, labels, bins=cfg.bins)
    ensemble = metrics.scores(logits, labels, cfg.rule, cfg.bins)
    result = {
        "split": cfg.split, "num_images": len(labels), "rule": cfg.rule,
        "members": {"files": [str(p) for p in paths],
                    "why": f"members={cfg.members} as given; nothing was chosen by looking at {cfg.split} results"},
        "snapshots": per_snapshot, "single": per_snapshot[-1], "ensemble": ensemble, "curves": curves,
        "disagreement": metrics.disagreement(logits).tolist(),
        "logits_seconds": logits_seconds,  # wall time of reading or computing every member's logits
    }
    write_atomic(out_dir / "ensemble.json", (json.dumps(result, indent=2) + "\n").encode())
    plot_accuracy_vs_members(curves, per_snapshot[-1]["acc"], cfg.rule, out_dir / "accuracy_vs_members.png")
    plot_disagreement(result["disagreement"], names, out_dir / "disagreement.png")
    last = metrics.reliability(logits[-1].softmax(-1), labels, cfg.bins)
    full = metrics.reliability(metrics.probabilities(logits, cfg.rule), labels, cfg.bins,
                               metrics.predictions(logits, cfg.rule))
    plot_reliability({"last snapshot": last, f"ensemble of {len(paths)}": full}, out_dir / "reliability.png")
    return result


def format_table(result: dict) -> str:
    """Each snapshot, the ensembles of the last m and first m for every rule, and the chosen ensemble."""
    def scores(s):
        nll = "-" if s["nll"] is None else f"{s['nll']:.4f}"
        return f"{s['acc']:>8.4f}{nll:>8}{s['ece']:>8.4f}"

    rules = list(result["curves"]["last"])
    lines = [f"{result['split']} split, {result['num_images']} images", f"{'snapshot':<24}{'acc':>8}{'nll':>8}{'ece':>8}"]
    lines += [f"{s['name']:<24}{scores(s)}" for s in result["snapshots"]]
    lines += ["", "accuracy of the last m / first m snapshots",
              f"{'m':<4}" + "".join(f"{'last ' + r:>13}" for r in rules) + "".join(f"{'first ' + r:>13}" for r in rules)]
    for i in range(len(result["snapshots"])):
        accs = [result["curves"][end][r][i]["acc"] for end in ("last", "first") for r in rules]
        lines.append(f"{i + 1:<4}" + "".join(f"{a:>13.4f}" for a in accs))
    lines += ["", f"{'single (last snapshot)':<24}{scores(result['single'])}",
              f"{'ensemble of ' + str(len(result['snapshots'])) + ' (' + result['rule'] + ')':<24}"
              f"{scores(result['ensemble'])}"]
    return "\n".join(lines)


# ---- prediction on new images ---------------------------------------------------------------------------------------
def image_files(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise SnapensError(f"predict={target} does not exist")
    files = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise SnapensError(f"predict={target} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def predict(cfg, paths, metas, device, precision, out_dir: Path) -> Path:
    """predictions.csv: path, predicted class, its probability, and every class's probability.

    Images are read as the training data was (RGB, resized to the snapshots' image size when they differ) and
    normalised with each snapshot's own training statistics, then combined with the configured rule.
    """
    files = image_files(Path(cfg.predict))
    height, width = metas[0]["image_size"]
    images = []
    for f in files:
        image = read_image(f, 0)
        images.append(image if tuple(image.shape[1:]) == (height, width) else read_image(f, height))
    split = Split(torch.stack(images), torch.zeros(len(files), dtype=torch.long))
    logits = []
    for path, meta in zip(paths, metas):
        model = build_snapshot_model(path, meta).to(device)
        load_into(model, path)
        logits.append(predict_logits(model, split, meta["mean"], meta["std"], cfg.batch_size, device, precision,
                                     cfg.channels_last))
        del model
    logits = torch.stack(logits)
    probs, predicted = metrics.probabilities(logits, cfg.rule), metrics.predictions(logits, cfg.rule)
    classes = metas[0]["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "probability", *classes])
        for file, k, p in zip(files, predicted.tolist(), probs.tolist()):
            writer.writerow([str(file), classes[k], f"{p[k]:.6f}", *(f"{q:.6f}" for q in p)])
    return out_dir / "predictions.csv"


@hydra.main(version_base="1.3", config_path="../../conf", config_name="ensemble")
def main(cfg: DictConfig) -> float:
    try:
        return evaluate(cfg)
    except (SnapensError, OmegaConfBaseException) as e:
        exit_with(e)


def evaluate(cfg: DictConfig) -> float:
    for key in ("split", "rule", "device", "precision"):
        allowed = {"split": ("test", "val"), "rule": CHOICES["ensemble.rule"], "device": CHOICES["trainer.device"],
                   "precision": CHOICES["trainer.precision"]}
        if cfg[key] not in allowed[key]:
            raise SnapensError(f"{key}={cfg[key]} is not allowed; choose one of: {', '.join(allowed[key])}")
    for key in ("bins", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise SnapensError(f"{key}={cfg[key]} must be a positive whole number")
    if cfg.predict and not Path(cfg.predict).exists():
        raise SnapensError(f"predict={cfg.predict} does not exist")
    groups = find_members(cfg)
    paths = [p for group in groups for p in group]
    metas = [read_metadata(p) for p in paths]
    for path, meta in zip(paths, metas):
        missing = [k for k in ("classes", "mean", "std", "model_config", "image_size") if k not in meta]
        if missing:
            raise SnapensError(f"snapshot {path} lacks {', '.join(missing)} in its metadata: it was not written by "
                               "snapens.train")
    device = pick_device(cfg.device, key="device")
    precision = pick_precision(cfg.precision, device, key="precision")
    train_cfg = training_config(cfg)
    data = build_data(train_cfg.data)
    check_same_classes(paths, metas, data.classes)
    split = data.test if cfg.split == "test" else data.val
    if split is None:
        raise SnapensError("split=val but the run held out no validation images (train with data.val_size=N)")
    report_name = f"{cfg.split}_swa" if cfg.swa else cfg.split  # the SWA report never replaces the plain one
    out_dir = Path(cfg.out) if cfg.out else (Path(cfg.run) / "ensemble" / report_name if cfg.run
                                             else Path(HydraConfig.get().runtime.output_dir))
    start = time.perf_counter()
    logits = cached_logits(paths, metas, split, cfg.split, cfg.batch_size, device, model_maker(device), precision,
                           cfg.channels_last)
    result = report(cfg, paths, logits, split.labels, out_dir, time.perf_counter() - start)
    log.info("\n" + format_table(result) + f"\nreport: {out_dir}")
    if cfg.predict:
        log.info(f"predictions: {predict(cfg, paths, metas, device, precision, out_dir)}")
    return result["ensemble"]["acc"]


if __name__ == "__main__":
    main()
