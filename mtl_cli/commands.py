"""The Hydra entries of `mtl train`, `mtl eval`, `mtl predict`, `mtl export` and `mtl explain`.

Light to import on purpose: `--help`, `--cfg job` and tab completion only compose a config, so torch and the
recipes (train.py, evaluate.py) are imported inside the task functions, which run only for a real job.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_cli.errors import Interrupted, Stopped, reports_user_errors
from mtl_cli.paths import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@reports_user_errors("train")
def train_command(cfg: DictConfig) -> float | list[float]:
    """Returns what a Hydra sweeper such as Optuna optimises: the best monitored value, or the `objectives`."""
    from mtl_cli import launch
    from mtl_cli.engine.state import HydraValues, load_run
    from mtl_cli.runtime import without_trust
    from mtl_cli.train import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint, resume = None, resume_path(cfg.resume, run_dir)
    if resume is not None:
        cfg, checkpoint = load_run(resume, cfg, "resume", HydraValues.of(HydraConfig.get()))
        with open_dict(cfg):
            cfg.resume = str(resume)  # resume=auto: the file it found
    cfg, processes = without_trust(cfg), launch.processes(cfg)
    try:
        if processes:
            job = launch.Job("train", OmegaConf.to_yaml(cfg), str(run_dir), None if resume is None else str(resume))
            return launch.distributed(job, processes)
        return train(cfg, run_dir, checkpoint)
    except Stopped as stop:
        stop.hand_on()  # submitit's handler requeues the job (and exits): the run has saved and wound up
        raise
    except KeyboardInterrupt:
        last = run_dir / "checkpoints" / "last.pt"
        raise Interrupted(f"the last checkpoint is {last}: continue with mtl train resume={last}" if last.is_file()
                          else f"no checkpoint was written yet in {run_dir}") from None


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """resume=auto: the run dir's own last.pt when there is one (a requeued job continues), else a fresh start."""
    if resume != "auto":
        return None if resume is None else Path(str(resume))
    last = run_dir / "checkpoints" / "last.pt"
    return last if last.is_file() else None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
@reports_user_errors("eval")
def eval_command(cfg: DictConfig) -> dict:
    from mtl_cli.evaluate import evaluate_checkpoint

    from mtl_cli.engine.state import HydraValues

    return evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir), HydraValues.of(HydraConfig.get()))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
@reports_user_errors("predict")
def predict_command(cfg: DictConfig) -> dict:
    from mtl_cli.engine.state import HydraValues
    from mtl_cli.inference.predict import predict

    return predict(cfg, Path(HydraConfig.get().runtime.output_dir), HydraValues.of(HydraConfig.get()))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
@reports_user_errors("export")
def export_command(cfg: DictConfig) -> dict:
    from mtl_cli.engine.state import HydraValues
    from mtl_cli.inference.export import export

    return export(cfg, Path(HydraConfig.get().runtime.output_dir), HydraValues.of(HydraConfig.get()))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="explain")
@reports_user_errors("explain")
def explain_command(cfg: DictConfig) -> dict:
    from mtl_cli.analysis.saliency import explain
    from mtl_cli.engine.state import HydraValues

    return explain(cfg, Path(HydraConfig.get().runtime.output_dir), HydraValues.of(HydraConfig.get()))


@contextlib.contextmanager
def mode_from_the_command_line():
    """Hydra composes the whole config once only to read `hydra.mode`, then again to run it (0.2 s of a 1-second
    command): the mode comes from the command line instead, `-m` or a `hydra.mode=` override, as our configs set
    none. (Hydra internals: should they move, only speed is lost.)"""
    try:
        from hydra._internal.hydra import Hydra
        from hydra.types import RunMode
        ask = Hydra.get_mode
    except (ImportError, AttributeError):
        yield
        return

    def from_overrides(self, config_name, overrides):
        given = [o.split("=", 1)[1].strip().upper() for o in overrides if o.startswith("hydra.mode=")]
        return RunMode.__members__.get(given[-1]) if given else None
    Hydra.get_mode = from_overrides
    try:
        yield
    finally:
        Hydra.get_mode = ask


@contextlib.contextmanager
def group_options_once():
    """Hydra's --help and tab completion ask for the options of config groups dozens of times, each time
    deep-copying Hydra's whole config repository (most of `mtl train --help`'s time): here the questions asked with
    the same primary config and overrides share one copy. (Hydra internals: should they move, only speed is lost.)"""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        ask, prepare = ConfigLoaderImpl.get_group_options, ConfigLoaderImpl._parse_overrides_and_create_caching_repo
    except (ImportError, AttributeError):
        yield
        return
    repos = {}

    def once(self, group_name, results_filter=ObjectType.CONFIG, config_name=None, overrides=None):
        key = (id(self), config_name, tuple(overrides or ()))
        if key not in repos:
            repos[key] = prepare(self, config_name, list(overrides or ()))[1]
        return repos[key].get_group_options(group_name, results_filter)
    ConfigLoaderImpl.get_group_options = once
    try:
        yield
    finally:
        ConfigLoaderImpl.get_group_options = ask
