"""One-file export of a run's ensemble: `python -m snapens.export run=DIR out=FILE.pt2 [members=...] [chosen=...]`.

The export itself is snapens.ensemble.program; this module is its command line, which Hydra parses and checks
before torch is imported, so `--help` and a misspelt key answer at once.
"""

import hydra
from omegaconf import DictConfig

from snapens import cli
from snapens.schemas import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from snapens.ensemble.program import export_run  # torch and the models: only once the command line holds

    cli.run_job(lambda: export_run(cfg))


if __name__ == "__main__":
    cli.run(main)
