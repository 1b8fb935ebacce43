"""Evaluate the snapshot ensemble of finished runs, and predict on new images: `python -m snapens.ensemble run=DIR`.

The tool itself is snapens.ensemble.tool; this module is its command line, which Hydra parses and checks before
torch is imported, so `--help` and a misspelt key answer at once.
"""

import hydra
from omegaconf import DictConfig

from snapens import cli
from snapens.schemas import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="ensemble")
def main(cfg: DictConfig) -> float | None:
    from snapens.ensemble.tool import evaluate  # torch and the models: only once the command line holds

    return cli.run_job(lambda: evaluate(cfg))


if __name__ == "__main__":
    cli.run(main)
