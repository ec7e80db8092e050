"""MLflow: the run's params (the resolved config as dotted keys), its scalars under TensorBoard's tags, its text as
Markdown artifacts, and at the end config.yaml, metrics.json and the checkpoints as artifacts.

The store: tracking_uri if given (a server, http://host:5000, or a database), else $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db in the working directory (MLflow's own default since its file store went into maintenance),
whose artifacts MLflow keeps in ./mlruns: every run started from one folder lands in one store, next to outputs/
and multirun/, and `mlflow ui` started there shows them."""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from mtl_cli.engine.sinks.base import Sink, require, run_name
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")

STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


class MlflowSink(Sink):
    """experiment: the MLflow experiment the run joins (made if missing). checkpoints: best.pt and last.pt as
    artifacts at the end (a copy of each: false where they are large)."""

    def __init__(self, run_dir: Path, config: Mapping, tracking_uri: str | None = None, experiment: str = "mtl",
                 checkpoints: bool = True):
        mlflow = require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.run_dir, self.checkpoints = Path(run_dir), checkpoints
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
        check_answers(uri)
        try:
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            self.run_id = self.client.create_run(
                experiment_id(self.client, experiment), run_name=run_name(run_dir),
                tags={"run_dir": str(Path(run_dir).resolve())}).info.run_id
            params = [Param(key, value[:MAX_PARAM_VAL_LENGTH]) for key, value in dotted(config).items()]
            for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        except ImportError as e:  # mlflow-skinny alone: its SQL store needs SQLAlchemy and alembic
            raise UserError(f"the MLflow store {uri} needs a package that is missing ({e}): pip install "
                            "\"mtl-cli[mlflow]\"") from None
        except MlflowException as e:
            raise UserError(f"the MLflow store {uri} refused the run: {e.message.splitlines()[0]}") from None
        log.info(f"mlflow: run {self.run_id} of experiment {experiment!r} in {uri}")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, float(v), now, step) for tag, v in values.items()])

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.md")

    def close(self, status: str) -> None:
        files = [("config.yaml", None), ("metrics.json", None)]
        if self.checkpoints:
            files += [("checkpoints/best.pt", "checkpoints"), ("checkpoints/last.pt", "checkpoints")]
        for name, folder in files:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name), folder)
        self.client.set_terminated(self.run_id, STATUS[status])


def experiment_id(client, name: str) -> str:
    """The experiment's id, made if missing (two jobs of a sweep may both make it: the second finds the first's)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def dotted(node, prefix: str = "") -> dict[str, str]:
    """{"optimizer.lr": "0.001", ...}: MLflow's params are flat text; an empty mapping inside is "{}"."""
    if isinstance(node, Mapping) and (node or not prefix):
        return {key: value for k, v in node.items() for key, value in dotted(v, f"{prefix}{k}.").items()}
    return {prefix.removesuffix("."): str(node)}


def check_answers(uri: str) -> None:
    """A tracking server that does not answer is one clear error now, instead of MLflow retrying for minutes and
    ending in a traceback."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:  # it answered, if not to this
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"the MLflow tracking server {uri} does not answer ({reason}): start it, check "
                        "logger.sinks.mlflow.tracking_uri, or leave it null for the local store "
                        "(sqlite:///mlflow.db)") from None
