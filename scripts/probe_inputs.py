"""Tries malformed and hostile inputs on the `mtl` command line, as a careless or hostile user would, and prints one
row per input: its id and command, the exit status, the count of stderr lines, whether a Python traceback appeared,
whether anything already saved was lost, and a verdict:

    clear      the documented outcome: exit 2 with exactly one `mtl <cmd>: error: ...` line on stderr (or, where an
               input is documented otherwise, that status and output), no traceback, nothing lost, and what the
               probe checks afterwards holds (no run directory for a bad value, no file written by a checkpoint...)
    traceback  "Traceback" anywhere in stdout or stderr
    silent     exit 0 although the input was bad
    other      anything else (the row's note says what)

    .venv/bin/python scripts/probe_inputs.py [-v] [ID_PART ...]

ID_PART: run only the probes whose id contains one of them; -v: print every input's stderr under its row.

Commands run in this process through mtl_cli.cli.main(argv), each in a fresh working directory ($W) with stdout
and stderr captured; those that need a process boundary (signals) run the `mtl` console script. Every fixture is
made here: a tiny reference training run ($REF), a tiny NYUv2 release (.npy) and a tiny data=folder dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from mtl_cli.cli import main as mtl_main
from mtl_cli.engine.checkpoint import FORMAT
from mtl_cli.guard import RunLock

MTL = str(Path(sys.executable).with_name("mtl"))
TINY = ["data.dataset.scenes={train:16,val:8,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
        "trainer.max_epochs=1", "trainer.progress=none", "logger=console"]
RUN = [*TINY, "hydra.run.dir=run"]
NYU = ["data=nyuv2", "data.root=$W/nyu", "data.dataset.size=[24,32]", "tasks=[segmentation,depth]",
       "data.transforms.train=[]", "backbone=small_cnn", "data.batch_size=2", "trainer.max_epochs=1",
       "trainer.progress=none", "logger=console", "hydra.run.dir=run"]
PETS = ["data=folder", "data.root=$W/pets", "data.image_size=[16,16]", "backbone=small_cnn", "data.batch_size=2",
        "trainer.max_epochs=1", "trainer.progress=none", "logger=console", "hydra.run.dir=run"]
LONG_RUN = ["data.dataset.scenes={train:64,val:8,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
            "trainer.max_epochs=50", "trainer.progress=plain", "logger=console", "hydra.run.dir=$W/run"]


# ------------------------------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class Expect:
    """The documented outcome: an exit status and one regex per stderr line (None: one `mtl <cmd>: error:` line)."""
    status: int = 2
    stderr: tuple[str, ...] | None = None


@dataclass
class Probe:
    id: str
    argv: list[str]                                   # $W: the probe's working directory, $REF: the reference run
    setup: Callable | None = None                     # (w, fixtures) -> None, or a callable that undoes it
    expect: Expect = field(default_factory=Expect)
    check: Callable[[Path], str | None] | None = None  # what the command left in $W: a problem, or None
    signal: int | None = None                         # sent once the run's first last.pt exists (a subprocess)


@dataclass
class Fixtures:
    ref: Path
    nyu: Path
    pets: Path


OK = Expect(0, ())


# --------------------------------------------------------------------------------------------------- fixtures


def make_fixtures(root: Path) -> Fixtures:
    fx = Fixtures(root / "ref", root / "nyu", root / "pets")
    status, out, err = run_in_process(["train", *TINY, f"hydra.run.dir={fx.ref}"], root)
    if status != 0:
        sys.exit(f"the reference run failed ({status}):\n{out}\n{err}")
    write_nyu(fx.nyu)
    write_pets(fx.pets)
    return fx


def write_nyu(root: Path, size=(24, 32), counts=(("train", 4), ("val", 2))) -> None:
    """The MTAN release's layout: {split}/{image,label,depth,normal}/{i}.npy, H x W (x C) floats, labels -1..12."""
    rng = np.random.default_rng(0)
    h, w = size
    for split, count in counts:
        for i in range(count):
            normal = rng.normal(size=(h, w, 3))
            arrays = {"image": rng.uniform(0, 1, (h, w, 3)).astype(np.float32),
                      "label": rng.integers(-1, 13, (h, w)).astype(np.float64),
                      "depth": rng.uniform(0.5, 10, (h, w, 1)).astype(np.float32),
                      "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32)}
            for folder, array in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)


def write_pets(root: Path) -> None:
    """data=folder: images/, masks/ (0 background, 1 cat, 2 dog), train.csv and val.csv with label and mask."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": []}
    for i in range(6):
        name, label = f"{i:04d}", ("cat", "dog")[i % 2]
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[8:, :8] = 1 + i % 2
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        rows["train" if i < 4 else "val"].append(f"images/{name}.png,{label},masks/{name}.png")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("image,label,mask\n" + "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ setups and checks
# A setup is (w, fixtures) -> None, or a callable that undoes it; a check is w -> a problem, or None.


def then(*setups: Callable) -> Callable:
    def setup(w: Path, fx: Fixtures):
        undo = [s(w, fx) for s in setups]
        return lambda: [u() for u in undo if callable(u)]
    return setup


def copy_of(fixture: str, name: str) -> Callable:
    """A copy of a fixture ("ref", "nyu" or "pets") as $W/<name>."""
    return lambda w, fx: shutil.copytree(getattr(fx, fixture), w / name)


def write(name: str, content: str | bytes | Callable) -> Callable:
    """$W/<name> holding `content` (or content(w, fx)), its folders made."""
    def setup(w: Path, fx: Fixtures) -> None:
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content(w, fx) if callable(content) else content
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return setup


def saved_with_torch(name: str, obj) -> Callable:
    """$W/<name> written by torch.save(obj), or torch.save(obj(w))."""
    return lambda w, fx: torch.save(obj(w) if callable(obj) else obj, w / name)


def remove(name: str) -> Callable:
    return lambda w, fx: (w / name).unlink()


def make_folder(name: str) -> Callable:
    return lambda w, fx: (w / name).mkdir()


def truncate(name: str, size: int) -> Callable:
    return lambda w, fx: (w / name).write_bytes((w / name).read_bytes()[:size])


def edit_text(name: str, old: str, new: str) -> Callable:
    return lambda w, fx: (w / name).write_text((w / name).read_text().replace(old, new))


def set_pixel(name: str, index: tuple, value: float) -> Callable:
    """One pixel of $W/<name>, a .npy array or a PNG, set to `value`."""
    def setup(w: Path, fx: Fixtures) -> None:
        path = w / name
        array = np.load(path) if path.suffix == ".npy" else np.array(Image.open(path))
        array[index] = value
        np.save(path, array) if path.suffix == ".npy" else Image.fromarray(array).save(path)
    return setup


def hold_lock(name: str) -> Callable:
    """A live run's lock on $W/<name>, held until the probe has run."""
    return lambda w, fx: RunLock(w / name).release


def crafted(change: Callable, name: str = "c.pt") -> Callable:
    """The reference run's last.pt, changed by `change(state, w)`, saved as $W/<name>."""
    def setup(w: Path, fx: Fixtures) -> None:
        state = torch.load(fx.ref / "checkpoints" / "last.pt", weights_only=True)
        change(state, w)
        torch.save(state, w / name)
    return setup


def stored(changes: dict) -> Callable:
    """A change of a checkpoint's stored config: dotted key -> value (or w -> value)."""
    def change(state: dict, w: Path) -> None:
        cfg = OmegaConf.create(state["config"])
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value(w) if callable(value) else value, merge=False, force_add=True)
        state["config"] = OmegaConf.to_yaml(cfg)
    return change


def put(key: str, value) -> Callable:
    return lambda state, w: state.update({key: value})


def drop(key: str) -> Callable:
    return lambda state, w: state.pop(key)


def shrink_first_weight(state: dict, w: Path) -> None:
    state["model"][next(iter(state["model"]))] = torch.zeros(1)


def half_of_best(w: Path, fx: Fixtures) -> bytes:
    data = (fx.ref / "checkpoints" / "best.pt").read_bytes()
    return data[:len(data) // 2]


def png_bytes(w: Path, fx: Fixtures) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class MakesFolder:
    """A pickle that makes a folder when unpickled (standing in for any command)."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __reduce__(self):
        return os.makedirs, (self.folder,)


# Payloads for a crafted checkpoint's config: each would leave a marker in $W if it were built.
def writes_a_file(w: Path) -> dict:
    return {"_target_": "numpy.savetxt", "fname": str(w / "pwned.txt"), "X": [1.0]}


def unpickles(w: Path) -> dict:
    torch.save(MakesFolder(w / "pwned_dir"), w / "bomb.pkl")
    return {"_target_": "torch.load", "f": str(w / "bomb.pkl"), "weights_only": False}


def runs_a_command(w: Path) -> dict:
    return {"_target_": "os.system", "command": f"touch {w / 'pwned_sh'}"}


def absent(*names: str) -> Callable:
    def check(w: Path) -> str | None:
        found = [n for n in names if (w / n).exists()]
        return f"exists: {', '.join(found)}" if found else None
    return check


def present(*names: str) -> Callable:
    def check(w: Path) -> str | None:
        missing = [n for n in names if not (w / n).exists()]
        return f"missing: {', '.join(missing)}" if missing else None
    return check


def both(*checks: Callable) -> Callable:
    return lambda w: "; ".join(p for p in (c(w) for c in checks) if p) or None


def whole_checkpoint(w: Path) -> str | None:
    """The run's last.pt, written before the signal, still loads."""
    try:
        torch.load(w / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    except Exception as e:  # noqa: BLE001 -- any failure to read it back is the finding
        return f"last.pt does not load: {type(e).__name__}: {e}"[:200]
    return None


NO_RUN_DIR = absent("run", "outputs")  # a bad value is refused before Hydra makes the run directory
NO_CHECKPOINTS = absent("run/checkpoints")  # a checkpoint is read inside the job: its run directory exists by then
NOT_PWNED = absent("pwned.txt", "pwned_dir", "pwned_sh")


# ----------------------------------------------------------------------------------------------------- probes


def type_probe(override: str) -> Probe:
    """A bad value: one line, and no run directory made."""
    return Probe(f"value:{override.replace(' ', '+')}", ["train", *RUN, *override.split()], check=NO_RUN_DIR)


def checkpoint_probes() -> list[Probe]:
    """1. Crafted checkpoints: a stored trust flag and a `_target_` that writes, unpickles or runs a command."""
    eval_, resume = ["eval", "ckpt=$W/c.pt", "hydra.run.dir=ev"], ["train", "resume=$W/c.pt", "trainer.max_epochs=2",
                                                                  "hydra.run.dir=res"]
    probes = []
    for name, payload in (("savetxt", writes_a_file), ("unpickle", unpickles), ("os.system", runs_a_command)):
        evil = crafted(stored({"trust_checkpoint": True, "tasks.depth.loss": payload}))
        probes += [Probe(f"crafted:trust+{name}:eval", eval_, evil, check=NOT_PWNED),
                   Probe(f"crafted:trust+{name}:resume", resume, evil,
                         check=both(NOT_PWNED, absent("res/checkpoints")))]
    foreign = crafted(stored({"tasks.depth.loss": {"_target_": "torch.nn.SmoothL1Loss"}}))
    download = crafted(stored({"data.download": True, "data.root": lambda w: str(w / "downloads")}))
    return [
        *probes,
        Probe("crafted:trust+target-in-optimizer:resume", resume,
              crafted(stored({"trust_checkpoint": True, "optimizer": writes_a_file})),
              check=both(NOT_PWNED, absent("res/checkpoints"))),
        Probe("crafted:unnamed-target:eval", eval_, foreign, check=absent("ev/eval.json")),
        Probe("crafted:unnamed-target:resume", resume, foreign, check=absent("res/checkpoints")),
        # documented: a stored download switch is turned off; the eval runs and writes nothing where the config says
        Probe("crafted:download-true:eval", eval_, download, OK, both(present("ev/eval.json"), absent("downloads"))),
    ]


def value_probes() -> list[Probe]:
    """2. Types and ranges: one line before any run directory exists."""
    overrides = [
        "trainer.max_epochs=abc", "trainer.max_epochs=1.5", "trainer.max_epochs=0", "trainer.max_epochs=-1",
        "trainer.max_epochs=null", "optimizer.lr=abc", "optimizer.lr=-1", "optimizer.lr=0", "optimizer.lr=inf",
        "seed=abc", "seed=-1", "trainer.grad_clip=abc", "trainer.grad_clip=0", "trainer.grad_clip=nan",
        "scheduler=step scheduler.step_size=0", "trainer.limit_train_batches=0", "trainer.limit_val_batches=0",
        "trainer.max_steps=0", "data.dataset.scenes.train=0", "data.dataset.image_size=0", "data.batch_size=0",
        "data.batch_size=-1", "data.batch_size=abc", "data.batch_size=64", "data.num_workers=-1",
        "trainer.val_every=0", "logger.log_every=0", "trainer.precision=64", "trainer.precision=16",
        "trainer.device=cuda:7", "trainer.device=tpu", "trainer.progress=fancy", "optimizer.weight_decay=-1",
        "optimizer=sgd optimizer.momentum=abc", "trainer.monitor_mode=up", "trainer.monitor=val/nope/metric",
        "tasks=[]",
    ]
    return [type_probe(o) for o in overrides]


def label_probes() -> list[Probe]:
    """3. Labels and samples: a bad label or image anywhere is named by split, sample and file."""
    nyu, pets = copy_of("nyu", "nyu"), copy_of("pets", "pets")
    classes, masks = [*PETS, "tasks=[classification]"], [*PETS, "tasks=[segmentation]",
                                                         "data.targets.segmentation.num_classes=3"]
    return [
        Probe("labels:nyu-val-label-50", ["train", *NYU], then(nyu, set_pixel("nyu/val/label/1.npy", (3, 5), 50))),
        Probe("labels:nyu-train-label--7", ["train", *NYU], then(nyu, set_pixel("nyu/train/label/2.npy", (3, 5), -7))),
        Probe("labels:nyu-train-nan-image", ["train", *NYU],
              then(nyu, set_pixel("nyu/train/image/1.npy", (0, 0, 1), np.nan))),
        Probe("labels:nyu-val-inf-image", ["train", *NYU],
              then(nyu, set_pixel("nyu/val/image/0.npy", (2, 2, 0), np.inf))),
        Probe("labels:nyu-label-other-size", ["train", *NYU],
              then(nyu, write("nyu/train/label/0.npy", npy_bytes(np.zeros((12, 16)))))),
        Probe("labels:nyu-truncated-npy", ["train", *NYU], then(nyu, truncate("nyu/train/depth/3.npy", 90))),
        Probe("labels:nyu-missing-file", ["train", *NYU], then(nyu, remove("nyu/val/depth/0.npy"))),
        Probe("labels:nyu-missing-root", ["train", *NYU]),
        Probe("labels:folder-val-unknown-class", ["train", *classes],
              then(pets, edit_text("pets/val.csv", "images/0005.png,dog", "images/0005.png,fox"))),
        Probe("labels:folder-val-mask-class-9", ["train", *masks],
              then(pets, set_pixel("pets/masks/0004.png", (2, 3), 9))),
        Probe("labels:folder-missing-image", ["train", *classes], then(pets, remove("pets/images/0001.png"))),
        Probe("labels:folder-image-not-an-image", ["train", *classes],
              then(pets, write("pets/images/0002.png", "not a png\n"))),
        Probe("labels:folder-missing-column", ["train", *classes, "data.targets.classification.column=breed"], pets),
        Probe("labels:folder-no-manifest", ["train", *classes], then(pets, remove("pets/train.csv"))),
    ]


def resource_probes() -> list[Probe]:
    """4. Resources: output folders that cannot be made, a live run's folder, a folder holding checkpoints."""
    a_file = write("a_file", "x\n")
    return [
        Probe("dir:run-dir-under-a-file", ["train", *TINY, "hydra.run.dir=$W/a_file/run"], a_file),
        Probe("dir:run-dir-in-/proc", ["train", *TINY, "hydra.run.dir=/proc/x"]),
        Probe("dir:sweep-dir-under-a-file", ["train", "-m", "seed=0", *TINY, "hydra.sweep.dir=$W/a_file/sweep"],
              a_file),
        Probe("dir:live-run-dir:train", ["train", *RUN], hold_lock("run"), check=absent("run/.hydra")),
        Probe("dir:live-run-dir:eval", ["eval", "ckpt=$REF/checkpoints/best.pt", "hydra.run.dir=run"],
              hold_lock("run"), check=absent("run/.hydra", "run/eval.json")),
        Probe("dir:fresh-run-into-saved-checkpoints", ["train", *TINY, "hydra.run.dir=saved"], copy_of("ref", "saved")),
    ]


BAD_SYNTAX = "_target_: mtl_cli.models.backbones.small_cnn\nwidths: [8, 16\nout_indices: [0, 1]\n"
TABBED = "_target_: mtl_cli.models.backbones.small_cnn\nwidths:\n\t- 8\n"
NOT_YAML = "data: {name: [x\nseed: 0\n"


def elsewhere_probes() -> list[Probe]:
    """5. Config folders and checkpoints from elsewhere."""
    mine = ["train", "-cd", "$W/my", "backbone=my", *RUN]
    eval_c, resume_c = ["eval", "ckpt=$W/c.pt"], ["train", "resume=$W/c.pt", *RUN]
    return [
        Probe("cd:missing-folder:train", ["train", "-cd", "$W/nope", *RUN]),
        Probe("cd:missing-folder:eval", ["eval", "-cd", "$W/nope", "ckpt=$REF/checkpoints/best.pt"]),
        Probe("cd:a-file", ["train", "-cd", "$W/a_file", *RUN], write("a_file", "x\n")),
        Probe("cd:broken-yaml-used", mine, write("my/backbone/my.yaml", BAD_SYNTAX)),
        Probe("cd:tab-indented-yaml-used", mine, write("my/backbone/my.yaml", TABBED)),
        Probe("cd:binary-yaml-used", mine, write("my/backbone/my.yaml", bytes(range(256)) * 4)),
        Probe("cd:list-yaml-used", mine, write("my/backbone/my.yaml", "- 8\n- 16\n")),
        Probe("cd:eval-unrelated-broken-yaml", ["eval", "-cd", "$W/my", "ckpt=$REF/checkpoints/best.pt",
                                                "hydra.run.dir=ev"],
              then(write("my/backbone/bad.yaml", BAD_SYNTAX), write("my/backbone/tab.yaml", TABBED)),
              OK, present("ev/eval.json")),
        Probe("ckpt:config-not-yaml:eval", eval_c, crafted(put("config", NOT_YAML))),
        Probe("ckpt:config-not-yaml:resume", resume_c, crafted(put("config", NOT_YAML)), check=NO_CHECKPOINTS),
        Probe("ckpt:config-empty:eval", eval_c, crafted(put("config", ""))),
        Probe("ckpt:config-bad-value:eval", eval_c, crafted(stored({"data.batch_size": 0}))),
        Probe("ckpt:no-optimizer:resume", resume_c, crafted(drop("optimizer")), check=NO_CHECKPOINTS),
        Probe("ckpt:epoch-is-text:eval", eval_c, crafted(put("epoch", "3"))),
        Probe("ckpt:no-format:eval", eval_c, crafted(drop("format"))),
        Probe("ckpt:weights-wrong-shape:eval", eval_c, crafted(shrink_first_weight)),
        Probe("ckpt:other-architecture:eval", ["eval", "ckpt=$REF/checkpoints/best.pt", "backbone=resnet18"]),
        Probe("ckpt:other-project-dict:eval", eval_c,
              saved_with_torch("c.pt", {"state_dict": {"w": torch.zeros(2)}, "epoch": 3})),
        Probe("ckpt:format-only:eval", eval_c, saved_with_torch("c.pt", {"format": FORMAT})),
        Probe("ckpt:a-tensor:eval", eval_c, saved_with_torch("c.pt", torch.zeros(3))),
        Probe("ckpt:empty-file:eval", eval_c, write("c.pt", b"")),
        Probe("ckpt:text-file:eval", eval_c, write("c.pt", "epoch: 3\nmodel: resnet\n")),
        Probe("ckpt:truncated:eval", eval_c, write("c.pt", half_of_best)),
        Probe("ckpt:missing:eval", ["eval", "ckpt=$W/nope.pt"]),
        Probe("ckpt:missing:resume", ["train", "resume=$W/nope.pt", *RUN], check=NO_CHECKPOINTS),
        Probe("ckpt:not-given:eval", ["eval"]),
        Probe("ckpt:empty-value:eval", ["eval", "ckpt="]),
        Probe("ckpt:/dev/null:eval", ["eval", "ckpt=/dev/null"]),
        Probe("ckpt:a-folder:eval", ["eval", "ckpt=$W/empty"], make_folder("empty")),
        Probe("ckpt:run-dir:eval", ["eval", "ckpt=$REF"]),
        Probe("ckpt:run-dir:resume", ["train", "resume=$REF", *RUN], check=NO_CHECKPOINTS),
    ]


def sweep_probes() -> list[Probe]:
    """6. Sweeps: a failed job is named at the end and the others still run."""
    def failed(job: str) -> Expect:
        return Expect(2, (r"mtl train: error: .+", r"mtl train: 1 of 2 jobs failed:",
                          rf"  job {job} .+: user error: .+"))
    no_batch_size = [o for o in TINY if not o.startswith("data.batch_size=")]
    return [
        Probe("sweep:seed=abc,0", ["train", "-m", "seed=abc,0", *TINY, "hydra.sweep.dir=sweep"], expect=failed("0"),
              check=both(present("sweep/1/metrics.json", "sweep/0/failed.json"), absent("sweep/0/metrics.json"))),
        Probe("sweep:batch_size=8,0", ["train", "-m", "data.batch_size=8,0", *no_batch_size, "hydra.sweep.dir=sweep"],
              expect=failed("1"), check=present("sweep/0/metrics.json", "sweep/1/failed.json")),
        Probe("sweep:backbone=small_cnn,resnet81", ["train", "-m", "backbone=small_cnn,resnet81", *TINY,
                                                    "hydra.sweep.dir=sweep"]),
    ]


def message_probes() -> list[Probe]:
    """7. Messages: misleading inputs, typos, signals."""
    spaced = copy_of("ref", "my dir")
    resnet = ["train", "backbone=resnet18", *RUN]
    interrupted = r"mtl train: interrupted; the last checkpoint is .+: continue with mtl train resume=.+"
    return [
        Probe("msg:space-in-ckpt-path:eval", ["eval", "ckpt=$W/my", "dir/checkpoints/best.pt"], spaced),
        Probe("msg:space-in-ckpt-path:resume", ["train", "resume=$W/my", "dir/checkpoints/last.pt"], spaced,
              check=NO_RUN_DIR),
        Probe("msg:binary-manifest", ["train", *PETS, "tasks=[classification]"],
              then(copy_of("pets", "pets"), write("pets/train.csv", png_bytes))),
        Probe("msg:garbage-weights", [*resnet, "backbone.weights=$W/junk.pth"],
              write("junk.pth", np.random.default_rng(0).bytes(3000))),
        Probe("msg:code-running-weights", [*resnet, "backbone.weights=$W/bomb.pth"],
              saved_with_torch("bomb.pth", lambda w: {"conv1.weight": MakesFolder(w / "pwned_dir")}),
              check=NOT_PWNED),
        Probe("msg:missing-weights", [*resnet, "backbone.weights=$W/none.pth"]),
        Probe("msg:unknown-weights-name", [*resnet, "backbone.weights=IMAGENET9K_V7"]),
        Probe("msg:unknown-command", ["trian", *RUN], expect=Expect(2, (r"mtl: error: unknown command 'trian'.+",))),
        Probe("msg:unknown-key", ["train", "trainer.max_epoch=1"]),
        Probe("msg:unknown-group", ["train", "optimiser=adam"]),
        Probe("msg:typo-group-option", ["train", "backbone=resnet81"]),
        Probe("msg:typo-task", ["train", "tasks=[segmentation,detph]"]),
        Probe("msg:override-without-equals", ["train", "seed"]),
        Probe("msg:unclosed-list", ["train", "tasks=[segmentation,"]),
        Probe("msg:add-existing-key", ["train", "+seed=1"]),
        Probe("msg:folder-without-root", ["train", "data=folder", "tasks=[classification]"]),
        Probe("msg:unknown-flag", ["train", "--nonsense"]),
        Probe("msg:cfg-bad-choice", ["train", "--cfg", "nope"]),
        Probe("signal:SIGINT", ["train", *LONG_RUN], signal=signal.SIGINT, expect=Expect(130, (interrupted,)),
              check=whole_checkpoint),
        # not documented: each signal's default action (no message), the checkpoint saved before it whole
        Probe("signal:SIGTERM", ["train", *LONG_RUN], signal=signal.SIGTERM, expect=Expect(-signal.SIGTERM, ()),
              check=whole_checkpoint),
        Probe("signal:SIGKILL", ["train", *LONG_RUN], signal=signal.SIGKILL, expect=Expect(-signal.SIGKILL, ()),
              check=whole_checkpoint),
    ]


# ----------------------------------------------------------------------------------------------------- runner


def run_in_process(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """cli.main(argv) in `cwd`, as a fresh process would see it: logging unconfigured, warnings not yet shown."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    out, err, old_cwd, old_argv = io.StringIO(), io.StringIO(), os.getcwd(), list(sys.argv)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = mtl_main(argv)
            except SystemExit as e:  # Hydra's own exits, and a user error raised inside a job
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 -- escaped main: Python would print it and exit 1
                traceback.print_exc()
                status = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return status, out.getvalue(), err.getvalue()


def run_with_signal(argv: list[str], cwd: Path, sig: int) -> tuple[int, str, str]:
    """The console script, sent `sig` once its first last.pt exists."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        process = subprocess.Popen([MTL, *argv], cwd=cwd, stdout=o, stderr=e,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        last, deadline = cwd / "run" / "checkpoints" / "last.pt", time.time() + 300
        while not last.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
        process.send_signal(sig)
        try:
            status = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
    return status, out.read_text(), err.read_text()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file a run saved (the lock file is rewritten by each run that takes it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".mtl.lock"}


@dataclass
class Row:
    probe: Probe
    command: str
    status: int
    out: str
    err: str
    lost: list[str]
    problem: str | None

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip("\n").splitlines() if self.err.strip() else []

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.out + self.err

    def verdict(self) -> tuple[str, str]:
        expect = self.probe.expect
        if self.traceback:
            return "traceback", ""
        if self.status == 0 and expect.status != 0:
            return "silent", "exit 0"
        wanted = expect.stderr if expect.stderr is not None else (
            rf"mtl {re.escape(self.probe.argv[0])}: error: \S.*",)
        notes = []
        if self.status != expect.status:
            notes.append(f"exit {self.status}, expected {expect.status}")
        if len(self.err_lines) != len(wanted) or not all(re.fullmatch(p, line) for p, line in
                                                         zip(wanted, self.err_lines)):
            notes.append(f"stderr is not {len(wanted)} line(s) of the documented form")
        if self.lost:
            notes.append(f"changed or lost: {', '.join(self.lost)}")
        if self.problem:
            notes.append(self.problem)
        return ("other" if notes else "clear"), "; ".join(notes)


def run_probe(probe: Probe, fx: Fixtures, root: Path) -> Row:
    w = Path(tempfile.mkdtemp(prefix="p_", dir=root))
    undo = probe.setup(w, fx) if probe.setup else None
    guarded = [fx.ref] + ([w / "saved"] if (w / "saved").exists() else [])
    before = {g: checksums(g) for g in guarded}
    argv = [a.replace("$W", str(w)).replace("$REF", str(fx.ref)) for a in probe.argv]
    try:
        if probe.signal is None:
            status, out, err = run_in_process(argv, w)
        else:
            status, out, err = run_with_signal(argv, w, probe.signal)
    finally:
        if callable(undo):
            undo()
    after = {g: checksums(g) for g in guarded}
    lost = [f"{g.name}/{f}" for g in guarded for f, digest in before[g].items() if after[g].get(f) != digest]
    if lost and fx.ref.name in {s.split("/")[0] for s in lost}:  # later probes need the reference run as it was
        shutil.rmtree(fx.ref)
        shutil.copytree(root / "ref_pristine", fx.ref)
    problem = probe.check(w) if probe.check else None
    return Row(probe, shown(probe.argv), status, out, err, lost, problem)


SHORT = {"<long>": LONG_RUN, "<nyu>": NYU, "<pets>": PETS, "<tiny>": TINY}  # shown in place of these arguments


def shown(argv: list[str]) -> str:
    text = "mtl " + " ".join(a if " " not in a else repr(a) for a in argv)
    for name, arguments in SHORT.items():
        text = text.replace(" ".join(arguments), name)
    return text


def shown_error(row: Row) -> list[str]:
    """The stderr of a row (up to 25 lines); of a traceback, its last frame in mtl_cli and the error it ends with."""
    if not row.traceback:
        return row.err_lines[-25:] or ["(stderr empty)"]
    text = row.err if "Traceback" in row.err else row.out
    lines = text.strip().splitlines()
    ours = [i for i, line in enumerate(lines) if "/mtl_cli/" in line and line.lstrip().startswith("File ")]
    frame = lines[ours[-1]:ours[-1] + 2] if ours else []
    return [f"({len(lines)} lines)", *frame, "...", *lines[-2:]]


ALL = [*checkpoint_probes(), *value_probes(), *label_probes(), *resource_probes(), *elsewhere_probes(),
       *sweep_probes(), *message_probes()]
HEADER = f"{'id':<44} {'exit':>4} {'err':>3} {'tb':<3} {'lost':<4} {'verdict':<9} command"


def main() -> int:
    verbose, parts = "-v" in sys.argv[1:], [a for a in sys.argv[1:] if a != "-v"]
    chosen = [p for p in ALL if not parts or any(part in p.id for part in parts)]
    assert len({p.id for p in ALL}) == len(ALL), "probe ids must be unique"
    os.environ.pop("MTL_TRUST_CHECKPOINT", None)
    torch.set_num_threads(1)  # tiny convolutions: more threads only contend
    with tempfile.TemporaryDirectory(prefix="mtl_probe_") as tmp:
        root = Path(tmp)
        print(f"making the fixtures in {root} ...", flush=True)
        fx = make_fixtures(root)
        shutil.copytree(fx.ref, root / "ref_pristine")
        print("\n".join(f"{name} = {' '.join(arguments)}" for name, arguments in SHORT.items()), end="\n\n")
        print(HEADER, flush=True)
        rows = []
        for probe in chosen:
            row = run_probe(probe, fx, root)
            rows.append(row)
            verdict, _ = row.verdict()
            print(f"{probe.id:<44} {row.status:>4} {len(row.err_lines):>3} {'yes' if row.traceback else 'no':<3} "
                  f"{'yes' if row.lost else 'no':<4} {verdict:<9} {row.command}", flush=True)
            if verbose:
                print("\n".join(f"    {line}" for line in row.err_lines[-25:]), flush=True)
    counts = Counter(row.verdict()[0] for row in rows)
    print(f"\n{counts['clear']} of {len(rows)} inputs give one clear line (or their documented outcome); "
          + ", ".join(f"{kind}: {counts[kind]}" for kind in ("clear", "traceback", "silent", "other")))
    unclear = [row for row in rows if row.verdict()[0] != "clear"]
    if unclear:
        print("\nNot clear:")
    for row in unclear:
        verdict, note = row.verdict()
        print(f"\n* {row.probe.id}: {verdict}{f' ({note})' if note else ''}\n  {row.command}")
        print("\n".join(f"    {line}" for line in shown_error(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
