"""Sweeps through Hydra's plugins (the [sweep] extra): an Optuna study that persists in SQLite and continues after an
interruption, conditional and multi-objective searches, parallel jobs with joblib, Slurm jobs with submitit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN

import mtl_cli.train as train_module

STUDY = ["hydra.sweep.dir=sweep", "hydra.sweeper.n_jobs=1"]


def load(tmp_path: Path, name: str = "digit_scenes"):
    import optuna  # here, not at collection: it takes seconds to import

    import mtl_cli.sweeper  # noqa: F401 -- first: it quiets SQLAlchemy 1.4's warnings about 2.0, which optuna 2 trips

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")


def job_overrides(tmp_path: Path) -> dict[int, dict[str, str]]:
    jobs = {}
    for path in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml"):
        jobs[int(path.parts[-3])] = dict(o.split("=", 1) for o in yaml.safe_load(path.read_text()))
    return jobs


def fake_training(monkeypatch, objective, calls: list | None = None):
    """train() replaced by `objective(cfg)`: the sweeper's logic without the cost of training."""
    def train(cfg, run_dir, checkpoint=None):
        if calls is not None:
            calls.append(cfg)
        return objective(cfg)
    monkeypatch.setattr(train_module, "train", train)


def test_a_study_of_real_runs_persists_and_continues_after_an_interruption(mtl_main, tmp_path, monkeypatch):
    args = ["-m", "hparams_search=lr_wd", "hydra.sweeper.n_trials=2", *TINY_RUN, *STUDY]
    real_train, started = train_module.train, []

    def killed_in_the_second_trial(cfg, run_dir, checkpoint=None):
        started.append(run_dir)
        if len(started) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: the trial never reported back
        return real_train(cfg, run_dir, checkpoint)
    monkeypatch.setattr(train_module, "train", killed_in_the_second_trial)
    assert mtl_main("train", *args).status == 130
    interrupted = [t for t in load(tmp_path).trials if t.state.name == "RUNNING"]
    assert len(interrupted) == 1 and len(load(tmp_path).trials) == 2

    monkeypatch.setattr(train_module, "train", real_train)
    r = mtl_main("train", *args)
    assert r.status == 0, r
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [t.user_attrs.get("interrupted") for t in trials] == [None, True, None]
    assert trials[2].params == trials[1].params  # asked again with the interrupted trial's parameters
    jobs = job_overrides(tmp_path)
    assert sorted(jobs) == [0, 1, 2]  # new directories for the new trials, none over the old ones
    for trial in trials:
        assert float(jobs[trial.number]["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
    for trial in (trials[0], trials[2]):  # each value is the run's best val/loss/total
        record = json.loads((tmp_path / "sweep" / str(trial.number) / "metrics.json").read_text())
        assert trial.value == pytest.approx(record["best"]["loss"]["total"])
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(t.value for t in trials if t.value is not None))

    again = mtl_main("train", *args)  # the study has its 2 trials: nothing more runs
    assert again.status == 0 and len(load(tmp_path).trials) == 3, again


def test_a_method_hyperparameter_is_searched_only_in_the_trials_of_its_method(mtl_main, tmp_path, monkeypatch):
    calls = []
    fake_training(monkeypatch, lambda cfg: (math.log10(cfg.optimizer.lr) + 2.5) ** 2, calls)
    r = mtl_main("train", "-m", "hparams_search=weighting", "hydra.sweeper.n_trials=6",
                 "hydra.sweeper.sampler.n_startup_trials=6", "hydra.sweeper.params.weighting='choice(ew,cagrad,dwa)'",
                 *STUDY)
    assert r.status == 0, r
    trials = load(tmp_path).trials
    methods = {t.params["weighting"] for t in trials}
    assert methods == {"ew", "cagrad", "dwa"}
    for trial in trials:
        own = {"cagrad": {"weighting.c"}, "dwa": {"weighting.temperature"}}.get(trial.params["weighting"], set())
        assert set(trial.params) == {"weighting", "optimizer.lr", *own}
    trained = {cfg.optimizer.lr: cfg for cfg in calls}
    for trial in trials:  # each job trained what Optuna recorded for its trial
        cfg = trained[trial.params["optimizer.lr"]]
        assert cfg.weighting._target_.rsplit(".", 1)[1] == {"ew": "EqualWeighting", "cagrad": "CAGrad",
                                                            "dwa": "DynamicWeightAverage"}[trial.params["weighting"]]
        if trial.params["weighting"] == "cagrad":
            assert cfg.weighting.c == trial.params["weighting.c"] != 0.4
        if trial.params["weighting"] == "dwa":
            assert cfg.weighting.temperature == trial.params["weighting.temperature"] != 2.0


def test_a_multi_objective_study_finds_a_pareto_front_with_directions_from_the_metrics(mtl_main, tmp_path,
                                                                                          monkeypatch):
    def two_tasks(cfg):  # a trade-off: more weight on depth helps depth and hurts segmentation
        w = math.log(cfg.weighting.weights.depth)
        return [0.5 - 0.1 * w, 1.0 - 0.2 * w]
    fake_training(monkeypatch, two_tasks)
    r = mtl_main("train", "-m", "hparams_search=pareto", "hydra.sweeper.n_trials=4", *STUDY)
    assert r.status == 0, r
    study = load(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]  # miou up, abs_err down: auto
    front = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())["solutions"]
    assert len(front) == 4  # every point of a pure trade-off is Pareto-optimal
    other = mtl_main("train", "-m", "hparams_search=lr_wd", *STUDY)  # the same sweep dir, another study's question
    assert other.status == 2 and "optimises ['maximize', 'minimize'], and this sweep asks for ['minimize']" in \
        other.err, other


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.direction=maximize", "hydra.sweeper.direction says maximize for val/loss/total, whose better "
                                         "values are lower: use minimize, or auto"),
    ("objectives=[val/segmentation/mIoU]", "objectives=['val/segmentation/mIoU']: val/segmentation/mIoU is not "
                                           "logged by this run; choose from:"),
])
def test_a_study_that_would_search_the_wrong_way_is_refused_before_any_trial(mtl_main, tmp_path, override,
                                                                             message):
    r = mtl_main("train", "-m", "hparams_search=lr_wd", override, *STUDY)
    assert r.status == 2 and message in r.err, r
    assert not list((tmp_path / "sweep").glob("*/.hydra"))


@pytest.mark.slow  # the default run checks failed jobs in any sweep (test_sweep_failures) and the preset's failure rate
def test_failed_trials_are_recorded_and_the_study_goes_on(mtl_main, tmp_path, monkeypatch):
    calls = []

    def every_other_diverges(cfg):
        if len(calls) % 2 == 0:
            raise RuntimeError("diverged")
        return 1.0
    fake_training(monkeypatch, every_other_diverges, calls)
    r = mtl_main("train", "-m", "hparams_search=lr_wd", "hydra.sweeper.n_trials=3", *STUDY)
    states = [t.state.name for t in load(tmp_path).trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert r.status == 1 and "crash: RuntimeError: diverged" in r.err, r


@pytest.mark.slow  # two processes that each import torch and train: 20 s
def test_the_joblib_launcher_runs_two_jobs_at_once(mtl_main, tmp_path):
    r = mtl_main("train", "-m", "hydra/launcher=parallel", "seed=0,1", *TINY_RUN, "hydra.sweep.dir=sweep")
    assert r.status == 0, r
    spans = []
    for job in (0, 1):  # from Hydra's record of the job's config (written in the worker first) to metrics.json
        folder = tmp_path / "sweep" / str(job)
        spans.append(((folder / ".hydra" / "config.yaml").stat().st_mtime, (folder / "metrics.json").stat().st_mtime))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # the two runs overlap in time


@pytest.mark.slow  # submitit's job process imports torch and trains: 20 s
def test_a_local_submitit_executor_runs_a_job(mtl_main, tmp_path):
    r = mtl_main("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *TINY_RUN,
                 "hydra.sweep.dir=sweep")
    assert r.status == 0, r
    assert json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())["epochs"] == 1
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_0_log.out"))  # it ran as submitit's job


def test_a_sweep_preset_without_its_plugin_names_the_extra_to_install(mtl_main, monkeypatch):
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    import hydra_plugins.mtl_cli_plugins as plugins

    plugins.register()
    known = dict(Plugins.instance().class_name_to_class)
    monkeypatch.setattr(Plugins.instance(), "class_name_to_class",
                        {name: cls for name, cls in known.items() if "study_sweeper" not in name})
    monkeypatch.setattr(plugins, "register", lambda: None)
    r = mtl_main("train", "-m", "hparams_search=lr_wd")
    assert r.status == 2 and r.err == ("mtl train: error: this sweep needs Hydra's Optuna sweeper, not installed: "
                                       'pip install "mtl-cli[sweep]"\n'), r
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "joblib.yaml")
    r = mtl_main("train", "-m", "hydra/launcher=parallel", "seed=0,1")
    assert r.status == 2 and "needs Hydra's joblib launcher, not installed" in r.err, r
    r = mtl_main("train", "-m", "hydra/launcher=paralel", "seed=0,1")  # a typo is a typo, not a missing plugin
    assert r.status == 2 and "(did you mean 'parallel'?)" in r.err, r
