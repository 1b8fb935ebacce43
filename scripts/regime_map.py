"""The regime map (issue 26): where does a snapshot ensemble beat one run of the same cost?

    python scripts/regime_map.py run --root data/cifar10-jpeg --out outputs/regime   # hours on one core; resumable
    python scripts/regime_map.py list                                                # the cells and their commands

One cell is a model capacity (ResNet-8 or ResNet-20), a training-set size (1,000 or 4,000 CIFAR-10 images, 1,000
more held out for validation, the whole 10,000-image test set scored) and a budget in updates (about 2,500 or 10,000
at batch 32, so 4 cycles of about 625 or 2,500 updates), trained four ways at that one budget:

    M1    one cosine annealing (scheduler=snapshot, cycles=1): the baseline every arm pays the same for
    M4    4 equal cosine cycles, a snapshot at each end (Huang et al. 2017, arXiv 1704.00109)
    swa4  the same 4 cycles, each snapshot the average of its cycle's second half (SWA, arXiv 1803.05407)
    fge4  cosine down to alpha_1, then 4 short FGE cycles of budget/20 (Garipov et al. 2018, arXiv 1802.10026)

After the M1 and M4 runs of every cell, the two most telling cells (CONFIRM) are trained with seeds 1 and 2 as well.
Each run is its own `python -m snapens.train` in OUT/<cell>/; a cell whose results.json exists is skipped, and an
unfinished one is resumed by running its command again on its run dir (trainer.resume=auto), so a killed or stopped
map picks up where it was. Runs are ordered cheapest and most telling first: M1 and M4 of every cell, short budget
first, then the confirmation seeds, then SWA and FGE of the two telling cells, then of the others.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file from anywhere: snapens is importable without an install too

DEPTHS = (8, 20)
# epochs that give about 2,500 and 10,000 updates at batch 32 for each training-set size
BUDGETS = {1000: (80, 320), 4000: (20, 80)}
ARMS = {
    "M1": lambda epochs: ["scheduler=snapshot", "scheduler.cycles=1"],
    "M4": lambda epochs: ["scheduler=snapshot", "scheduler.cycles=4"],
    "swa4": lambda epochs: ["scheduler=snapshot", "scheduler.cycles=4", "trainer.swa.start=0.5"],
    "fge4": lambda epochs: ["scheduler=fge", "scheduler.cycles=4", "scheduler.eta_max=0.2",
                            f"scheduler.cycle_length={epochs / 20:g}"],
}


# The two most telling cells of the map's first seed: where the ensemble pays most, and where it loses at the same
# budget (docs/results.md); each is trained again with seeds 1 and 2 (<cell>_s<seed>_<arm>) right after the map's
# M1 and M4 runs, before SWA and FGE.
CONFIRM = ("r20_n1000_e320", "r8_n4000_e80")


def arm_runs(cell: str, base: list[str], epochs: int, arms=tuple(ARMS)) -> list[tuple[str, list[str]]]:
    """(<cell>_<arm>, overrides) of one cell's runs: its own overrides, then the arm's."""
    return [(f"{cell}_{arm}", [*base, *ARMS[arm](epochs)]) for arm in arms]


def cells() -> list[tuple[str, list[str]]]:
    """(name, overrides) of every run, in the order they are trained."""
    out = []
    for arms in (("M1", "M4"), ("swa4", "fge4")):
        for budget in (0, 1):
            for size, epochs_of in BUDGETS.items():
                for depth in DEPTHS:
                    epochs = epochs_of[budget]
                    out += arm_runs(f"r{depth}_n{size}_e{epochs}", [f"model.depth={depth}", f"data.train_limit={size}",
                                    f"trainer.epochs={epochs}", "trainer.batch_size=32"], epochs, arms)
        if arms == ("M1", "M4"):
            first = dict(out)
            out += [(f"{cell}_s{seed}_{arm}", [*first[f"{cell}_{arm}"], f"trainer.seed={seed}"])
                    for cell in CONFIRM for seed in (1, 2) for arm in ("M1", "M4")]

    def later(run) -> bool:  # of SWA and FGE, the two telling cells' runs first (sorted() keeps the order otherwise)
        return run[0].endswith(("_swa4", "_fge4")) and run[0].rsplit("_", 1)[0] not in CONFIRM
    return sorted(out, key=later)


def command(name: str, overrides: list[str], root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "snapens.train", "experiment=study_cifar", f"data.root={root}", *overrides,
            f"hydra.run.dir={out / name}"]


def run(root: Path, out: Path, runs: list[tuple[str, list[str]]] | None = None) -> None:
    """Train every run (default: the map's) whose dir has no results.json yet; an unfinished one resumes."""
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in runs or cells():
        if (out / name / "results.json").exists():
            continue
        print(f"{time.strftime('%H:%M:%S')} {name}: {' '.join(overrides)}", flush=True)
        done = subprocess.run(command(name, overrides, root, out))
        print(f"{time.strftime('%H:%M:%S')} {name}: exit {done.returncode}", flush=True)


def test_logits(run: Path):
    """M x N x C: the run's snapshots' test logits, as its training cached them (logits/test/)."""
    import torch
    from safetensors import safe_open

    out = []
    for path in sorted((run / "logits" / "test").glob("cycle_??.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.append(f.get_tensor("logits"))
    return torch.stack(out).double()


def train_accuracy(run: Path, steps: list[int]) -> list[float]:
    """The running training accuracy of the epoch each snapshot ends (metrics.jsonl; augmented batches)."""
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [next(e["train_acc"] for e in epochs if e["step"] >= step) for step in steps]


def swa_logits(run: Path, test):
    """M x N x C: the run's per-cycle SWA averages (cycle_XX_swa) on the test images, computed here: training caches
    the test logits of its plain snapshots only."""
    import torch

    from snapens import Ensemble

    ensemble = Ensemble.from_run(run, swa=True)
    with torch.no_grad():
        return torch.cat([ensemble.logits(x) for x in test.images.split(500)], dim=1).double()


def summarise_cell(cell: str, out: Path, test) -> dict | None:
    """One cell's M4 run (and its SWA and FGE runs, where finished) against its M1 run, paired on the test images
    (snapens.ensemble.uncertainty); each ensemble is the uniform mean of its members' logits."""
    from snapens.ensemble import rules, uncertainty

    runs = {arm: out / f"{cell}_{arm}" for arm in ARMS}
    finished = {arm for arm, r in runs.items() if (r / "results.json").exists()}
    if not {"M1", "M4"} <= finished:
        return None
    results = {arm: json.loads((runs[arm] / "results.json").read_text()) for arm in ("M1", "M4")}
    labels = test.labels

    def scored(z):  # per image: right and NLL of the uniform ensemble of z's members
        return uncertainty.per_image(rules.probabilities(z), rules.predictions(z), labels)

    one, z4 = scored(test_logits(runs["M1"])), test_logits(runs["M4"])
    steps = [s["step"] for s in results["M4"]["snapshots"]]
    row = {"cell": cell, "updates_per_cycle": steps[0], "M1_acc": results["M1"]["single"]["acc"],
           "M1_nll": results["M1"]["single"]["nll"],
           "M1_train_acc": train_accuracy(runs["M1"], [results["M1"]["snapshots"][-1]["step"]])[0],
           "M4_train_acc": train_accuracy(runs["M4"], steps), "M4_snapshot_acc": [s["acc"] for s in
                                                                                  results["M4"]["snapshots"]],
           "M4_last_acc": results["M4"]["single"]["acc"], "M4_all_acc": results["M4"]["ensemble"]["acc"],
           "M4_all_nll": results["M4"]["ensemble"]["nll"]}
    greedy = [int(n[-2:]) - 1 for n in results["M4"]["chosen"]["greedy"]["members"]]
    row["all_vs_M1"], row["greedy_vs_M1"] = uncertainty.gain(scored(z4), one), uncertainty.gain(scored(z4[greedy]), one)
    row["M4_vs_M1"] = row["all_vs_M1"]  # beside SWA's and FGE's, under the same names
    for arm, logits in (("swa4", lambda r: swa_logits(r, test)), ("fge4", test_logits)):
        if arm in finished:
            combined = scored(logits(runs[arm]))
            row[f"{arm}_all_acc"], row[f"{arm}_vs_M1"] = float(combined[0].mean()), uncertainty.gain(combined, one)
    return row


def interval(g: dict | None, scale: float = 100, digits: int = 2) -> str:
    """A paired gain as `+1.10 [+0.24, +2.00]` (points for accuracy: scale 100), '-' when there is none."""
    if not g:
        return "-"
    return f"{scale * g['gain']:+.{digits}f} [{scale * g['low']:+.{digits}f}, {scale * g['high']:+.{digits}f}]"


def map_table(rows: list[dict]) -> list[str]:
    """The map: each cell's M4 run against its M1 run (seed 0)."""
    table = ["| cell | updates per cycle | train acc at each M4 snapshot (%) | M1 test acc (%) | M4 last | M4 all "
             "| all vs M1 (pp, 95%) | greedy (val) vs M1 (pp, 95%) | NLL: all vs M1 (95%) |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        table.append(f"| {r['cell']} | {r['updates_per_cycle']} | "
                     f"{' '.join(f'{100 * a:.0f}' for a in r['M4_train_acc'])} | {100 * r['M1_acc']:.2f} | "
                     f"{100 * r['M4_last_acc']:.2f} | {100 * r['M4_all_acc']:.2f} | {interval(r['all_vs_M1']['acc'])} "
                     f"| {interval(r['greedy_vs_M1']['acc'])} | {interval(r['all_vs_M1'].get('nll'), 1, 3)} |")
    return table


def seed_of(cell: str) -> tuple[str, int]:
    """r20_n1000_e320_s2 -> (r20_n1000_e320, 2); a map cell is seed 0."""
    seeded = re.fullmatch(r"(.+)_s(\d+)", cell)
    return (seeded[1], int(seeded[2])) if seeded else (cell, 0)


def spread(values: list[float], scale: float = 100, digits: int = 2) -> str:
    """mean ± sample std, as `+1.09 ± 2.71`."""
    return f"{scale * statistics.mean(values):+.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def seeds_table(rows: list[dict]) -> list[str]:
    """Cells trained with several seeds: each seed's paired gain (its interval: the test images' sampling error),
    then mean ± sample std over the seeds (the seed-to-seed spread, which the intervals leave out)."""
    table = ["| cell | seed | M1 test acc (%) | M4 all | all vs M1 (pp, 95%) | NLL: all vs M1 (95%) |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(seed_of(r["cell"])[0], []).append(r)
    for base, group in groups.items():
        if len(group) < 2:
            continue
        for r in group:
            table.append(f"| {base} | {seed_of(r['cell'])[1]} | {100 * r['M1_acc']:.2f} | {100 * r['M4_all_acc']:.2f} "
                         f"| {interval(r['all_vs_M1']['acc'])} | {interval(r['all_vs_M1'].get('nll'), 1, 3)} |")
        gains = [r["all_vs_M1"]["acc"]["gain"] for r in group]
        nlls = [r["all_vs_M1"]["nll"]["gain"] for r in group if "nll" in r["all_vs_M1"]]
        table.append(f"| {base} | mean ± std of {len(group)} | "
                     f"{spread([r['M1_acc'] for r in group]).lstrip('+')} | "
                     f"{spread([r['M4_all_acc'] for r in group]).lstrip('+')} | {spread(gains)} | "
                     + (f"{spread(nlls, 1, 3)} |" if len(nlls) == len(group) else "- |"))
    return table


def others_table(rows: list[dict]) -> list[str]:
    """SWA per cycle and FGE at the cost of one run, beside the 4 snapshots, where they have run."""
    table = ["| cell | ensemble of 4 | test acc (%) | vs M1 (pp, 95%) | NLL vs M1 (95%) |",
             "| --- | --- | ---: | --- | --- |"]
    names = {"M4": "snapshots (M4)", "swa4": "SWA averages, one per cycle", "fge4": "FGE snapshots"}
    for r in rows:
        if not any(f"{arm}_vs_M1" in r for arm in ("swa4", "fge4")):
            continue
        for arm, name in names.items():
            gain, acc = r.get(f"{arm}_vs_M1"), r.get(f"{arm}_all_acc")
            if gain:
                table.append(f"| {r['cell']} | {name} | {100 * acc:.2f} | {interval(gain['acc'])} | "
                             f"{interval(gain.get('nll'), 1, 3)} |")
    return table


CSV = ["cell", "updates_per_cycle", "M1_acc", "M1_nll", "M1_train_acc", "M4_last_acc", "M4_all_acc", "M4_all_nll",
       "M4_train_acc", "M4_snapshot_acc", "all_vs_M1_acc", "all_vs_M1_acc_low", "all_vs_M1_acc_high", "all_vs_M1_nll",
       "greedy_vs_M1_acc", "greedy_vs_M1_acc_low", "greedy_vs_M1_acc_high", "swa4_all_acc", "swa4_vs_M1_acc",
       "swa4_vs_M1_acc_low", "swa4_vs_M1_acc_high", "swa4_vs_M1_nll", "fge4_all_acc", "fge4_vs_M1_acc",
       "fge4_vs_M1_acc_low", "fge4_vs_M1_acc_high", "fge4_vs_M1_nll"]


def csv_row(r: dict) -> list:
    """One row of regime.csv (full precision; empty where an arm has not run)."""
    flat = {k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items() if "_vs_" not in k}
    for key, g in r.items():
        if "_vs_" in key:
            flat.update({key + "_acc": g["acc"]["gain"], key + "_acc_low": g["acc"]["low"],
                         key + "_acc_high": g["acc"]["high"], key + "_nll": g.get("nll", {}).get("gain")})
    return [flat.get(column) for column in CSV]


def summarise(root: Path, out: Path, to: Path, runs: list[tuple[str, list[str]]] | None = None) -> None:
    """regime.md, regime.csv and regime.png in `to`: every finished cell of `runs` (default: the map's) against its
    M1 run; the map's cells, the cells trained with several seeds, and SWA and FGE beside the snapshots."""
    from snapens.data import scan_image_folder
    from snapens.report import table_csv

    test = scan_image_folder(str(root))[1].load()  # the whole test set, in the order every run scored it
    groups = dict.fromkeys(name.rsplit("_", 1)[0] for name, _ in runs or cells())  # cells, in run order
    rows = [r for cell in groups if (r := summarise_cell(cell, out, test))]
    first = [r for r in rows if seed_of(r["cell"])[1] == 0]
    sections = [map_table(first), seeds_table(rows), others_table(first)]
    to.mkdir(parents=True, exist_ok=True)
    (to / "regime.md").write_text("\n\n".join("\n".join(t) for t in sections if len(t) > 2) + "\n")
    (to / "regime.csv").write_bytes(table_csv([CSV, *map(csv_row, rows)]))
    plot_map(first, to / "regime.png")
    print((to / "regime.md").read_text(), end="")


def plot_map(rows: list[dict], path: Path) -> None:
    """regime.png: each cell's gain over one run of the same cost (accuracy and NLL, paired 95% intervals) against
    its updates per cycle, labelled with its model, training-set size and last cycle's training accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snapens.files import save_figure

    fig, (acc, nll) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, r in enumerate(rows):
        depth, size = r["cell"].split("_")[:2]
        x = r["updates_per_cycle"] * (1 + 0.04 * (k % 4))  # cells of one budget side by side
        for ax, key, scale in ((acc, "acc", 100), (nll, "nll", 1)):
            g = r["all_vs_M1"].get(key)
            if g:
                ax.errorbar([x], [scale * g["gain"]], yerr=[[scale * (g["gain"] - g["low"])],
                                                            [scale * (g["high"] - g["gain"])]],
                            fmt="o" if depth == "r8" else "s", color="C0" if size == "n1000" else "C1", capsize=3)
                ax.annotate(f"{depth[1:]}, {size[1:]}, {100 * r['M4_train_acc'][-1]:.0f}%", (x, scale * g["gain"]),
                            fontsize=7, xytext=(4, 4), textcoords="offset points")
    for ax, label in ((acc, "test accuracy gain (points)"), (nll, "test NLL change (nats; below 0: better)")):
        ax.axhline(0, color="gray", lw=1)
        ax.set(xscale="log", xlabel="updates per cycle (M = 4)", ylabel=label)
    fig.suptitle("4 snapshots against one cosine run of the same cost, CIFAR-10, 1 seed (ResNet depth, training "
                 "images, last cycle's training accuracy)", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "list", "summarise"))
    parser.add_argument("--to", type=Path, default=Path("docs"), help="summarise: where regime.md/.csv go")
    parser.add_argument("--root", type=Path, default=Path("data/cifar10-jpeg"), help="the CIFAR-10 ImageFolder")
    parser.add_argument("--out", type=Path, default=Path("outputs/regime"), help="one run dir per cell here")
    args = parser.parse_args()
    if args.action == "list":
        for name, overrides in cells():
            print(" ".join(command(name, overrides, args.root, args.out)[1:]))
        return
    if args.action == "summarise":
        summarise(args.root, args.out, args.to)
        return
    run(args.root.resolve(), args.out.resolve())


if __name__ == "__main__":
    main()
