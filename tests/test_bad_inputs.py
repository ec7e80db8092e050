"""Bad inputs end with one line, `mtl <command>: error: ...`, and exit status 2: config folders from elsewhere
(-cd), malformed checkpoints, and inputs whose error used to mislead (a path with a space, a folder given as a
checkpoint, a garbage weights file, a binary manifest). Every command runs in-process through cli.main."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

BROKEN_YAML = {  # name -> (text, the line yaml reports)
    "bad-syntax": ("_target_: mtl_cli.models.backbones.small_cnn\nwidths: [8, 16\nout_indices: [0, 1]\n", 3),
    "tab-indented": ("_target_: mtl_cli.models.backbones.small_cnn\nwidths:\n\t- 8\n", 3),
}


def one_error(ran, command: str) -> str:
    """The single line a user error prints, after checking that it is the only thing on stderr."""
    assert ran.status == 2, ran
    assert "Traceback" not in ran.out + ran.err
    lines = ran.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mtl {command}: error: "), ran.err
    return lines[0]


# ---------------------------------------------------------------------------------------- config folders (-cd)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_missing_config_folder_is_named(mtl_main, tmp_path, command):
    folder = tmp_path / "my_configs"
    line = one_error(mtl_main(command, "-cd", str(folder), "ckpt=best.pt" if command == "eval" else "seed=0"), command)
    assert f"-cd {folder}: no such folder" in line


@pytest.mark.parametrize("name", list(BROKEN_YAML))
def test_a_broken_yaml_the_run_uses_is_named_with_its_line(mtl_main, tmp_path, name):
    text, line_number = BROKEN_YAML[name]
    mine = tmp_path / "my_configs" / "backbone" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text(text)
    line = one_error(mtl_main("train", "-cd", str(mine.parents[1]), "backbone=mine", *TINY_RUN), "train")
    assert f"{mine} line {line_number} is not valid YAML" in line
    assert ("spaces, not tabs" in line) == (name == "tab-indented")


def test_eval_reads_only_what_it_uses_of_a_config_folder(mtl_main, tmp_path, tiny_run):
    folder = tmp_path / "my_configs"
    for name, (text, _) in BROKEN_YAML.items():
        (folder / "backbone").mkdir(parents=True, exist_ok=True)
        (folder / "backbone" / f"{name}.yaml").write_text(text)
    ran = mtl_main("eval", "-cd", str(folder), f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", "hydra.run.dir=ev")
    assert ran.status == 0, ran
    assert "Traceback" not in ran.out + ran.err
    assert (tmp_path / "ev" / "eval.json").is_file()


# ----------------------------------------------------------------------------------------- malformed checkpoints


def edited_checkpoint(tiny_run, folder, change) -> str:
    """The tiny run's last.pt, loaded, edited by `change` (state -> None) and saved as folder/edited.pt."""
    state = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    change(state)
    path = folder / "edited.pt"
    torch.save(state, path)
    return str(path)


def drop(key):
    return lambda state: state.pop(key)


def put(key, value):
    return lambda state: state.update({key: value})


COMMANDS = {"eval": ("eval", "ckpt"), "resume": ("train", "resume")}
MALFORMED = [  # (purpose, the edit, what the message must say)
    *[("eval", drop(key), [f"lacks {key} (", "mtl eval needs"]) for key in ("model", "config", "epoch", "step")],
    *[("resume", drop(key), [f"lacks {key} (", "a resume needs"])
      for key in ("optimizer", "scheduler", "scaler", "rng", "weighting", "model", "epoch", "step")],
    *[(purpose, put("config", "data: {name: [digit_scenes\nseed: 0\n"), ["its config is not YAML (line 2"])
      for purpose in COMMANDS],
    *[(purpose, put("config", "- data\n- seed\n"), ["its config is not a mapping", "it is a list"])
      for purpose in COMMANDS],
    ("eval", put("epoch", "3"), ["its epoch (the count of epochs done) is of type str, expected int"]),
    ("resume", put("rng", {"python": [3]}), ["random generator states are malformed", "resume from another"]),
    *[(purpose, drop("format"), ["was not written by mtl train"]) for purpose in COMMANDS],
]
IDS = [f"{purpose}-{words[0].split(' (')[0].replace(' ', '-')}" for purpose, _, words in MALFORMED]


@pytest.mark.parametrize("purpose,change,words", MALFORMED, ids=IDS)
def test_a_malformed_checkpoint_is_named_with_what_is_wrong(mtl_main, tmp_path, tiny_run, purpose, change, words):
    path = edited_checkpoint(tiny_run, tmp_path, change)
    command, key = COMMANDS[purpose]
    line = one_error(mtl_main(command, f"{key}={path}", *TINY_RUN, "hydra.run.dir=run"), command)
    assert path in line
    for word in words:
        assert word in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------- messages that misled


@pytest.mark.parametrize("command,words", [("eval", ["ckpt=/tmp/my", "dir/best.pt"]),
                                           ("train", ["data.root=/data/my", "big", "scenes"])])
def test_a_value_split_at_its_space_is_shown_quoted(mtl_main, command, words):
    line = one_error(mtl_main(command, *words), command)
    key, value = words[0].split("=")
    assert f"{words[1]!r} is not an override" in line
    assert f"the value of {key} seems to contain a space" in line
    assert f"""'{key}="{' '.join([value, *words[1:]])}"'""" in line


@pytest.mark.parametrize("command,key,given,meant", [
    ("eval", "ckpt", "", "checkpoints/best.pt"),                   # the run dir
    ("train", "resume", "", "checkpoints/last.pt"),                # resuming goes on from the last epoch
    ("eval", "ckpt", "checkpoints", "checkpoints/best.pt"),
])
def test_a_directory_given_as_a_checkpoint_lists_its_checkpoints(mtl_main, tiny_run, command, key, given, meant):
    folder = tiny_run / given if given else tiny_run
    line = one_error(mtl_main(command, f"{key}={folder}"), command)
    assert f"{key}={str(folder)!r} is a directory" in line
    assert f"Did you mean {str(tiny_run / meant)!r}?" in line
    listed = line.split("The .pt files in it: ")[1].split(", ")
    assert sorted(listed) == sorted(str((tiny_run / "checkpoints" / f).relative_to(folder))
                                    for f in ("best.pt", "last.pt"))


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("content", ["random-bytes", "code-running-pickle"])
def test_a_garbage_backbone_weights_file_is_named_without_weights_only_advice(mtl_main, tmp_path, content):
    path, marker = tmp_path / "junk.pth", tmp_path / "ran"
    if content == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        torch.save({"conv1.weight": _Payload(f"touch {marker}")}, path)
    ran = mtl_main("train", "backbone=resnet18", f"backbone.weights={path}", *TINY_RUN, "hydra.run.dir=run")
    line = one_error(ran, "train")
    assert f"backbone.weights={str(path)!r} is not a readable PyTorch state dict (UnpicklingError: " in line
    assert "weights_only" not in ran.err and not marker.exists()


def test_a_cached_torchvision_weights_file_is_read_with_weights_only(mtl_main, tmp_path, monkeypatch):
    """A file in torch's hub cache is loaded by torchvision, not by us: it too must not be able to run code."""
    from torchvision.models import ResNet18_Weights

    hub, marker = tmp_path / "hub", tmp_path / "ran"
    cached = hub / "checkpoints" / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": _Payload(f"touch {marker}")}, cached)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    line = one_error(mtl_main("train", "backbone=resnet18", "backbone.weights=DEFAULT", *TINY_RUN), "train")
    assert f"the cached weights file {cached} is not a readable PyTorch state dict" in line
    assert "delete it" in line and not marker.exists()


@pytest.mark.parametrize("manifest", ["train.csv", "train.jsonl"])
def test_a_binary_file_given_as_a_manifest_is_named(mtl_main, tmp_path, manifest):
    root = tmp_path / "pets"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / manifest, format="PNG")
    ran = mtl_main("train", "data=folder", f"data.root={root}", "tasks=[classification]",
                   "data.targets.classification.column=label", "trainer.max_epochs=1")
    line = one_error(ran, "train")
    assert f"manifest {root / manifest} holds binary data: it is not a text CSV/TSV/JSONL manifest" in line


# ------------------------------------------------------------------------------- found by scripts/probe_inputs.py


def test_a_config_file_that_is_not_text_is_named(mtl_main, tmp_path):
    mine = tmp_path / "my_configs" / "backbone" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"_target_: x\n" + bytes(range(128, 256)))
    line = one_error(mtl_main("train", "-cd", str(mine.parents[1]), "backbone=mine", *TINY_RUN), "train")
    assert f"{mine} is not a YAML text file" in line


def test_a_component_config_that_is_not_a_mapping_is_named(mtl_main, tmp_path):
    mine = tmp_path / "my_configs" / "backbone" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("- 8\n- 16\n")
    line = one_error(mtl_main("train", "-cd", str(mine.parents[1]), "backbone=mine", *TINY_RUN,
                              "hydra.run.dir=run"), "train")
    assert "the config of backbone is a list" in line and "_target_" in line


@pytest.mark.parametrize("args,words", [
    (["--nonsense"], "unrecognized arguments: --nonsense"),
    (["--cfg", "nope"], "argument --cfg/-c: invalid choice: 'nope'"),
])
def test_a_bad_flag_is_one_line_not_hydras_usage(mtl_main, args, words):
    assert words in one_error(mtl_main("train", *args), "train")


@pytest.mark.parametrize("args,words", [
    (["trainer.device=tpu"], "trainer.device='tpu' is not a device"),
    (["trainer.device=cuda:7"], "no CUDA GPU is available here"),
    (["trainer.precision=16"], "needs a CUDA GPU"),
    (["tasks=[]"], "no task selected"),
])
def test_a_machine_or_task_choice_that_cannot_run_is_refused_before_any_run_dir(mtl_main, tmp_path, args, words):
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert words in one_error(mtl_main("train", *TINY_RUN, *args, "hydra.run.dir=run"), "train")
    assert not (tmp_path / "run").exists()
