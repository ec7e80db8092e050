"""The run records (metrics.json, eval.json) as strict JSON: a value that is NaN or infinite is written as null
and its place listed under "nonfinite" (JSON has no NaN; Python's json would write a bare NaN that other readers
refuse), and the file is replaced whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mtl_cli.engine.atomic import write_atomically


def write_record(path: Path, record: dict[str, Any]) -> None:
    nonfinite: list[str] = []
    clean = finite_or_null(record, "", nonfinite)
    if nonfinite:
        clean["nonfinite"] = nonfinite
    text = json.dumps(clean, indent=2, allow_nan=False)
    write_atomically(path, lambda f: f.write(text.encode()))


def finite_or_null(value: Any, where: str, nonfinite: list[str]) -> Any:
    """`value` with every non-finite float replaced by None; their dotted places are appended to `nonfinite`."""
    if isinstance(value, float) and not math.isfinite(value):
        nonfinite.append(where)
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{where}.{k}" if where else str(k), nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{where}[{i}]", nonfinite) for i, v in enumerate(value)]
    return value
