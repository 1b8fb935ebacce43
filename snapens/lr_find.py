"""The LR range test: `python -m snapens.lr_find [training overrides]` suggests scheduler.eta_max and eta_min.

The test itself is snapens.lr_range (Smith 2017, arXiv 1506.01186); this module is its command line, which Hydra
parses and checks before torch is imported, so `--help` and a misspelt key answer at once.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from snapens import cli
from snapens.schemas import register_configs

register_configs()
log = logging.getLogger("snapens.lr_find")  # not __main__: the name its job logs under


@hydra.main(version_base="1.3", config_path="../conf", config_name="lr_find")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir

    def job() -> None:
        from snapens.lr_range import find_lr, summary  # torch and the model: only once the command line holds

        log.info(f"run dir {run_dir}")
        log.info("\n" + summary(find_lr(cfg, run_dir), run_dir))  # in lr_find.log too

    cli.run_job(job)


if __name__ == "__main__":
    cli.run(main)
