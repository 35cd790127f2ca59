"""`python -m ctseg.hparams_search hparams_search=optuna [train.py overrides ...]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ctseg.config import CONFIG_DIR, check_data
from ctseg.errors import ConfigError, CtsegError, run_cli
from ctseg.hparams_search.search import FINISHED, run_search


class SearchError(CtsegError):
    """A search that ended without a completed trial."""


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Run the search, print the best trial and the state counts."""
    if cfg.get("hparams_search") is None:
        raise ConfigError("choose a search space: hparams_search=optuna (conf/hparams_search)")
    check_data(cfg.get("data"))
    study = run_search(cfg)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in FINISHED}
    if not counts["complete"]:
        raise SearchError(f"study {study.study_name}: none of its {len(trials)} trials "
                          f"completed ({counts['pruned']} pruned, the others failed; their "
                          "errors are in the log above); fix the cause and run the same "
                          "command again, the study resumes")
    print(f"study {study.study_name}: {len(trials)} trials ({counts['complete']} complete, "
          f"{counts['pruned']} pruned)")
    best = study.best_trial
    print(f"best trial {best.number}: {cfg.optimized_metric}={best.value:.4f} {best.params}")


def cli() -> None:
    """Console entry point (`ctseg-hparams-search`, `python -m ctseg.hparams_search`)."""
    run_cli(main, "python -m ctseg.hparams_search")


if __name__ == "__main__":
    cli()
