"""Checkpoints (mtl_cli/engine/checkpoint.py) and the replay of command-line overrides onto a saved config
(mtl_cli/overrides.py).

save_checkpoint writes a temp file in the same folder, fsyncs it and renames it over the path, so a crash never
leaves a half-written checkpoint; load_checkpoint reads with weights_only=True, so a file from elsewhere cannot
run code, and every unusable file ends in one UserError.
"""

import io
import os
import pickle
import random

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtl_cli.engine import checkpoint as checkpoint_module
from mtl_cli.engine.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mtl_cli.errors import UserError
from mtl_cli.overrides import apply_overrides
from mtl_cli.paths import config_dir

CONFIG_TEXT = "data:\n  name: digit_scenes\n  batch_size: 32\ntasks:\n  depth:\n    target: depth\n"


def _state():
    generator = torch.Generator().manual_seed(3)
    return {
        "config": CONFIG_TEXT,
        "model": {"layer.weight": torch.randn(4, 3, generator=generator),
                  "layer.bias": torch.arange(4, dtype=torch.float64),
                  "bn.num_batches_tracked": torch.tensor(7)},
        "epoch": 5, "step": 1234, "best": 0.125, "best_results": None,
        "results": {"loss": {"depth": 0.5, "total": 0.5}, "metrics": {"depth": {"abs_rel": 0.1}}, "epoch": 5},
        "rng": rng_state(),
    }


def _leftovers(folder):
    """Anything in `folder` but the checkpoints themselves (temp files of an interrupted write)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".pt") or p.name.startswith("."))


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_of_tensors_config_text_and_rng_state(tmp_path):
    state = _state()
    path = tmp_path / "run" / "checkpoints" / "last.pt"  # the folders do not exist yet
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT == "mtl-checkpoint/1"
    assert set(loaded) == set(state) | {"format"}
    _assert_same({k: v for k, v in loaded.items() if k != "format"}, state)
    assert OmegaConf.create(loaded["config"]).tasks.depth.target == "depth"
    assert _leftovers(path.parent) == []
    assert load_checkpoint(str(path))["step"] == 1234  # a str path works too


def test_round_trip_of_the_real_training_state(tmp_path):
    """What the training state saves (model, weighting, optimizer, scheduler, scaler, counters) passes
    torch.load(weights_only=True) and restores into a freshly built state."""
    from mtl_cli.engine.state import build_state

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["tasks=[depth,classification]", "weighting=dwa", "optimizer=adamw",
                                          "scheduler=cosine", "backbone.widths=[4,8,8,8]"])

    def fresh():
        torch.manual_seed(0)
        return build_state(cfg, torch.device("cpu"))

    state = fresh()
    out = state.model(torch.rand(2, 3, 32, 32))
    losses = {"depth": out["depth"].abs().mean(), "classification": out["classification"].square().mean()}
    state.weighting.backward(losses, state.model, state.scaler)
    state.optimizer.step()
    state.scheduler.step()
    state.weighting.epoch_end()
    state.epoch, state.step, state.batch, state.best = 1, 1, 3, 0.5
    state.save(tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt", "resume")

    again = fresh()
    again.restore(loaded)
    _assert_same(again.model.state_dict(), state.model.state_dict())
    _assert_same(again.weighting.state_dict(), state.weighting.state_dict())
    _assert_same(again.optimizer.state_dict()["state"], state.optimizer.state_dict()["state"])
    assert again.scheduler.state_dict() == state.scheduler.state_dict()
    assert (again.epoch, again.step, again.batch, again.best) == (1, 1, 3, 0.5)
    assert OmegaConf.create(loaded["config"]).weighting._target_.endswith("DynamicWeightAverage")


def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


@pytest.mark.parametrize("through_file", [False, True])
def test_set_rng_state_reproduces_the_next_random_numbers(tmp_path, through_file):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    # leave a cached gaussian in python's and numpy's generators: it is part of their state
    random.gauss(0, 1)
    np.random.standard_normal()
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1
    first = _draw()
    assert _draw() != first  # the generators move on
    if through_file:
        save_checkpoint({"rng": state}, tmp_path / "rng.pt")
        state = load_checkpoint(tmp_path / "rng.pt")["rng"]
    set_rng_state(state)
    assert _draw() == first


# ------------------------------------------------------------------------------------------------------ atomicity


def test_save_overwrites_through_an_fsynced_temp_file_in_the_same_folder(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint({"epoch": 1}, path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint_module.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint_module.os, "replace",
                        lambda src, dst: (events.append(("replace", str(src), str(dst))), real_replace(src, dst))[1])
    save_checkpoint({"epoch": 2}, path)
    assert events[0] == "fsync" and events[2] == "fsync" and len(events) == 3  # the file, then its folder
    _, src, dst = events[1]
    assert dst == str(path) and os.path.dirname(src) == str(tmp_path) and src != dst
    assert load_checkpoint(path)["epoch"] == 2
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(), path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(UserError, match="the disk is full.*the previous file there is intact"):
        save_checkpoint({"epoch": 99}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 5
    assert _leftovers(tmp_path) == []

    # a first write that fails leaves nothing at all
    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(UserError, match="the disk is full.*nothing was written there"):
        save_checkpoint({"epoch": 1}, tmp_path / "new" / "best.pt")
    assert list((tmp_path / "new").iterdir()) == []


# ------------------------------------------------------------------------------------------------ unusable files


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_directory_lists_its_checkpoints(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoints" / "best.pt")
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="does not exist") as info:
        load_checkpoint(tmp_path / "checkpoints")
    assert "best.pt" in str(info.value) and "last.pt" in str(info.value)


def _unreadable_files():
    """Name -> bytes of files that are not checkpoints at all."""
    files = {f"random-{seed}": np.random.default_rng(seed).bytes(int(np.random.default_rng(seed).integers(1, 4096)))
             for seed in range(12)}
    valid = io.BytesIO()
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(256)}}, valid)
    files.update({
        "empty": b"",
        "text": b"hello: world\n",                     # a YAML file given by mistake
        "pickle-pop-on-empty-stack": b"0",               # pickle opcode POP with nothing to pop
        "pickle-memo-miss": b"h\x05.",                   # pickle opcode BINGET of a memo entry never stored
        "truncated-checkpoint": valid.getvalue()[: len(valid.getvalue()) // 2],
    })
    return files


@pytest.mark.parametrize("name,content", list(_unreadable_files().items()), ids=list(_unreadable_files()))
def test_unreadable_file_is_a_user_error(tmp_path, name, content):
    path = tmp_path / f"{name}.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable mtl checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("obj", [{"model": {"w": torch.zeros(2)}, "epoch": 1}, {"format": "other/1"},
                                 torch.zeros(3), [1, 2]], ids=["dict-without-marker", "other-format", "tensor", "list"])
def test_torch_file_without_the_format_marker(tmp_path, obj):
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match="was not written by mtl train"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "inside-a-checkpoint-dict"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = _Payload(f"echo pwned > {marker}")
    torch.save({"format": FORMAT, "model": payload} if wrap else payload, path)
    with pytest.raises(UserError, match="not a readable mtl checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler runs it
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.read_text().strip() == "pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"format": FORMAT, "epoch": 1}, protocol=4))
    with pytest.raises(UserError, match="not a readable mtl checkpoint"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------- overrides


def _compose(name, overrides, hydra=False):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


@pytest.fixture(scope="module")
def saved():
    """The config a checkpoint holds: a resolved training config, with values unlike the defaults."""
    trained = _compose("train", ["tasks=[segmentation,normals]", "data.batch_size=7", "trainer.grad_clip=1.5",
                                 "trainer.max_epochs=5", "optimizer=sgd", "data.split=val", "+ckpt=old.pt"])
    return OmegaConf.create(OmegaConf.to_yaml(trained, resolve=True))


OVERRIDES = ["data.split=test", "+extra.key=3", "~trainer.grad_clip", "tasks=[depth]", "ckpt=new.pt"]


def _replay(saved, overrides=OVERRIDES, extra_groups=()):
    # Hydra itself refuses `~trainer.grad_clip` against the packaged config (its default is null, which Hydra takes
    # for a missing key), so the composed config, a mere source of values, is made from the other overrides;
    # apply_overrides takes deletions from the override list alone.
    composed = _compose("eval", [o for o in overrides if not o.startswith("~")], hydra=True)
    # the groups as mtl passes them (hydra.runtime.choices: the multi-select `tasks` is not among them)
    groups = [*composed.hydra.runtime.choices, *extra_groups]
    assert "data" in groups and "optimizer" in groups
    return apply_overrides(saved, composed, overrides, groups=groups), composed


@pytest.mark.parametrize("extra_groups", [(), ("tasks",)], ids=["choices", "choices+tasks"])
def test_apply_overrides_replays_keys_groups_and_deletions(saved, extra_groups):
    before = OmegaConf.to_yaml(saved)
    cfg, composed = _replay(saved, extra_groups=extra_groups)
    assert OmegaConf.to_yaml(saved) == before  # the saved config itself is left alone

    assert cfg.data.split == "test"                                     # a key: the composed value
    assert cfg.data.batch_size == 7 and composed.data.batch_size == 32  # the rest of data: the saved values
    assert cfg.extra.key == 3                                           # an added key
    assert "grad_clip" not in cfg.trainer and saved.trainer.grad_clip == 1.5  # a deleted key
    assert cfg.trainer.max_epochs == 5
    assert list(cfg.tasks) == ["depth"]                                 # the group: replaced wholesale
    assert OmegaConf.to_container(cfg.tasks, resolve=True) == OmegaConf.to_container(composed.tasks, resolve=True)
    assert cfg.tasks.depth.target == "depth"
    assert cfg.optimizer._target_ == "torch.optim.SGD"                   # groups not on the command line: saved
    assert cfg.ckpt == "new.pt" and saved.ckpt == "old.pt"              # this command's own key, replayed
    assert "hydra" not in cfg


def test_apply_overrides_replaces_a_group_and_sets_a_key_to_null(saved):
    cfg, composed = _replay(saved, overrides=["optimizer=adam", "trainer.grad_clip=null", "data.batch_size=3"])
    assert OmegaConf.to_container(cfg.optimizer) == OmegaConf.to_container(composed.optimizer)
    assert cfg.optimizer._target_ == "torch.optim.Adam" and "momentum" not in cfg.optimizer  # not merged with sgd
    assert cfg.trainer.grad_clip is None and "grad_clip" in cfg.trainer
    assert cfg.data.batch_size == 3 and cfg.data.split == "val"
    assert list(cfg.tasks) == ["segmentation", "normals"]


def test_apply_overrides_ignores_hydra_keys_and_unknown_deletions(saved):
    composed = _compose("train", ["hydra.job.name=x"], hydra=True)
    cfg = apply_overrides(saved, composed, ["hydra.job.name=x", "~trainer.not_a_key", "~nothing.here"],
                          groups=composed.hydra.runtime.choices)
    assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(saved)


def test_config_from_checkpoint_replays_this_command_line(saved):
    """runtime.config_from_checkpoint: what mtl eval and resume= do with Hydra's record of the command line."""
    from hydra.core.hydra_config import HydraConfig

    from mtl_cli.runtime import config_from_checkpoint

    overrides = ["data.split=test", "tasks=[depth]", "ckpt=new.pt"]
    composed = _compose("eval", overrides, hydra=True)
    assert list(composed.hydra.overrides.task) == overrides
    HydraConfig.instance().set_config(composed)
    try:
        cfg = config_from_checkpoint({"config": OmegaConf.to_yaml(saved)}, composed)
    finally:
        HydraConfig.instance().cfg = None
    assert cfg.data.split == "test" and cfg.data.batch_size == 7
    assert list(cfg.tasks) == ["depth"]
    assert cfg.ckpt == "new.pt"  # this command's own key, from this command line
    assert cfg.trainer.grad_clip == 1.5
