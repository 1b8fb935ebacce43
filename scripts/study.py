"""The budget study (issue 15): what M snapshots buy at one fixed training budget.

    python scripts/study.py digits                                   # about 15 minutes on one core
    python scripts/study.py cifar -- data.root=data/cifar10-jpeg     # about an hour on one core (12 x 280 s)
    python scripts/study.py --summarise outputs/study/digits         # the tables again, from finished runs

An arm is a preset, conf/experiment/study_<arm>.yaml: a model, data with a validation split, and a budget
(trainer.epochs). The study runs it as one multirun, `python -m snapens.train -m experiment=study_<arm>
scheduler.cycles=1,2,3,5 trainer.seed=0,1,2 [overrides after --]`, into outputs/study/<arm>/ (--out), so every M
splits the same budget into M cosine cycles (M = 1: a single cosine annealing, the baseline). Then it reads every
run's results.json and writes study.md, study.csv and study.png beside the runs: for each M, the mean ± sample std
over seeds of the test accuracy, NLL and ECE of

    last      the last snapshot alone
    all       the uniform ensemble of all M snapshots (the rule of the runs, logits by default)
    ..., T    the last snapshot and that ensemble after temperature scaling fitted on validation (same accuracy)
    last m    the last m snapshots, m chosen on validation NLL
    greedy    greedy selection with replacement on validation (Caruana et al. 2004)
    weighted  every snapshot with a weight fitted on validation NLL

and each one's accuracy gain over the single cosine run (M = 1) of the same seed: the question a user asks is
whether M cycles beat one run of the same cost. Members and weights are chosen on validation by snapens.train
itself (snapens/ensemble/selection.py); the test split is only read to score them."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file from anywhere: snapens is importable without an install too

from snapens.errors import SnapensError, exit_with  # noqa: E402
from snapens.files import save_figure, write_atomic  # noqa: E402
from snapens.report import finished_runs, mean_std, table_csv  # noqa: E402

KINDS = {"last": "last snapshot", "last_t": "last snapshot, T (val)", "all": "all snapshots",
         "all_t": "all snapshots, T (val)", "last_m": "last m (val)", "greedy": "greedy (val)",
         "weighted": "weighted (val)"}
METRICS = ("acc", "nll", "ece")


def read_run(run: Path) -> dict:
    """One run's M, seed and the test scores of each kind of ensemble; a kind the run lacks (no validation split,
    or a vote's weights) is left out."""
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    results = json.loads((run / "results.json").read_text())
    scores = {"last": results["single"], "all": results["ensemble"]}
    scores.update({k: c["test"] for k, c in results.get("chosen", {}).items() if k != "by"})
    for kind, name in (("last_t", "single"), ("all_t", "ensemble")):  # temperature-scaled: the same predictions
        if "calibration" in results:
            scores[kind] = {"acc": results[name]["acc"], **results["calibration"][name]["test"]["after"]}
    return {"dir": run, "cycles": len(results["snapshots"]), "seed": config["trainer"]["seed"],
            "epochs": config["trainer"]["epochs"], "scores": scores, "chosen": results.get("chosen", {})}


def summarise(records: list[dict]) -> list[dict]:
    """One row per M (ascending): each kind's metrics as (mean, std) over the seeds, and its accuracy gain over
    the M = 1 run of the same seed, paired, where that run is among the records."""
    budgets = {r["epochs"] for r in records}
    if len(budgets) != 1:
        raise SystemExit(f"study.py: the runs have different budgets (trainer.epochs {sorted(budgets)}); a study "
                         "compares M at one budget")
    baseline = {r["seed"]: r["scores"]["last"]["acc"] for r in records if r["cycles"] == 1}
    rows = []
    for m in sorted({r["cycles"] for r in records}):
        runs = sorted((r for r in records if r["cycles"] == m), key=lambda r: r["seed"])
        row = {"cycles": m, "seeds": [r["seed"] for r in runs], "kinds": {}}
        for kind in KINDS:
            have = [r["scores"][kind] for r in runs if kind in r["scores"]]
            if len(have) != len(runs):
                continue
            entry = {metric: mean_std([s[metric] for s in have]) for metric in METRICS if have[0][metric] is not None}
            paired = [r["scores"][kind]["acc"] - baseline[r["seed"]] for r in runs if r["seed"] in baseline]
            entry["gain"] = mean_std(paired) if len(paired) == len(runs) else None
            row["kinds"][kind] = entry
        rows.append(row)
    return rows


def cell(value: tuple[float, float | None] | None, scale: float, digits: int, sign: bool = False) -> str:
    if value is None:
        return "-"
    mean, std = value
    form = f"{'+' if sign else ''}.{digits}f"
    return f"{scale * mean:{form}} ± {'-' if std is None else f'{scale * std:.{digits}f}'}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one line per M and kind of ensemble."""
    header = ["M", "ensemble", "test acc (%)", "gain over M=1 (pp)", "test NLL", "test ECE (%)"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * 4) + " |"]
    for row in rows:
        for kind, e in row["kinds"].items():
            if row["cycles"] == 1 and kind not in ("last", "last_t"):  # one snapshot: every ensemble is it
                continue
            lines.append(f"| {row['cycles']} | {KINDS[kind]} | {cell(e['acc'], 100, 2)} | "
                         f"{cell(e['gain'], 100, 2, sign=True)} | {cell(e.get('nll'), 1, 3)} | "
                         f"{cell(e['ece'], 100, 2)} |")
    return "\n".join(lines)


def csv_bytes(rows: list[dict]) -> bytes:
    """study.csv: raw fractions and nats, full precision; empty where a value is unknown."""
    header = ["cycles", "kind", "n"] + [f"{m}_{s}" for m in (*METRICS, "gain") for s in ("mean", "std")]
    return table_csv([header, *([row["cycles"], kind, len(row["seeds"])]
                                + [x for m in (*METRICS, "gain") for x in (e.get(m) or (None, None))]
                                for row in rows for kind, e in row["kinds"].items())])


def plot(rows: list[dict], path: Path, title: str) -> None:
    """study.png: test accuracy and NLL against M for each kind, mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, kind in enumerate(KINDS):
        kept = [r for r in rows if kind in r["kinds"] and (r["cycles"] > 1 or kind in ("last", "last_t"))]
        for ax, metric, scale in ((axes[0], "acc", 100), (axes[1], "nll", 1)):
            points = [(r["cycles"] + 0.03 * (i - 3), r["kinds"][kind][metric]) for r in kept
                      if metric in r["kinds"][kind]]
            if points:
                ax.errorbar([x for x, _ in points], [scale * v[0] for _, v in points],
                            yerr=[scale * (v[1] or 0.0) for _, v in points], marker="o", capsize=3, label=KINDS[kind])
    axes[0].set(xlabel="M (cycles in the budget)", ylabel="test accuracy (%)")
    axes[1].set(xlabel="M (cycles in the budget)", ylabel="test NLL (nats)")
    for ax in axes:
        ax.set_xticks(sorted({r["cycles"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(f"{title}: mean ± std over seeds")
    save_figure(fig, path)


def write_summary(folder: Path) -> list[dict]:
    records = [read_run(run) for run in finished_runs([folder])]
    rows = summarise(records)
    table = format_table(rows)
    seeds = sorted({r["seed"] for r in records})
    head = (f"{len(records)} runs in {folder}, seeds {seeds}, budget {records[0]['epochs']:g} epochs; "
            "accuracy gain paired with the M=1 run of the same seed")
    write_atomic(folder / "study.md", f"# Budget study\n\n{head}\n\n{table}\n".encode())
    write_atomic(folder / "study.csv", csv_bytes(rows))
    plot(rows, folder / "study.png", folder.name)
    print(f"{head}\n\n{table}\n\nwrote study.md, study.csv and study.png to {folder}")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", nargs="?", help="the preset conf/experiment/study_<arm>.yaml: digits or cifar")
    parser.add_argument("--cycles", default="1,2,3,5", help="values of scheduler.cycles (default 1,2,3,5)")
    parser.add_argument("--seeds", default="0,1,2", help="values of trainer.seed (default 0,1,2)")
    parser.add_argument("--out", type=Path, help="the sweep dir (default outputs/study/<arm>)")
    parser.add_argument("--summarise", type=Path, metavar="DIR", help="only summarise the finished runs in DIR")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.summarise:
        try:
            write_summary(args.summarise)
        except SnapensError as e:
            exit_with(e)
        return
    if not args.arm or not (ROOT / "conf" / "experiment" / f"study_{args.arm}.yaml").exists():
        parser.error(f"arm {args.arm!r}: give one of digits, cifar (conf/experiment/study_<arm>.yaml)")
    out = args.out or Path("outputs") / "study" / args.arm
    command = [sys.executable, "-m", "snapens.train", "-m", f"experiment=study_{args.arm}",
               f"scheduler.cycles={args.cycles}", f"trainer.seed={args.seeds}", f"hydra.sweep.dir={out}", *overrides]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    write_summary(out)


if __name__ == "__main__":
    main()
