"""mtl predict: a trained model on images without labels, each task's predictions written per image at the image's
original resolution by the writer its config names (inference/writers.py).

The model, its tasks and its preprocessing come from the checkpoint (inference/loaded.py), or from a model.onnx
written by mtl export. Images are read one at a time (a corrupt or unreadable one is named and skipped), run in
batches of predict.batch_size (default: the checkpoint's data.batch_size) in eval mode, and the raw outputs handed
to the writers on the CPU. The writers run on predict.write_threads threads while the next batch is read and run
(encoding PNGs and writing files let go of Python's lock, as torch does), with at most that many batches held.

`tasks=[...]` names the tasks to write. On this command line it is a config group like in `mtl train`, and
replaying it onto the checkpoint's config (as mtl eval does) would replace the trained tasks' configs with the
installed defaults and build a model without the other heads, which the checkpoint's weights no longer fit. So the
override only selects: the names it composes are taken as the selection, and the override is dropped before the
checkpoint's config is read; the whole trained model runs (its other heads cost a little time, no more).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtl_cli.engine.state import HydraValues
from mtl_cli.errors import UserError
from mtl_cli.inference.inputs import Images
from mtl_cli.inference.loaded import Loaded
from mtl_cli.inference.writers import Writer

log = logging.getLogger("mtl")


def predict(cfg: DictConfig, run_dir: Path, hydra: HydraValues) -> dict:
    """Writes the predictions of cfg.ckpt for the images cfg.input names under cfg.out (default: run_dir)."""
    wanted, hydra = selected_tasks(cfg, hydra)
    images = Images.of(str(cfg.input))
    if str(cfg.ckpt).endswith(".onnx"):
        from mtl_cli.inference.onnx_model import load_onnx
        loaded = load_onnx(cfg, hydra)
    else:
        loaded = Loaded.of(cfg, hydra)
    names = checked_tasks(wanted, loaded.tasks)
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else run_dir
    writers = {name: writer_of(loaded, name, out) for name in names}
    batch_size = int(cfg.predict.get("batch_size") or loaded.cfg.data.batch_size)
    threads = max(1, int(cfg.predict.get("write_threads") or 1))
    with ProgressBar(progress_mode(cfg), len(images)) as advance:
        predicted = write_predictions(loaded, images, writers, out, batch_size, threads, advance)
    skipped = [str(path) for path in images.skipped]
    if not predicted:
        raise UserError(f"input={cfg.input}: none of the {len(images)} images could be read ({', '.join(skipped)})")
    log.info(f"{predicted} images predicted ({', '.join(names)}) into {out}; {len(skipped)} skipped"
             + (f": {', '.join(skipped)}" if skipped else ""))
    return {"predicted": predicted, "skipped": skipped, "tasks": names, "out": str(out)}


def write_predictions(loaded: Loaded, images: Images, writers: dict[str, Writer], out: Path, batch_size: int,
                      threads: int, advance: Callable[[int], None]) -> int:
    """Runs the model over the images and hands each batch's outputs to the writers, on `threads` threads with at
    most that many batches held; returns the number of images predicted."""
    keys = output_names(images.paths)
    predicted, pending = 0, deque()
    with ThreadPoolExecutor(threads) as pool, RecordFile(out / "predictions.jsonl") as records:
        for paths, pictures, outputs in predict_batches(loaded, images, batch_size, list(writers)):
            files = [keys[path] for path in paths]
            pending.append((paths, {name: pool.submit(writer.write_batch, files, pictures, outputs[name])
                                    for name, writer in writers.items()}))
            while pending and (len(pending) > threads or all(job.done() for job in pending[0][1].values())):
                predicted += finish(*pending.popleft(), keys, records)
                advance(predicted + len(images.skipped))
        while pending:
            predicted += finish(*pending.popleft(), keys, records)
            advance(predicted + len(images.skipped))
    return predicted


def finish(paths: list[Path], jobs: dict[str, Future], keys: dict[Path, str], records: RecordFile) -> int:
    """Waits for a batch's writers and adds its rows to predictions.jsonl; returns the number of images."""
    rows = [{"image": str(path), "name": keys[path]} for path in paths]
    for name, job in jobs.items():
        for row, record in zip(rows, job.result()):
            if record is not None:
                row[name] = record
    records.write(rows)
    return len(paths)


def selected_tasks(cfg: DictConfig, hydra: HydraValues) -> tuple[list[str] | None, HydraValues]:
    """(the task names `tasks=[...]` selects, or None for all; the Hydra values without that override)."""
    overrides = OverridesParser.create().parse_overrides(list(hydra.typed))
    picks = {i for i, o in enumerate(overrides)
             if o.key_or_group == "tasks" and o.package is None and not o.is_delete()}
    if not picks:
        return None, hydra
    kept = [typed for i, typed in enumerate(hydra.typed) if i not in picks]
    return list(cfg.get("tasks") or {}), dataclasses.replace(hydra, typed=kept)


def checked_tasks(wanted: list[str] | None, available: Mapping) -> list[str]:
    if wanted is None:
        return list(available)
    missing = [name for name in wanted if name not in available]
    if missing or not wanted:
        raise UserError(f"tasks=[{','.join(wanted)}]: the checkpoint has no task {', '.join(missing) or 'selected'}; "
                        f"its tasks are {', '.join(available)}")
    return [name for name in available if name in wanted]  # in the model's order


def writer_of(loaded: Loaded, name: str, out: Path) -> Writer:
    """The task's writer, built from its config's partial with the run's class names for it."""
    writer = loaded.entry(name, "writer")
    if writer is None:
        raise UserError(f"task {name!r} declares no writer (a task config without `writer:`, or a checkpoint from "
                        f"before mtl predict whose task no packaged config matches): give one as configs/tasks/ do, "
                        f"e.g. +tasks.{name}.writer='{{_target_:mtl_cli.inference.writers.ClassWriter,_partial_:true}}'"
                        ", or leave the task out with tasks=[...]")
    return writer(name=name, out=out, classes=class_names(loaded.cfg, name), decode=loaded.tasks[name].decode)


def class_names(cfg: DictConfig, task: str) -> list[str] | None:
    """The checkpoint's class map of `task` (data=folder saves it as data.dataset.classes.<task>), or None."""
    names = OmegaConf.select(cfg, f"data.dataset.classes.{task}", default=None, throw_on_resolution_failure=False)
    return [str(name) for name in names] if isinstance(names, (ListConfig, list)) else None


def output_names(paths: Iterable[Path]) -> dict[Path, str]:
    """The name each image's files take: its stem; images sharing a stem get their path relative to the deepest
    folder above all of them, '/' written '__' (with the suffix where that still collides, and a number last)."""
    paths = list(dict.fromkeys(paths))
    stems = Counter(path.stem for path in paths)
    shared = [path.resolve() for path in paths if stems[path.stem] > 1]
    root = Path(*common_parts(shared)) if shared else None
    names = {}
    for path in paths:
        if stems[path.stem] == 1:
            names[path] = path.stem
            continue
        names[path] = "__".join(path.resolve().relative_to(root).with_suffix("").parts)
    repeats = Counter(names.values())
    for path in paths:  # x.png and x.jpg in one folder
        if repeats[names[path]] > 1:
            names[path] = f"{names[path]}_{path.suffix.lstrip('.').lower()}"
    seen: Counter = Counter()
    for path in paths:
        seen[names[path]] += 1
        if seen[names[path]] > 1:
            names[path] = f"{names[path]}_{seen[names[path]]}"
    return names


def common_parts(paths: list[Path]) -> tuple[str, ...]:
    parents = [path.parent.parts for path in paths]
    common = []
    for parts in zip(*parents):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return tuple(common)


def predict_batches(loaded: Loaded, images: Iterable[tuple[Path, torch.Tensor]], batch_size: int,
                    tasks: Iterable[str] | None = None) -> Iterator[tuple[list[Path], list[torch.Tensor], dict]]:
    """(paths, uint8 images, {task: the model's raw output on the CPU}) per batch of readable images."""
    with torch.inference_mode():
        for chunk in chunks(images, batch_size):
            paths, pictures = (list(column) for column in zip(*chunk))
            outputs = loaded.model(loaded.batch(pictures))
            yield paths, pictures, {name: on_cpu(outputs[name]) for name in (tasks or outputs)}


def chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def on_cpu(output):
    if isinstance(output, Mapping):
        return {key: on_cpu(value) for key, value in output.items()}
    return output.detach().float().cpu() if output.is_floating_point() else output.cpu()


class RecordFile:
    """predictions.jsonl, one row per image with the image-level tasks' records; written only when a task returns
    records (a run of dense tasks alone writes none)."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def write(self, rows: list[dict]) -> None:
        rows = [row for row in rows if len(row) > 2]
        if rows and self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")
        for row in rows:
            self.file.write(json.dumps(row) + "\n")

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def progress_mode(cfg: DictConfig) -> str:
    mode = str(cfg.trainer.get("progress", "auto"))
    return "bar" if mode == "bar" or (mode == "auto" and sys.stdout.isatty()) else "none"


class ProgressBar:
    """A rich progress bar over the images (as engine/progress.py draws training's), or nothing; entering gives
    advance(done)."""

    def __init__(self, mode: str, total: int):
        self.mode, self.total, self.bar = mode, total, None

    def __enter__(self):
        if self.mode != "bar":
            return lambda done: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=True)
        self.bar.start()
        task = self.bar.add_task("predict", total=self.total)
        return lambda done: self.bar.update(task, completed=done)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
