"""The scalars as a plain table for scripts: one row per value, columns step,tag,value (a tidy table that
pandas.read_csv or any spreadsheet reads), written as the run goes and flushed after each call."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from mtl_cli.engine.sinks.base import Sink


class CsvSink(Sink):
    """`file`: relative to the run directory. A resumed run (the same run directory) appends to it."""

    def __init__(self, run_dir: Path, config: Mapping | None = None, file: str = "scalars.csv"):
        path = Path(run_dir) / file
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "tag", "value"])
            self.file.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.writer.writerows([step, tag, repr(float(value))] for tag, value in values.items())  # repr: exact
        self.file.flush()

    def close(self, status: str) -> None:
        self.file.close()
