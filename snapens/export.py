"""One-file export of a run's ensemble: `python -m snapens.export run=DIR out=FILE.pt2 [members=...] [chosen=...]`.

The members (as `python -m snapens.ensemble` selects them, or those training chose on validation with
chosen=last_m|greedy|weighted), their weights, the rule and the temperature fitted on validation when one is stored
for exactly these members (calibrate=none: without) become one `snapens.ensemble.exported.EnsembleModule`, saved
with `torch.export` as an ExportedProgram: uint8 N x 3 x H x W images in, float32 N x C probabilities out, for any
batch size. Loading it needs torch alone:

    program = torch.export.load("ensemble.pt2", extra_files=(extra := {"snapens.json": ""}))
    probs = program.module()(images)            # json.loads(extra["snapens.json"])["classes"] names the columns

A distilled student (snapens.distill) is a run of one member: export it the same way.
"""

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from snapens import cli
from snapens.config import register_configs
from snapens.ensemble import __main__ as tool
from snapens.ensemble.exported import EnsembleModule, export
from snapens.errors import SnapensError, exit_with
from snapens.snapshots import load_into

register_configs()
log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("snapens_export_dir", lambda out, fallback: str(Path(str(out)).parent) if out
                                else fallback, replace=True)


def member_weights(how: dict) -> tuple[list[Path], torch.Tensor]:
    """Each distinct member once, with its weight: the stored weights, or the share of picks (a member chosen twice
    by greedy selection weighs twice)."""
    unique = list(dict.fromkeys(how["members"]))
    per_pick = how["weights"] if how["weights"] is not None else torch.full((len(how["members"]),),
                                                                            1 / len(how["members"]))
    weights = torch.zeros(len(unique), dtype=torch.float64)
    for path, w in zip(how["members"], per_pick.tolist()):
        weights[unique.index(path)] += w
    return unique, weights


def export_run(cfg: DictConfig) -> Path:
    if not cfg.out or not str(cfg.out).endswith(".pt2"):
        raise SnapensError(f"out={cfg.out} must name the file to write, ending in .pt2 (a torch.export program)")
    if cfg.format != "pt2":
        raise SnapensError(f"format={cfg.format} is not allowed; the one format is pt2 (torch.export)")
    if cfg.predict or cfg.split != "test":
        raise SnapensError("predict= and split= are for python -m snapens.ensemble; export takes run=, members=, "
                           "chosen=, rule=, calibrate= and out=")
    tool.check_options(cfg)
    tool.check_chosen(cfg)
    paths, metas = tool.read_members(cfg)
    for path, meta in zip(paths, metas):
        if (meta["mean"], meta["std"], meta["image_size"]) != (metas[0]["mean"], metas[0]["std"],
                                                               metas[0]["image_size"]):
            raise SnapensError(f"{path} was trained on other inputs than {paths[0]} (statistics or image size): "
                               "one exported program takes one kind of image")
    how = tool.combination(cfg, paths)
    members, weights = member_weights(how)
    models = []
    for path in members:
        model = tool.build_snapshot_model(path, metas[paths.index(path)])
        load_into(model, path)
        models.append(model.eval())
    try:
        module = EnsembleModule(models, metas[0]["mean"], metas[0]["std"], cfg.rule, weights, how["temperature"])
    except ValueError as e:
        raise SnapensError(str(e)) from None
    record = {"classes": metas[0]["classes"], "image_size": metas[0]["image_size"], "input": "uint8 N x 3 x H x W",
              "output": "float32 N x C probabilities", "members": [str(p) for p in members],
              "weights": weights.tolist(), "rule": cfg.rule, "temperature": how["temperature"], "source": how["source"]}
    out = Path(cfg.out)
    program = export(module, tuple(metas[0]["image_size"]), out, {"snapens.json": json.dumps(record)})
    check = torch.randint(0, 256, (4, 3, *metas[0]["image_size"]), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (program.module()(check) - module(check)).abs().max().item()
    count = f"{len(members)} member{'s' if len(members) > 1 else ''}"
    log.info(f"{out}: {count} ({cfg.rule}, {how['source']}), {out.stat().st_size / 2**20:.1f} MiB; "
             f"the program against the eager ensemble on 4 random images: max difference {gap:.2e}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export_run(cfg)
    except (SnapensError, OmegaConfBaseException) as e:
        cli.discard_unused_run_dir()
        exit_with(e)


if __name__ == "__main__":
    cli.run(main)
