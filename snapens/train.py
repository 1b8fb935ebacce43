"""Train with a cyclic schedule and keep a snapshot at every cycle end: `python -m snapens.train [overrides]`.

SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983) restarts the learning rate; each cycle ends at the schedule's
minimum, where the model is a good and diverse ensemble member (Huang et al. 2017, arXiv 1704.00109). The run itself
is snapens.training; this module is its command line, which Hydra parses and checks before torch is imported, so
`--help` and a misspelt key answer at once.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from snapens import cli
from snapens.schemas import register_configs

register_configs()
log = logging.getLogger("snapens.train")  # not __main__: the name its job logs under


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir

    def job() -> float | None:
        cli.refuse_tuning_on_test(cfg)
        from snapens.training import train  # torch and the trainer: only once the command line holds

        if not cfg.trainer.plan_only:
            log.info(f"run dir {run_dir}")
        accuracy = train(cfg, run_dir)
        if cfg.trainer.plan_only:
            cli.discard_unused_run_dir()  # it holds the log alone: a plan leaves nothing behind
            return None
        log.info(f"run dir {run_dir}: results.json, snapshots/, metrics.jsonl, training.png, lr_schedule.png")
        return accuracy

    return cli.run_job(job)


if __name__ == "__main__":
    cli.run(main)
