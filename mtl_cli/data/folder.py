"""`data=folder`: the user's own images with a CSV or JSONL manifest of labels per split.

Layout: `<root>/<split>.csv` (or `.jsonl`, or the files `manifest.<split>` names), one row per image: an image
path column (relative to root, or absolute) and one column per task. What each column holds is declared per
target in `data.targets.<task>` (`column` and `kind`), so the user says which column is what:

    class       a class name                    -> int64 index (classification, identity)
    multilabel  names ("cat;dog", a JSON list)  -> float [C] in {0, 1} (multilabel)
    mask        a PNG of class indices          -> int64 [H, W], the ignore value kept (segmentation)
    depth       a PNG (divided by `scale`) or a .npy (as stored); 0, negative or not finite = invalid (depth)
    boxes       JSON [[x1, y1, x2, y2, name], ...] in pixels -> XYXY boxes + int64 labels (detection)
    value       a number                        -> float scalar (count: L1 regression)

An empty cell means "no label for this task": the key is left out of the sample and the task skips it; for
boxes `[]` means "labelled, no objects". Every cell is parsed when the split is built, so a bad cell stops the
run at once, naming its file, line and column; image, mask and depth files are read per sample (a missing or
corrupt one raises BadSample, which data.skip_bad=true skips).

Class maps (class, multilabel, boxes) come from the train manifest, names sorted (numerically when every name is
an integer), unless `classes.<task>` gives them: the dataset's `facts` carry them into cfg.data, hence into the
checkpoint, so `mtl eval` and a resume use the maps the model was trained with. A label outside a given map is an
error naming it (or, with `unknown_labels=skip`, an empty cell, with a warning).
"""

from __future__ import annotations

import ast
import codecs
import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtl_cli.data.files import BadSample, read_image, read_npy, read_raw
from mtl_cli.data.transforms import Depth, plain
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")

KINDS = ("class", "multilabel", "mask", "depth", "boxes", "value")
NAMED_KINDS = ("class", "multilabel", "boxes")  # kinds whose labels are names mapped through a class map
FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
LAYOUT = ("<root>/train.csv and <root>/val.csv (or .jsonl), one row per image: a column `image` with the image path "
          "(relative to <root>, or absolute) and one column per task, e.g. the header `image,label,mask` and a row "
          "`images/0001.jpg,cat,masks/0001.png`. See the README section 'Your own data: data=folder'")


@dataclass(frozen=True)
class Target:
    """One declared target the run uses: which column feeds which batch key, read as which kind."""

    task: str
    kind: str
    column: str
    key: str
    labels_key: str = "labels"
    num_classes: int | None = None
    ignore_index: int = 255
    scale: float = 1.0


@dataclass(frozen=True)
class Manifest:
    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]  # (line number in the file, the row's cells)


class FolderDataset(Dataset):
    """Images of a folder with the labels of a manifest (see the module docstring)."""

    def __init__(self, split: str, root: str, transforms: Callable | None = None, download: bool = False,
                 manifest: Mapping[str, str] | None = None, image_column: str = "image",
                 targets: Mapping[str, Mapping] | None = None, tasks: Iterable[str] | None = None,
                 classes: Mapping[str, list] | None = None, separator: str = ";", unknown_labels: str = "error"):
        if unknown_labels not in ("error", "skip"):
            raise UserError(f"data.dataset.unknown_labels={unknown_labels!r} must be error or skip")
        self.root = check_root(root, download)
        self.split, self.transforms, self.separator = split, transforms, separator
        self.targets = bind_targets(plain_config(targets) or {}, tasks)
        self.manifests = dict(plain_config(manifest) or {})
        table = read_manifest(find_manifest(self.root, split, self.manifests))
        check_columns(table, [image_column] + [t.column for t in self.targets])
        given = {str(task): [str(name) for name in names] for task, names in (plain_config(classes) or {}).items()}
        self.train_table = table if split == "train" else None  # read when a class map needs it
        self.classes = {t.task: self.class_map(t, given) for t in self.targets if t.kind in NAMED_KINDS}
        self.index = {task: {name: i for i, name in enumerate(names)} for task, names in self.classes.items()}
        self.images = [image_path(self.root, table, line, row, image_column) for line, row in table.rows]
        self.manifest, self.lines = table.path, [line for line, _ in table.rows]
        self.labels = [{t.task: self.label(t, table, line, row, unknown_labels == "skip") for t in self.targets}
                       for line, row in table.rows]
        self.facts = {"dataset": {"classes": self.classes},
                      "targets": {task: {"num_classes": len(names)} for task, names in self.classes.items()}}

    def class_map(self, target: Target, given: Mapping[str, list[str]]) -> list[str]:
        """The given names of `target`'s classes, else the sorted names its column holds in the train manifest."""
        if target.task in given:
            names = given[target.task]
            if len(set(names)) != len(names) or not names:
                raise UserError(f"data.dataset.classes.{target.task} must list distinct class names, got {names}")
            return names
        if self.train_table is None:
            self.train_table = read_manifest(find_manifest(self.root, "train", self.manifests))
        train = self.train_table
        check_columns(train, [target.column])
        cells = [self.cell(target, train, line, row) for line, row in train.rows]
        found = {name for cell in cells if cell is not None for name in names_in(cell, target.kind)}
        if not found:
            raise UserError(f"{train.path}: column {target.column!r} (task {target.task!r}) holds no label, so no "
                            f"class map can be built; label some rows or give data.dataset.classes.{target.task}=[...]")
        if target.kind == "class" and len(found) == 1:
            raise UserError(f"{train.path}: column {target.column!r} (task {target.task!r}) holds one class only "
                            f"({found.pop()!r}): a classification needs two or more; label more rows or give "
                            f"data.dataset.classes.{target.task}=[...]")
        return sort_names(found)

    def cell(self, target: Target, table: Manifest, line: int, row: Mapping[str, Any]):
        """The parsed cell of `target`'s column (names not yet mapped to indices), or None for an empty cell."""
        value = row.get(target.column)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            return parse(target.kind, value, self.separator)
        except (ValueError, TypeError, SyntaxError) as e:
            raise UserError(f"{table.path} line {line}, column {target.column!r} (a {target.kind} cell for task "
                            f"{target.task!r}): cannot read {value!r}: {e}") from None

    def label(self, target: Target, table: Manifest, line: int, row: Mapping[str, Any], skip_unknown: bool):
        """The cell as the sample will hold it (class indices, paths, numbers), or None: no label for the task."""
        value = self.cell(target, table, line, row)
        if value is None or target.kind not in NAMED_KINDS:
            return resolve(self.root, value) if target.kind in ("mask", "depth") and value is not None else value
        names = self.classes[target.task]
        unknown = sorted(set(names_in(value, target.kind)) - set(names))
        if unknown and skip_unknown:
            log.warning(f"{table.path} line {line}: label(s) {unknown} of column {target.column!r} are not in the "
                        f"class map of task {target.task!r}; the cell is treated as empty")
            return None
        if unknown:
            raise UserError(f"{table.path} line {line}, column {target.column!r}: label(s) {unknown} are not in the "
                            f"class map of task {target.task!r} (known: {names}). The map comes from the train split "
                            f"(or data.dataset.classes.{target.task}, saved in the checkpoint); fix the label, or set "
                            "data.dataset.unknown_labels=skip to treat such cells as empty")
        index = self.index[target.task]
        if target.kind == "class":
            return index[value]
        if target.kind == "multilabel":
            return sorted({index[name] for name in value})
        return [box for box, _ in value], [index[name] for _, name in value]

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int, key: str | None = None) -> str:
        """The manifest row of sample `index` and its file of entry `key` (a mask, a depth map; else the image)."""
        file = next((self.labels[index][t.task] for t in self.targets if t.key == key and t.kind in ("mask", "depth")),
                    None)
        return f"{self.manifest} line {self.lines[index]}: {file or self.images[index]}"

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.images[index])
        sample: dict[str, Any] = {"image": image}
        for target in self.targets:
            value = self.labels[index][target.task]
            if value is not None:
                sample.update(load(target, value, self.images[index], tuple(image.shape[-2:]),
                                   self.classes.get(target.task)))
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(sample)


# ---------------------------------------------------------------------------------------------------- the config


def plain_config(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def check_root(root: str, download: bool) -> Path:
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        extra = " data=folder reads your own folder: there is nothing to download." if download else ""
        raise UserError(f"data=folder: no folder at {path}. Expected {LAYOUT}. Point data.root at it.{extra}")
    return path


def bind_targets(targets: Mapping[str, Mapping], tasks: Iterable[str] | None) -> list[Target]:
    """The targets of the selected tasks (all declared ones if `tasks` is None). A selected task with no target
    here is left to build_tasks, which names the targets the data provides."""
    selected = list(targets) if tasks is None else [str(t) for t in tasks]
    bound = []
    for task in selected:
        spec = targets.get(task)
        if spec is None:
            continue
        kind, column = spec.get("kind"), spec.get("column")
        if kind not in KINDS or not column:
            raise UserError(f"data.targets.{task} must name a `column` of the manifest and its `kind` (one of "
                            f"{', '.join(KINDS)}), got column={column!r}, kind={kind!r}")
        if kind == "mask" and not spec.get("num_classes"):
            raise UserError(f"data.targets.{task}.num_classes must be given for a mask column: the number of classes "
                            f"whose indices the mask PNGs hold (0..N-1), e.g. data.targets.{task}.num_classes=3")
        bound.append(Target(task=task, kind=kind, column=str(column), key=str(spec.get("key") or task),
                            labels_key=str(spec.get("labels_key") or "labels"),
                            num_classes=spec.get("num_classes"), ignore_index=int(spec.get("ignore_index", 255)),
                            scale=float(spec.get("scale", 1.0))))
    return bound


# -------------------------------------------------------------------------------------------------- the manifest


def find_manifest(root: Path, split: str, manifests: Mapping[str, str]) -> Path:
    """`manifest.<split>` if named, else `<split>.csv`, `<split>.tsv` or `<split>.jsonl` under root."""
    if split in manifests:
        path = Path(str(manifests[split])).expanduser()
        candidates = [path if path.is_absolute() else root / path]
    else:
        candidates = [root / f"{split}{suffix}" for suffix in FORMATS]
    for path in candidates:
        if path.is_file():
            if path.suffix not in FORMATS:
                raise UserError(f"manifest {path}: a manifest is a .csv, .tsv or .jsonl file")
            return path
    raise UserError(f"data=folder: no manifest for split {split!r}: looked for {', '.join(map(str, candidates))}. "
                    f"Expected {LAYOUT}; or name the file with data.dataset.manifest.{split}=<file under root>")


def read_manifest(path: Path) -> Manifest:
    table = read_jsonl(path) if FORMATS[path.suffix] is None else read_csv(path)
    if not table.rows:
        raise UserError(f"manifest {path} has no rows: one row per image is expected (see {LAYOUT.split('See ')[-1]})")
    return table


def manifest_text(path: Path) -> str:
    """The manifest's text, or a clear error when the file is binary (an image named by mistake) or not UTF-8."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"manifest {path} is UTF-16 text: save it as UTF-8 (in a spreadsheet: CSV UTF-8)")
    if b"\0" in data:
        raise UserError(f"manifest {path} holds binary data: it is not a text CSV/TSV/JSONL manifest (is it an image "
                        "or an array file under a manifest's name?)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"manifest {path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): a manifest is a "
                        "text CSV/TSV/JSONL file saved as UTF-8 (in a spreadsheet: CSV UTF-8)") from None


def read_csv(path: Path) -> Manifest:
    reader = csv.DictReader(io.StringIO(manifest_text(path), newline=""), delimiter=FORMATS[path.suffix])
    rows = [(reader.line_num, row) for row in reader if any((v or "").strip() for k, v in row.items() if k)]
    columns = [c for c in reader.fieldnames or [] if c]
    for line, row in rows:
        if None in row:
            raise UserError(f"{path} line {line} has more cells than the header ({len(columns)}): a cell holding a "
                            "comma (a JSON list) must be in double quotes, e.g. \"[[1, 2, 30, 40, 'cat']]\"")
    return Manifest(path, columns, rows)


def read_jsonl(path: Path) -> Manifest:
    rows = []
    for line, text in enumerate(manifest_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {line}: not a JSON object ({e})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {line}: each line must be a JSON object {{\"image\": ..., ...}}")
        rows.append((line, row))
    return Manifest(path, list(dict.fromkeys(key for _, row in rows for key in row)), rows)


def check_columns(table: Manifest, needed: Iterable[str]) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in table.columns]
    if missing:
        raise UserError(f"{table.path} has no column {', '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(table.columns) or 'none'}). Rename the column in the file, or point the config at"
                        " it: data.dataset.image_column=... for images, data.targets.<task>.column=... for a task")


def resolve(root: Path, value: str) -> Path:
    path = Path(str(value).strip()).expanduser()
    return path if path.is_absolute() else root / path


def image_path(root: Path, table: Manifest, line: int, row: Mapping, column: str) -> Path:
    value = row.get(column)
    if value is None or not str(value).strip():
        raise UserError(f"{table.path} line {line}, column {column!r}: every row needs an image path")
    return resolve(root, value)


# ------------------------------------------------------------------------------------------------------- cells


def parse(kind: str, value: Any, separator: str):
    """A non-empty cell: class -> name; multilabel -> names; boxes -> [([x1, y1, x2, y2], name)]; value -> float;
    mask, depth -> the path as written. Raises ValueError or TypeError for a cell that does not fit its kind."""
    if kind == "class":
        return name_of(value)
    if kind == "multilabel":
        if isinstance(value, str) and not value.strip().startswith("["):
            return [name.strip() for name in value.split(separator) if name.strip()]
        return [name_of(name) for name in as_list(value)]
    if kind == "boxes":
        return [box_of(entry) for entry in as_list(value)]
    if kind == "value":
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        return number
    if not isinstance(value, str):
        raise TypeError(f"a {kind} cell is a file path")
    return value.strip()


def as_list(value: Any) -> list:
    """A JSON list; in a CSV cell Python's quoting is accepted too ([[1, 2, 30, 40, 'cat']]), so that the cell needs
    no doubled double quotes."""
    if isinstance(value, str):
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            items = ast.literal_eval(value.strip())
    else:
        items = value
    if not isinstance(items, list):
        raise TypeError("expected a JSON list")
    return items


def name_of(value: Any) -> str:
    if isinstance(value, (list, dict)) or value is None:
        raise TypeError("expected a class name")
    return str(value).strip()


def box_of(entry: Any) -> tuple[list[float], str]:
    if not isinstance(entry, list) or len(entry) != 5:
        raise ValueError(f"each box is [x1, y1, x2, y2, label], got {entry!r}")
    x1, y1, x2, y2 = (float(v) for v in entry[:4])
    if not (x2 > x1 and y2 > y1) or not all(map(math.isfinite, (x1, y1, x2, y2))):
        raise ValueError(f"box {entry!r} needs x1 < x2 and y1 < y2 (pixels, XYXY)")
    return [x1, y1, x2, y2], name_of(entry[4])


def names_in(value: Any, kind: str) -> list[str]:
    if kind == "class":
        return [value]
    return list(value) if kind == "multilabel" else [name for _, name in value]


def sort_names(names: Iterable[str]) -> list[str]:
    """Sorted names; numerically when every name is an integer (so that 2 comes before 10)."""
    names = list(names)
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


# ------------------------------------------------------------------------------------------------------- files


def load(target: Target, value: Any, image: Path, size: tuple[int, int], classes: list[str] | None) -> dict[str, Any]:
    """The sample entries of one labelled target, as tv_tensors that the joint transforms move with the image
    (`image` is the image's path and `size` its (H, W), to check the boxes against)."""
    if target.kind == "class":
        return {target.key: torch.tensor(value, dtype=torch.int64)}
    if target.kind == "multilabel":
        vector = torch.zeros(len(classes or []), dtype=torch.float32)
        vector[value] = 1.0
        return {target.key: vector}
    if target.kind == "value":
        return {target.key: torch.tensor(value, dtype=torch.float32)}
    if target.kind == "boxes":
        boxes, labels = value
        outside = [box for box in boxes if min(box) < 0 or box[2] > size[1] or box[3] > size[0]]
        if outside:
            raise BadSample(image, f"boxes {outside} of column {target.column!r} reach outside the image "
                                   f"({size[1]}x{size[0]} pixels, WxH)")
        return {target.key: tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                     format="XYXY", canvas_size=size),
                target.labels_key: torch.tensor(labels, dtype=torch.int64)}
    if target.kind == "mask":
        return {target.key: read_mask(value, size, target)}
    return {target.key: read_depth(value, size, target.scale)}


def read_mask(path: Path, size: tuple[int, int], target: Target) -> tv_tensors.Mask:
    raw = read_raw(path)
    if raw.shape[0] != 1:
        raise BadSample(path, f"a mask is a one-channel PNG of class indices, this one has {raw.shape[0]} channels "
                              "(colour masks must be converted to indices first)")
    mask = raw[0].to(torch.int64)
    check_size(path, tuple(mask.shape), size)
    bad = (mask >= int(target.num_classes)) & (mask != target.ignore_index)
    if bad.any():
        raise BadSample(path, f"mask values {sorted(mask[bad].unique().tolist())[:10]} are neither class indices "
                              f"0..{int(target.num_classes) - 1} (data.targets.{target.task}.num_classes) nor the "
                              f"ignore value {target.ignore_index}")
    return tv_tensors.Mask(mask)


def read_depth(path: Path, size: tuple[int, int], scale: float) -> Depth:
    """Depth [1, H, W]: a PNG's values divided by `scale`, a .npy's as stored; 0, negative, NaN or inf: invalid."""
    if path.suffix.lower() == ".npy":
        array = read_npy(path)
        depth = torch.from_numpy(np.asarray(array, dtype=np.float32)).squeeze()
    else:
        raw = read_raw(path)
        if raw.shape[0] != 1:
            raise BadSample(path, f"a depth PNG has one channel, this one has {raw.shape[0]}")
        depth = raw[0].to(torch.float32) / scale
    if depth.dim() != 2:
        raise BadSample(path, f"depth must be [H, W] (or [1, H, W]), got shape {list(depth.shape)}")
    check_size(path, tuple(depth.shape), size)
    depth = torch.where(torch.isfinite(depth) & (depth > 0), depth, 0.0)
    return Depth(depth[None])


def check_size(path: Path, found: tuple[int, ...], size: tuple[int, int]) -> None:
    if found != size:
        raise BadSample(path, f"its size {found[1]}x{found[0]} (WxH) differs from its image's {size[1]}x{size[0]}")
