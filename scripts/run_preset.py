"""Run paper presets as multirun sweeps over seeds, then compare them with `python -m snapens.report`.

    python scripts/run_preset.py se_resnet110_c10 se_resnet110_c10_single se_resnet110_c10_nocycle \\
        --seeds 0,1,2 -- data=imagefolder data.root=data/cifar10-jpeg
    python scripts/run_preset.py sgdr_wrn28_10_c10 --dry-run        # print the commands only

Each preset (a name of conf/experiment/*.yaml) runs as `python -m snapens.train -m experiment=NAME
trainer.seed=SEEDS [overrides]` into outputs/presets/<time>/<NAME>/; then one report over all of them is written to
outputs/presets/<time>/ (report.md, report.csv, report.png). Anything after `--` goes to every training command
(e.g. hydra/launcher=slurm_gpu to send the jobs to SLURM)."""

import argparse
import subprocess
import sys
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def commands(presets: list[str], seeds: str, overrides: list[str], out: Path) -> list[list[str]]:
    """The training sweeps, one per preset, and the report over all of them."""
    train = [[sys.executable, "-m", "snapens.train", "-m", f"experiment={name}", f"trainer.seed={seeds}",
              f"hydra.sweep.dir={out / name}", *overrides] for name in presets]
    return train + [[sys.executable, "-m", "snapens.report", *(str(out / name) for name in presets),
                     "--out", str(out)]]


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("presets", nargs="+", help="names of conf/experiment/*.yaml")
    p.add_argument("--seeds", default="0,1,2", help="trainer.seed values, comma-separated (default 0,1,2)")
    p.add_argument("--out", help="default: outputs/presets/<date>_<time>")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    known = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))
    if unknown := [name for name in args.presets if name not in known]:
        sys.exit(f"run_preset: error: no preset {unknown[0]}; choose from: {', '.join(known)}")
    out = Path(args.out or f"outputs/presets/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    for command in commands(args.presets, args.seeds, overrides, out):
        print(" ".join(command), flush=True)
        if not args.dry_run and subprocess.run(command).returncode:
            sys.exit(f"run_preset: error: {' '.join(command[:6])} failed; the finished runs are in {out}")


if __name__ == "__main__":
    main()
