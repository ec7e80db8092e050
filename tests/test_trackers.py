"""The experiment trackers of the logger group: one tiny run logs to TensorBoard, MLflow (a local SQLite store), W&B
(offline) and the CSV file at once, and each is read back through its own API: the same tags, steps and values as
TensorBoard's events, the run's config as MLflow params and W&B config, the artifacts at the end. A tracker that is
not installed, or a server that does not answer, is one clear message before training."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_RUN, run_mtl
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.sinks.base import Sink
from mtl_cli.errors import Stopped, UserError

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = "logger=[tensorboard,mlflow,wandb,csv]"
SIZES = [arg for arg in TINY_RUN if not arg.startswith("logger=")]
Curves = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in the order of the steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run directory and working directory (the MLflow store's home) of one run with every tracker; scalars at
    every step (two training steps, one validation), one example image per task."""
    folder = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        ran = run_mtl("train", *SIZES, ALL, "logger.log_every=1", "logger.images=1",
                      "logger.sinks.wandb.settings.x_disable_stats=true",
                      "+logger.sinks.wandb.settings.x_save_requirements=false", f"hydra.run.dir={folder / 'run'}",
                      cwd=folder)
    assert ran.status == 0, ran
    return folder / "run", folder


def tensorboard_curves(run_dir: Path) -> Curves:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(folder: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mtl").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def wandb_records(run) -> list[dict]:
    """The offline run's transaction log, as wandb's own reader prints it (one JSON record a line)."""
    [offline] = (run[0] / "wandb").glob("offline-run-*")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def wandb_curves(records: list[dict]) -> Curves:
    curves = defaultdict(list)
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            for key, value in item.items():
                if not key.startswith(("_", "images/")):  # wandb's own, and the images' fields
                    curves[key].append((item["_step"], value))
    return dict(curves)


def csv_curves(run_dir: Path) -> Curves:
    curves = defaultdict(list)
    with open(run_dir / "scalars.csv", newline="") as f:
        for row in csv.DictReader(f):
            curves[row["tag"]].append((int(row["step"]), float(row["value"])))
    return dict(curves)


def leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        return {k: v for key, child in node.items() for k, v in leaves(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def assert_same(curves: Curves, reference: Curves, exact: bool = True) -> None:
    assert sorted(curves) == sorted(reference)
    for tag, points in reference.items():
        assert [step for step, _ in curves[tag]] == [step for step, _ in points], tag
        for (_, value), (_, expected) in zip(curves[tag], points):
            assert value == expected if exact else math.isclose(value, expected, rel_tol=1e-6), (tag, value, expected)


def test_every_tracker_holds_tensorboards_scalars(run, wandb_records):
    run_dir, folder = run
    reference = tensorboard_curves(run_dir)
    assert {"train/loss/total", "train/loss/segmentation", "lr", "val/segmentation/miou"} <= set(reference)
    assert [step for step, _ in reference["train/loss/total"]] == [1, 2]
    assert [step for step, _ in reference["val/segmentation/miou"]] == [2]
    table = csv_curves(run_dir)
    assert_same(table, reference, exact=False)  # TensorBoard keeps float32; the others the float64 logged
    client, mlflow = mlflow_run(folder)
    assert set(mlflow.data.metrics) == set(reference)
    assert_same({tag: [(m.step, m.value) for m in client.get_metric_history(mlflow.info.run_id, tag)]
                 for tag in mlflow.data.metrics}, table)
    assert_same(wandb_curves(wandb_records), table)


def test_the_config_is_in_mlflow_params_and_wandb_config(run, wandb_records):
    run_dir, folder = run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    _, mlflow = mlflow_run(folder)
    assert mlflow.data.params == {key: str(value) for key, value in leaves(config).items()}
    assert mlflow.data.params["logger.log_every"] == "1"
    [start] = [r["run"] for r in wandb_records if r["type"] == "run"]
    assert {k: v for k, v in start["config"]["update"].items() if k != "_wandb"} == config
    assert start["display_name"] == mlflow.info.run_name == "run"  # the run dir, relative to the working dir


def test_mlflow_keeps_the_records_and_checkpoints_of_a_finished_run(run):
    run_dir, folder = run
    client, mlflow = mlflow_run(folder)
    assert mlflow.info.status == "FINISHED"
    run_id = mlflow.info.run_id
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "metrics.json", "config.md", "model.md",
                                                               "checkpoints"}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt",
                                                                             "checkpoints/last.pt"}
    kept = Path(client.download_artifacts(run_id, "metrics.json", str(folder / "download")))
    assert kept.read_bytes() == (run_dir / "metrics.json").read_bytes()


def test_wandb_offline_run_has_its_images_and_finished(wandb_records):
    history = [r["history"]["item"] for r in wandb_records if r["type"] == "history"]
    assert any(key.startswith("images/input") for item in history for key in item)
    assert [r["exit"].get("exit_code", 0) for r in wandb_records if r["type"] == "exit"] == [0]


def test_a_missing_tracker_package_is_one_message_before_training(mtl_main, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails as if it were not installed
    r = mtl_main("train", *SIZES, "logger=[tensorboard,mlflow]", "hydra.run.dir=run")
    assert r.status == 2, r
    assert 'logger=mlflow needs the package mlflow' in r.err and 'pip install "mtl-cli[mlflow]"' in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_wandb_message_and_the_sinks_opened_before_are_closed(tmp_path, monkeypatch):
    from mtl_cli.engine.sinks.csv_file import CsvSink
    from mtl_cli.engine.sinks.wandb import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)
    closed = []
    monkeypatch.setattr(CsvSink, "close", lambda self, status: closed.append(status))
    with pytest.raises(UserError, match=r'logger=wandb needs the package wandb.*pip install "mtl-cli\[wandb\]"'):
        Logger(tmp_path, sinks={"csv": CsvSink, "wandb": WandbSink})
    assert closed == ["failed"]


def test_an_mlflow_server_that_does_not_answer_is_one_message(tmp_path):
    from mtl_cli.engine.sinks.mlflow import MlflowSink

    with pytest.raises(UserError, match="the MLflow tracking server http://127.0.0.1:9 does not answer"):
        MlflowSink(tmp_path, {}, tracking_uri="http://127.0.0.1:9")


class Outcome(Sink):
    def __init__(self, run_dir, config):
        self.status = None

    def scalars(self, values, step):
        pass

    def close(self, status):
        self.status = status


@pytest.mark.parametrize(("error", "status"), [(None, "finished"), (Stopped("stopped by SIGTERM", 15), "killed"),
                                               (KeyboardInterrupt(), "killed"), (RuntimeError("a bug"), "failed")])
def test_the_sinks_close_with_the_runs_outcome(tmp_path, error, status):
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with Logger(tmp_path, sinks={"outcome": Outcome}) as logger:
            sink = logger.sinks["outcome"]
            if error:
                raise error
    assert sink.status == status and not logger.sinks


def test_a_config_saved_before_the_sinks_still_logs_to_tensorboard(tmp_path):
    """A checkpoint of an earlier version says `logger.tensorboard: true`: its resume logs as it did."""
    with Logger(tmp_path, tensorboard=True, log_every=5) as logger:
        logger.scalars({"lr": 0.5}, 5)
    assert tensorboard_curves(tmp_path) == {"lr": [(5, 0.5)]}
    assert logger.log_every == 5 and logger.num_images == 4


def test_choosing_a_tracker_imports_it_only_when_the_run_starts(tmp_path):
    code = ("import sys; from mtl_cli.cli import main\n"
            "try: main(['train', 'logger=[tensorboard,mlflow,wandb,csv]', '--cfg', 'job'])\n"
            "except SystemExit: pass\n"
            "print(*sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'wandb', 'tensorboard'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "MlflowSink" in result.stdout and result.stdout.splitlines()[-1] == ""  # composed; nothing imported
