"""`hydra/sweeper=study` (configs/hparams_search/ selects it; hydra_plugins/mtl_cli_plugins names it): Hydra's
Optuna sweeper, with what a study of training runs needs on top of it.

- The study lives in `<sweep dir>/study.db` (SQLite). Run the same command with the same `hydra.sweep.dir` and it
  continues: `n_trials` is the study's total of completed trials, trials a killed sweep left running are marked
  failed and asked again with the same parameters, and new jobs get new directories (Hydra's own sweeper would
  start numbering at 0 again, over the old jobs' checkpoints).
- `direction: auto` takes each objective's direction from its metric (the direction best.pt is chosen with), and
  the objectives (`objectives`, else `trainer.monitor`) are checked against what the run logs before any trial.
- `conditional`: hyperparameters that exist for one choice only (`weighting.c` when `weighting=cagrad`), suggested
  through the plugin's `custom_search_space` hook, so Optuna records them as parameters of the trial.
- A failed job is a failed trial and the sweep goes on (`max_failure_rate: 1.0` in the preset); a study whose
  trials all failed ends without Hydra's "no trials are completed" traceback: cli.main names the failures.

Imports optuna (and the plugin) only when a sweep uses it. The plugin's implementation module is private; the
pins in pyproject.toml (hydra-core <1.4, hydra-optuna-sweeper <1.4) hold it still.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from mtl_cli.errors import UserError

log = logging.getLogger("mtl")
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")  # optuna 2's storage on SQLAlchemy 1.4: pinned (<2)
INTERRUPTED = "interrupted"  # the user attribute that marks a trial a killed sweep left running


class Study(OptunaSweeper):
    def __init__(self, conditional: DictConfig | None = None, **optuna: Any) -> None:
        super().__init__(**optuna)
        self.conditional = OmegaConf.to_container(conditional, resolve=True) if conditional else {}
        self.custom = self.sweeper.custom_search_space_extender  # the plugin's own hook, if the user set one
        self.sweeper.custom_search_space_extender = self.suggest_conditional

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's SQLite schema set-up, line by line
        impl = self.sweeper
        impl.direction = study_directions(impl.config, impl.direction)
        self.spaces = {key: {option: distributions(space, f"hydra.sweeper.conditional.{key}.{option}")
                             for option, space in options.items()} for key, options in self.conditional.items()}
        sweep_dir = Path(str(impl.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # SQLite makes no folders
        study = existing_study(impl.study_name, impl.storage)
        if study is not None:
            check_directions(study, impl.direction, impl.study_name)
            jobs = [int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()]
            impl.job_idx = max([len(study.trials), *(n + 1 for n in jobs)])  # new job directories after the old
            completed = ask_again_the_interrupted(study)
            impl.n_trials = max(0, int(impl.n_trials) - completed)
            log.info(f"continuing the study {impl.study_name!r} of {impl.storage}: {completed} trials completed, "
                     f"{impl.n_trials} to go (hydra.sweeper.n_trials is the study's total)")
            if impl.n_trials == 0:
                return
        try:
            impl.sweep(arguments)
        except ValueError as e:  # the study's summary needs a completed trial
            study = existing_study(impl.study_name, impl.storage)
            done = study is not None and any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
            if done or "completed" not in str(e):
                raise
            log.warning("no trial of the study completed: no best parameters to report")

    def suggest_conditional(self, config: DictConfig, trial) -> None:
        """The parameters that belong to the option the trial chose, e.g. weighting.c for weighting=cagrad (the
        option searched, or fixed on the command line: the plugin keeps those as user attributes)."""
        for key, options in self.spaces.items():
            chosen = trial.params.get(key, trial.user_attrs.get(key))
            for name, distribution in options.get(str(chosen), {}).items():
                trial._suggest(name, distribution)  # what the plugin itself calls for its search space
        if self.custom is not None:
            self.custom(config, trial)


def distributions(space: dict, where: str) -> dict:
    """{"weighting.c": "interval(0.1, 0.9)", ...} -> Optuna distributions, read with the plugin's own parser of the
    sweep override syntax (choice, range, interval, tag(log, ...))."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    try:
        searched, fixed = create_params_from_overrides([f"{name}={value}" for name, value in space.items()])
    except Exception as e:  # noqa: BLE001 -- the parser raises several kinds; each is a bad entry of the preset
        raise UserError(f"{where}: {e}; write each as a sweep, e.g. interval(0.1, 0.9) or choice(1, 2)") from None
    if fixed:
        raise UserError(f"{where}: {', '.join(fixed)} is a single value, not a search space; write e.g. "
                        "interval(0.1, 0.9) or choice(1, 2)")
    return searched


def study_directions(config: DictConfig, direction: Any) -> list[str]:
    """The study's directions, one per objective: `auto` entries from the metrics (higher-is-better -> maximize);
    given ones are checked against them, since a study told to minimise an accuracy would search for the worst."""
    from mtl_cli.engine.monitor import objective_directions

    wanted = objective_directions(config)
    given = list(direction) if OmegaConf.is_list(direction) or isinstance(direction, list) else [direction]
    given = [str(getattr(d, "name", d)) for d in given]
    if len(given) == 1 and len(wanted) > 1 and given[0] == "auto":
        given = given * len(wanted)
    names = list(wanted)
    if len(given) != len(names):
        raise UserError(f"hydra.sweeper.direction has {len(given)} entries for {len(names)} objectives "
                        f"({', '.join(names)}): give one per objective, or auto")
    for name, mine in zip(names, given):
        if mine not in ("auto", wanted[name]):
            raise UserError(f"hydra.sweeper.direction says {mine} for {name}, whose better values are "
                            f"{'higher' if wanted[name] == 'maximize' else 'lower'}: use {wanted[name]}, or auto")
    return [wanted[name] for name in names]


def existing_study(name: str, storage: str | None):
    import optuna

    if storage is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no study of that name there yet
        return None


def check_directions(study, wanted: list[str], name: str) -> None:
    """A study continued with other objectives or directions: Optuna would stop with a traceback."""
    have = [d.name.lower() for d in study.directions]
    if have != wanted:
        raise UserError(f"the study {name!r} in this sweep dir optimises {have}, and this sweep asks for {wanted} "
                        "(other objectives or directions): give another hydra.sweep.dir or study_name for a new study")


def ask_again_the_interrupted(study) -> int:
    """Marks the trials a killed sweep left running as failed ("interrupted") and enqueues their parameters, so
    the study asks them again; returns how many trials completed. A study is continued by one sweep at a time: a
    trial another live sweep is running would look interrupted too."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # experimental in optuna 2, stable in 3
            study.enqueue_trial(trial.params)
        log.info(f"trial {trial.number} was interrupted: it is asked again with {trial.params}")
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
