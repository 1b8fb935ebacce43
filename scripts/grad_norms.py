"""The distribution of unclipped gradient norms over a real training run, to choose trainer.grad_clip's default.

    python scripts/grad_norms.py NAME [training overrides...]   (e.g. data=imagefolder data.root=... model=resnet20)

Builds the run exactly as snapens.train does (snapens.build.setup) with trainer.grad_clip=0, makes every update,
and prints the median, 90th and 99th percentiles, the maximum, the fraction of updates above 1, 2, 3, 5 and 10,
and the updates whose norm exceeded 5; writes NAME.json (every norm) to the current directory.
"""

import json
import sys

import torch
from hydra import compose, initialize_config_dir

from snapens.batches import epoch_order, train_batches
from snapens.build import setup
from snapens.config import register_configs
from snapens.step import set_hyperparameters, train_step
from pathlib import Path


def main() -> None:
    name, overrides = sys.argv[1], sys.argv[2:]
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "trainer.grad_clip=0"])
    s = setup(cfg)
    norms = []
    while len(norms) < s.schedule.total_steps:
        order = epoch_order(len(s.train_split), s.generator)
        for x, y in train_batches(s.train_split, s.update_size, s.generator, s.augmentation, s.data.mean,
                                  s.data.std, order, cfg.trainer.channels_last):
            t = len(norms)
            set_hyperparameters(s.optimizer, s.schedule.lr(t), s.schedule.momentum(t))
            norms.append(train_step(s.forward, s.optimizer, x, y, s.step_options).grad_norm.item())
            if len(norms) == s.schedule.total_steps:
                break
    n = torch.tensor(norms)
    summary = {"name": name, "overrides": overrides, "steps": len(norms), "threads": torch.get_num_threads(),
               **{f"p{p}": torch.quantile(n, p / 100).item() for p in (50, 90, 99)}, "max": n.max().item(),
               **{f"above_{c}": (n > c).float().mean().item() for c in (1, 2, 3, 5, 10)},
               "steps_above_5": [i for i, v in enumerate(norms) if v > 5]}
    Path(f"{name}.json").write_text(json.dumps({**summary, "norms": norms}))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
