"""One-file export of a run's ensemble, behind `python -m snapens.export run=DIR out=FILE.pt2 [members=...]`.

The members (as `python -m snapens.ensemble` selects them, or those training chose on validation with
chosen=last_m|greedy|weighted), their weights, the rule and the temperature fitted on validation when one is stored
for exactly these members (calibrate=none: without) become one `snapens.Ensemble`, saved
with `torch.export` as an ExportedProgram: uint8 N x 3 x H x W images in, float32 N x C probabilities out, for any
batch size. Loading it needs torch alone:

    program = torch.export.load("ensemble.pt2", extra_files=(extra := {"snapens.json": ""}))
    probs = program.module()(images)            # json.loads(extra["snapens.json"])["classes"] names the columns

A distilled student (snapens.distill) is a run of one member: export it the same way.
"""

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from snapens.checkpoint import refuse_while_training
from snapens.config import check_inference_options
from snapens.ensemble import members as found
from snapens.ensemble.ensemble import Ensemble
from snapens.errors import SnapensError
from snapens.files import refuse_to_replace, sweep_leftovers

log = logging.getLogger("snapens.export")  # the command's name, as in every export.log


def check_options(cfg: DictConfig) -> None:
    """export's own keys, then those it shares with the ensemble tool."""
    if not cfg.out or not str(cfg.out).endswith(".pt2"):
        raise SnapensError(f"out={cfg.out} must name the file to write, ending in .pt2 (a torch.export program)")
    if cfg.format != "pt2":
        raise SnapensError(f"format={cfg.format} is not allowed; the one format is pt2 (torch.export)")
    if cfg.predict or cfg.split != "test":
        raise SnapensError("predict= and split= are for python -m snapens.ensemble; export takes run=, members=, "
                           "chosen=, rule=, calibrate= and out=")
    check_inference_options(cfg)
    found.check_chosen(cfg.chosen, cfg.run, cfg.members, cfg.swa)
    refuse_while_training([cfg.run] if cfg.run else cfg.runs)
    refuse_to_replace(Path(cfg.out), cfg.overwrite)


def export_run(cfg: DictConfig) -> Path:
    """The members, weights and temperature as `snapens.Ensemble`, exported to out= and checked against itself."""
    check_options(cfg)
    paths = [p for group in found.find(cfg.run, cfg.runs, cfg.snapshots, cfg.members, cfg.swa) for p in group]
    found.read(paths)  # copies and foreign files refused before anything is built
    how = found.combination(paths, cfg.run, cfg.rule, cfg.calibrate, cfg.chosen)
    try:  # a ValueError here is the ensemble's or the export's: one line
        ensemble = Ensemble.from_files(how["members"], cfg.rule, how["weights"], how["temperature"])
        members, weights = found.distinct(how)  # as from_files: it cannot fail once that succeeded
        record = {"classes": ensemble.classes, "image_size": list(ensemble.image_size),
                  "input": "uint8 N x 3 x H x W", "output": "float32 N x C probabilities",
                  "members": [str(p) for p in members], "weights": weights.tolist(), "rule": cfg.rule,
                  "temperature": how["temperature"], "source": how["source"]}
        out = Path(cfg.out)
        sweep_leftovers(out.parent)  # the partial files of an export killed there before
        program = ensemble.export(out, {"snapens.json": json.dumps(record)})
    except ValueError as e:
        raise SnapensError(str(e)) from None
    check = torch.randint(0, 256, (4, 3, *ensemble.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    gap = (program.module()(check) - ensemble.probs(check)).abs().max().item()
    count = f"{len(members)} member{'s' if len(members) > 1 else ''}"
    log.info(f"{out}: {count} ({cfg.rule}, {how['source']}), {out.stat().st_size / 2**20:.1f} MiB; "
             f"the program against the eager ensemble on 4 random images: max difference {gap:.2e}")
    return out
