"""An Optuna study over train.py runs: the search space of `hparams_search.params`, TPE, median
pruning, and a persistent storage (SQLite by default, any RDB URL) that several workers share
and that a restarted search resumes; each trial trains in `<study dir>/trial_<number>`."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import TrialState

from ctseg.atomic import write_atomic
from ctseg.errors import ConfigError, user_message
from ctseg.hparams_search.pruning import OptunaPruning
from ctseg.training import train

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def suggest(trial: optuna.Trial, params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Config key -> value for each parameter of the search space, given by name as `{key,
    type: float|int, low, high, log, step}` or `{key, type: categorical, choices}`."""
    values = {}
    for name, entry in params.items():
        spec = dict(entry)
        key, kind = spec.pop("key", None), spec.pop("type", None)
        if not key:
            raise ConfigError(f"hparams_search.params.{name}: set key, the config key it sets "
                              "(e.g. model.optimizer.lr)")
        if kind == "float":
            values[key] = trial.suggest_float(name, **spec)
        elif kind == "int":
            values[key] = trial.suggest_int(name, **spec)
        elif kind == "categorical":
            values[key] = trial.suggest_categorical(name, list(spec["choices"]))
        else:
            raise ConfigError(f"hparams_search.params.{name}: type must be float, int or "
                              f"categorical, got {kind!r}")
    return values


def open_study(search: Mapping[str, Any]) -> optuna.Study:
    """Create or load the study of `search` (storage, name, direction, sampler, pruner)."""
    url = str(search["storage"])
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = RDBStorage(url, heartbeat_interval=int(search["heartbeat_interval"]),
                         grace_period=int(search["grace_period"]),
                         failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    return optuna.create_study(
        storage=storage, study_name=str(search["study_name"]), load_if_exists=True,
        direction=str(search["direction"]),
        sampler=optuna.samplers.TPESampler(**dict(search["sampler"])),
        pruner=optuna.pruners.MedianPruner(**dict(search["pruner"])))


def trial_config(cfg: DictConfig, values: Mapping[str, Any], folder: Path) -> DictConfig:
    """`cfg` with the trial's values and its own output folder (and no search section)."""
    trial = copy.deepcopy(cfg)
    with open_dict(trial):
        for key, value in values.items():
            OmegaConf.update(trial, key, value, merge=False)
        trial.paths.output_dir = str(folder)
        trial.pop("hparams_search", None)
    return trial


def run_search(cfg: DictConfig) -> optuna.Study:
    """Run trials until the study holds `n_trials` finished (complete or pruned) ones; a trial
    that fails on a user error (`ctseg.errors.user_message`) stops the search with that error."""
    search = OmegaConf.to_container(cfg.hparams_search, resolve=True)
    metric = str(cfg.optimized_metric)
    n_trials = search.get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"hparams_search.n_trials={n_trials}: the number of finished trials "
                          "to reach must be a whole number >= 1")
    study = open_study(search)
    root = Path(search["dir"])
    failures: list[Exception] = []

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, search["params"])
        folder = root / f"trial_{trial.number}"
        overrides = "".join(f"- {k}={v}\n" for k, v in values.items())
        write_atomic(folder / ".hydra" / "overrides.yaml", lambda tmp: tmp.write_text(overrides))
        log.info("trial %d in %s: %s", trial.number, folder, values)
        try:
            metrics, _ = train(trial_config(cfg, values, folder),
                               extra_callbacks=[OptunaPruning(trial, metric)])
        except Exception as err:
            message = user_message(err)
            if message is None:
                raise  # a bug keeps its traceback
            # A user error (config, data) fails every trial alike: the trial is recorded as
            # failed and the search stops with the error as one line, not Optuna's traceback.
            log.error("trial %d failed: %s", trial.number, message)
            failures.append(err)
            trial.study.stop()
            return float("nan")
        if metric not in metrics:
            raise ConfigError(f"optimized_metric={metric} was not logged by trial "
                              f"{trial.number}; logged: {', '.join(sorted(metrics))}")
        return metrics[metric]

    done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    remaining = n_trials - done
    log.info("study %s: %d finished trials, %d to run (storage %s)", study.study_name, done,
             max(remaining, 0), search["storage"])
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, gc_after_trial=True)
    if failures:
        raise failures[0]
    return study
