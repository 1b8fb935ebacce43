"""Compare finished runs, seeds grouped: `python -m snapens.report <multirun dirs, run dirs or a date dir...>`.

Reads each run's results.json and .hydra/overrides.yaml. Runs whose overrides are equal once the seed (and any
hydra.* override) is dropped form one config; each config gets one row: single-model and ensemble test accuracy as
mean ± sample std over its runs, the paired gain mean(ensemble - single), the number of snapshots and the mean wall
time of training. Printed as a table and written as report.md, report.csv (raw fractions) and report.png.
Only reads files: no Hydra, no models."""

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

import yaml  # comes with omegaconf; overrides.yaml is a plain list of strings

from snapens.errors import SnapensError, exit_with
from snapens.files import save_figure, write_atomic

DEFAULTS = "(defaults)"
COLUMNS = ["config", "n", "single_mean", "single_std", "ensemble_mean", "ensemble_std", "gain_mean", "gain_std",
           "snapshots_min", "snapshots_max", "seconds_mean", "val_ensemble_mean", "val_ensemble_std", "greedy_mean",
           "greedy_std", "runs"]
SPREAD = ("± is the sample standard deviation over a config's runs (seeds): the spread of training, not the test "
          "set's sampling error (for an accuracy p on N test images about 100·sqrt(p(1-p)/N) points: 0.49 at "
          "p = 0.6, N = 10,000); the gain is paired by run (same seed, same test images). \"val ensemble\" is the "
          "all-snapshot ensemble on the run's validation split, \"chosen\" the members chosen on it (greedy), "
          "scored on test.")


# ---- finding and reading runs ------------------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    """A run dir, finished or not: snapens.train writes .hydra/ and checkpoints/ first, results.json last."""
    return any((path / name).exists() for name in ("results.json", ".hydra", "checkpoints"))


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run dir, or a folder (e.g. a multirun dir) whose immediate subdirectories are run dirs."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise SnapensError(f"{path} is not a directory; give run dirs or a multirun dir")
        found = [path] if is_run(path) else run_subdirs(path)
        if not found:  # a folder of multirun dirs (outputs/multirun/<date>): each one's runs, in time order
            found = [run for folder in sorted(d for d in path.iterdir() if d.is_dir()) for run in run_subdirs(folder)]
        runs += found
    return runs


def run_subdirs(path: Path) -> list[Path]:
    """The run dirs right under `path`; job numbers sort as numbers (2 before 10), anything else by name after."""
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and is_run(d)]
    return sorted(subdirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def config_of(overrides: list[str], seed_key: str) -> str:
    """The config a run belongs to: its sorted overrides without the seed and hydra's own; DEFAULTS when none."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    kept = [o for o, k in zip(overrides, keys)
            if k not in (seed_key, "hydra") and not k.startswith(("hydra.", "hydra/"))]
    return " ".join(sorted(kept)) or DEFAULTS


def read_run(run: Path, seed_key: str) -> dict:
    """One finished run's numbers; a file that cannot be read or lacks a field is one error naming it."""
    path = run / "results.json"
    try:
        results = json.loads(path.read_text())
        record = {"dir": run, "single": float(results["single"]["acc"]), "ensemble": float(results["ensemble"]["acc"]),
                  "val": results.get("val", {}).get("ensemble", {}).get("acc"),
                  "val_single": results.get("val", {}).get("single", {}).get("acc"),
                  "greedy": results.get("chosen", {}).get("greedy", {}).get("test", {}).get("acc"),
                  "snapshots": len(results["ensemble"]["members"]),
                  "seconds": results.get("training", {}).get("seconds")}  # older runs have no "training"
        if not all(0 <= record[k] <= 1 for k in ("single", "ensemble")):  # NaN fails too
            raise ValueError(f"accuracies {record['single']} and {record['ensemble']} are not fractions")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SnapensError(f"cannot read {path}: {type(e).__name__}: {e}; is it a results.json written by "
                           "snapens.train? (move the run away to report the others)") from None
    overrides_path = run / ".hydra" / "overrides.yaml"
    if not overrides_path.exists():  # train() called without Hydra: its config is unknown, so never grouped
        record["config"] = f"({run})"
        return record
    try:
        overrides = yaml.safe_load(overrides_path.read_text()) or []
        if not isinstance(overrides, list):
            raise ValueError("not a list of overrides")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise SnapensError(f"cannot read {overrides_path}: {str(e).splitlines()[0]}") from None
    record["overrides"] = [str(o) for o in overrides]
    record["config"] = config_of(record["overrides"], seed_key)
    return record


def chosen_trial(folder: Path, records: list[dict]) -> str | None:
    """For a sweep whose sweeper chose a best trial (hydra-optuna-sweeper's optimization_results.yaml, chosen on
    what the jobs returned: the validation accuracy), one line with that trial's test numbers, read once."""
    path = folder / "optimization_results.yaml"
    if not path.is_file():
        return None
    best = yaml.safe_load(path.read_text()) or {}
    wanted = {str(k): v for k, v in (best.get("best_params") or {}).items()}

    def same(text: str, value) -> bool:  # "5e-05" reads as a string in YAML: numbers compare as numbers
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(text) == float(value)
            except ValueError:
                return False
        return yaml.safe_load(text) == value

    def matches(record: dict) -> bool:
        given = dict(o.split("=", 1) for o in record.get("overrides", []) if "=" in o)
        return all(k in given and same(given[k], v) for k, v in wanted.items())

    found = [r for r in records if r["dir"].parent == folder and matches(r)]
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in wanted.items())
    if not found or found[0]["val"] is None:
        return f"{path}: the chosen trial ({params}) is not among the finished runs with a validation split"
    r = found[0]
    return (f"chosen on validation by {best.get('name', 'the sweeper')}: {params} (validation ensemble "
            f"{100 * r['val']:.2f}%, {r['dir']}); its test accuracy, read once: single {100 * r['single']:.2f}%, "
            f"ensemble {100 * r['ensemble']:.2f}%")


# ---- summary -----------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); None for the std of a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def mean_std_known(runs: list[dict], key: str) -> tuple[float | None, float | None]:
    """`mean_std` of the runs' `key` where they have one; (None, None) where none has."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return mean_std(values) if values else (None, None)


def summarise(records: list[dict]) -> list[dict]:
    """One row per config, in the order configs first appear (a multirun's job order)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["config"], []).append(r)
    return [summary_row(config, runs) for config, runs in groups.items()]


def summary_row(config: str, runs: list[dict]) -> dict:
    """One config's runs: mean ± sample std of single and ensemble accuracy, the gain paired by run, and where the
    runs held out a validation split, the validation ensemble's and the chosen (greedy) members' accuracy."""
    single, ensemble = [r["single"] for r in runs], [r["ensemble"] for r in runs]
    counts = [r["snapshots"] for r in runs]
    seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
    return {"config": config, "n": len(runs), "single": mean_std(single), "ensemble": mean_std(ensemble),
            "values": {"single": single, "ensemble": ensemble},  # each run's, for the plot's dots
            "gain": mean_std([e - s for s, e in zip(single, ensemble)]),  # paired: same run, same test set
            "snapshots": (min(counts), max(counts)), "seconds": statistics.fmean(seconds) if seconds else None,
            "val": mean_std_known(runs, "val"), "greedy": mean_std_known(runs, "greedy"),
            "runs": [str(r["dir"]) for r in runs]}


def shared_overrides(rows: list[dict]) -> list[str]:
    """Overrides every config has (data=..., model=...): said once above the table rather than in every row."""
    if len(rows) < 2:
        return []
    sets = [set(r["config"].split()) if not r["config"].startswith("(") else set() for r in rows]
    return sorted(set.intersection(*sets))


def label(row: dict, shared: list[str]) -> str:
    """The config as shown: its overrides that not every config shares."""
    return " ".join(o for o in row["config"].split() if o not in shared) or "(shared overrides only)"


# ---- output ------------------------------------------------------------------------------------------------------
def percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± {'-' if std is None else f'{100 * std:.2f}'}"


def format_table(rows: list[dict], shared: list[str]) -> str:
    """A Markdown table, padded so that it also reads well as plain text."""
    header = ["config", "n", "single acc (%)", "ensemble acc (%)", "gain (pp)", "val ensemble (%)", "chosen (%)",
              "snapshots", "wall time (s)"]
    cells = []
    for r in rows:
        lo, hi = r["snapshots"]
        cells.append([label(r, shared), str(r["n"]), percent(*r["single"]), percent(*r["ensemble"]),
                      f"{100 * r['gain'][0]:+.2f}", percent(*r["val"]), percent(*r["greedy"]),
                      str(lo) if lo == hi else f"{lo}-{hi}",
                      "-" if r["seconds"] is None else f"{r['seconds']:.1f}"])
    widths = [max(3, *(len(row[i]) for row in [header, *cells])) for i in range(len(header))]  # 3: "--:"
    # Left-align the config, right-align the numbers.
    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"
    rule = "| " + " | ".join("-" * (w - 1) + (":" if i else "-") for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), rule, *map(line, cells)])


def table_csv(rows) -> bytes:
    """The rows, the header first, as CSV lines ending in a bare newline; None is an empty cell (report.csv,
    study.csv, regime.csv)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def csv_bytes(rows: list[dict]) -> bytes:
    """report.csv: raw fractions and seconds at full precision; empty where a value is unknown."""
    return table_csv([COLUMNS, *([r["config"], r["n"], *r["single"], *r["ensemble"], *r["gain"], *r["snapshots"],
                                 r["seconds"], *r["val"], *r["greedy"], " ".join(r["runs"])] for r in rows)])


def plot_report(rows: list[dict], shared: list[str], path: Path, split: str = "test", chosen: tuple[int, ...] = ()
                ) -> None:
    """report.png: single vs ensemble accuracy per config: the mean with sample-std error bars and each run as a
    dot, on an axis that starts near the data; the configs (rows) at `chosen`, a sweeper's choice, starred. Long
    labels are turned so that they never overlap."""
    import matplotlib  # here, not at import: the table and the CSV need no plotting library
    matplotlib.use("Agg")  # files only: works on a headless machine
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(rows) + 3), 4.5))
    for offset, name, color in ((-0.2, "single", "C0"), (0.2, "ensemble", "C1")):
        ax.errorbar([i + offset for i in x], [100 * r[name][0] for r in rows],
                    yerr=[100 * (r[name][1] or 0.0) for r in rows], fmt="_", ms=18, capsize=4, color=color,
                    label=f"{name}: mean ± std")
        for i, r in enumerate(rows):  # each run (seed) as a dot
            values = [100 * v for v in r["values"][name]]
            ax.plot([i + offset] * len(values), values, "o", color=color, alpha=0.5, ms=4)
    everything = [100 * v for r in rows for name in ("single", "ensemble") for v in r["values"][name]]
    low, high = min(everything), max(everything)
    margin = max(0.5, 0.1 * (high - low))  # the axis starts near the data, not at 0
    ax.set_ylim(low - margin, high + margin)
    config_ticks(fig, ax, [("★ " if i in chosen else "") + label(r, shared) for i, r in enumerate(rows)])
    title = "single (last snapshot) vs ensemble; dots: runs" + ("; ★ chosen by the sweeper" if chosen else "")
    ax.set(ylabel=f"{split} accuracy (%)", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the axes: never over a point
    save_figure(fig, path)


def config_ticks(fig, ax, labels: list[str]) -> None:
    """One tick label per config; long ones turned, the figure taller for them, so that they never overlap."""
    longest = max(len(s) for s in labels)
    if longest > 14:  # turned by 60 degrees a label takes about half its length across
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=60, ha="right", rotation_mode="anchor")
        fig.set_figheight(4.5 + 0.06 * longest)
    else:
        ax.set_xticks(range(len(labels)), labels, fontsize=8)


def finished_runs(paths: list[Path]) -> list[Path]:
    """The finished runs under `paths`; unfinished ones are named in a warning, none finished is an error."""
    runs = find_runs(paths)
    finished = [r for r in runs if (r / "results.json").exists()]
    unfinished = [str(r) for r in runs if r not in finished]
    if not finished:
        found = f"{len(unfinished)} unfinished (no results.json)" if unfinished else "no run dirs"
        raise SnapensError(f"no finished run in {', '.join(map(str, paths))}: found {found}; wait for training to "
                           "end, or give other dirs")
    if unfinished:
        print(f"snapens: warning: skipping {len(unfinished)} unfinished runs (no results.json): "
              f"{', '.join(unfinished)}", file=sys.stderr)
    return finished


def tuning_view(paths: list[Path], records: list[dict]) -> tuple[list[dict], list[str]]:
    """For a tuning sweep among `paths` (or in a date dir's sweeps): the records with their validation numbers in
    place of test ones, where the sweeper chose, and the chosen trials' lines, with their test numbers read once.
    Otherwise the records as they are and no line."""
    sweeps = [f for p in paths if p.is_dir() for f in (p, *sorted(d for d in p.iterdir() if d.is_dir()))]
    chosen = [line for folder in sweeps if (line := chosen_trial(folder, records))]
    if not chosen:
        return records, []
    records = [{**r, "single": r["val_single"], "ensemble": r["val"]} for r in records if r["val"] is not None]
    if not records:
        raise SnapensError(f"{', '.join(map(str, paths))} holds a tuning sweep whose runs have no validation split")
    return records, chosen


def report(paths: list[Path], out: Path, seed_key: str = "trainer.seed") -> list[dict]:
    """Read the runs under `paths` (as `find_runs` takes them), print the table and write report.md, report.csv and
    report.png to `out` (made when missing); `seed_key` is the override dropped so that a config's seeds share a row.

    Returns:
        One dict per config: config, n, single/ensemble/gain as (mean, std or None), snapshots (min, max),
        seconds (mean, None when unknown), runs."""
    finished = finished_runs(paths)
    records, chosen = tuning_view(paths, [read_run(r, seed_key) for r in finished])
    split = "validation" if chosen else "test"
    rows = summarise(records)
    shared = shared_overrides(rows)
    table = format_table(rows, shared)
    if chosen:
        table = ("Accuracies on the validation split: the sweeper tuned on it, so the test split is read only for "
                 f"the trial it chose.\n\n{table}" + "".join(f"\n\n{line}" for line in chosen))
    common = f"Overrides shared by all configs: `{' '.join(shared)}`\n\n" if shared else ""
    runs_line = f"Runs ({len(finished)}): {', '.join(str(r) for r in finished)}"
    out.mkdir(parents=True, exist_ok=True)
    table = f"{table}\n\n{SPREAD}"
    write_atomic(out / "report.md", f"# snapens report\n\n{common}{table}\n\n{runs_line}\n".encode())
    write_atomic(out / "report.csv", csv_bytes(rows))
    plot_report(rows, shared, out / "report.png", split, starred(rows, chosen))
    print(f"{common}{table}\n\nwrote report.md, report.csv and report.png to {out}")
    return rows


def starred(rows: list[dict], chosen: list[str]) -> tuple[int, ...]:
    """The rows holding a run a chosen trial's line names (`chosen_trial`: "..., <run dir>); its test ...")."""
    return tuple(i for i, r in enumerate(rows) if any(f"{run});" in line for line in chosen for run in r["runs"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m snapens.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, or dirs whose subdirectories are run dirs")
    parser.add_argument("--out", type=Path, metavar="DIR", help="(or out=DIR) where to write report.md/.csv/.png "
                        "(default: the one multirun dir given, else the current directory)")
    parser.add_argument("--group-by-seed-key", default="trainer.seed", dest="seed_key", metavar="KEY",
                        help="the override dropped when grouping runs into configs (default: trainer.seed)")
    argv = sys.argv[1:] if argv is None else argv  # out=DIR as the other entry points take it, or --out DIR
    args = parser.parse_args([f"--out={a[4:]}" if a.startswith("out=") else a for a in argv])
    one_folder = len(args.paths) == 1 and args.paths[0].is_dir() and not is_run(args.paths[0])
    out = args.out or (args.paths[0] if one_folder else Path("."))
    try:
        report(args.paths, out, args.seed_key)
    except SnapensError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
