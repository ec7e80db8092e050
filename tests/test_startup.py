"""The commands that only compose or print a config start without torch, and tab completion knows the subcommands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[1] / "configs"
BIN = str(Path(sys.executable).parent)  # where the console script `mtl` is
HEAVY = ("torch", "torchvision", "torchmetrics", "tensorboard")
# Runs cli.main on its arguments, then names the heavy modules that were imported on the way, on stderr.
PROBE = f"""
import sys
from mtl_cli.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m in ("mtl_cli.train", "mtl_cli.evaluate"))
print("imported:", *heavy, file=sys.stderr)
sys.exit(status)
"""


ALL_COMMANDS = ["affinity", "completion", "eval", "explain", "export", "predict", "report", "train"]


def options(group: str, prefix: str = "") -> list[str]:
    return sorted(f"{group}={p.stem}" for p in (CONFIGS / group).glob(f"{prefix}*.yaml"))


@pytest.mark.parametrize(("argv", "comp_line", "shown"), [
    (["--help"], None, "commands:"),
    (["train", "--help"], None, "== Config groups (group=option) =="),
    (["train", "--cfg", "job"], None, "weighting:"),
    (["eval", "--help"], None, "== Config groups (group=option) =="),
    (["-sc", "query=bash"], "mtl train backbone=res", "backbone=resnet18"),
    (["completion", "bash"], None, "complete -o nospace -o default -F hydra_bash_completion mtl"),
])
def test_composing_or_printing_a_config_imports_no_torch(tmp_path, argv, comp_line, shown):
    env = {**os.environ, **({"COMP_LINE": comp_line} if comp_line else {})}
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert shown in result.stdout
    assert result.stderr.splitlines()[-1] == "imported:"
    assert not (tmp_path / "outputs").exists()


def test_the_modules_cli_imports_are_light(tmp_path):
    modules = "mtl_cli.cli, mtl_cli.errors, mtl_cli.guard, mtl_cli.schema, mtl_cli.overrides, mtl_cli.paths"
    code = f"import sys, {modules}; print(*sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def query(mtl_main, monkeypatch, line: str, shell: str = "bash") -> list[str]:
    """The candidates that `mtl -sc query=SHELL` (what the installed scripts run) gives for the command line."""
    monkeypatch.setenv("COMP_LINE", line)
    r = mtl_main("-sc", f"query={shell}")
    assert r.status == 0 and r.err == "", r
    return sorted(r.out.splitlines() if shell == "fish" else r.out.split())


def test_completion_offers_the_commands_then_each_commands_groups_and_options(mtl_main, monkeypatch):
    assert query(mtl_main, monkeypatch, "mtl ") == ALL_COMMANDS
    assert query(mtl_main, monkeypatch, "mtl tr") == ["train"]
    assert query(mtl_main, monkeypatch, "mtl completion ") == ["bash", "fish", "zsh"]
    assert "backbone=" in query(mtl_main, monkeypatch, "mtl train back")
    assert query(mtl_main, monkeypatch, "mtl train backbone=res") == options("backbone", "res")
    assert query(mtl_main, monkeypatch, "mtl eval weighting=u") == options("weighting", "u")
    assert query(mtl_main, monkeypatch, "mtl train weighting=u", "fish") == options("weighting", "u")
    assert query(mtl_main, monkeypatch, "mtl train seed=0 optimizer.l") == ["optimizer.lr="]
    assert query(mtl_main, monkeypatch, "mtl nonsense back") == []


def test_hydras_own_install_flag_installs_the_same_script_for_the_program_mtl(mtl_main):
    script = mtl_main("completion", "bash").out
    assert script.rstrip().endswith("-F hydra_bash_completion mtl")  # not `... mtl train`, as Hydra alone would
    for command in ("train", "eval"):
        assert mtl_main(command, "-sc", "install=bash").out == script
    assert mtl_main("completion", "zsh").out.endswith(script) and "bashcompinit" in mtl_main("completion", "zsh").out


@pytest.mark.parametrize("argv", [["completion", "tcsh"], ["completion"], ["train", "-sc"], ["-sc", "query=csh"]])
def test_a_bad_completion_request_is_one_line(mtl_main, argv):
    r = mtl_main(*argv)
    assert r.status == 2 and r.out == "" and len(r.err.splitlines()) == 1 and "bash, zsh, fish" in r.err, r


BASH_TAB = r"""
eval "$(mtl completion bash)"
tab() {  # what bash does on TAB at the end of the line $1: the words, the cursor, then the registered function
    COMP_LINE="$1"; COMP_POINT=${#1}; read -ra COMP_WORDS <<< "$1"; [[ "$1" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
    $(complete -p mtl | sed 's/.*-F \([^ ]*\) .*/\1/')
    printf '%s\n' "${COMPREPLY[*]}"
}
tab "mtl "; tab "mtl train backbone=res"; tab "mtl eval weighting=u"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tab_in_bash_completes_through_the_installed_script(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", BASH_TAB], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [sorted(line.split()) for line in result.stdout.splitlines()]
    assert lines == [ALL_COMMANDS, options("backbone", "res"), options("weighting", "u")]


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs fish")
def test_tab_in_fish_completes_through_the_installed_script(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    code = 'mtl completion fish | source; complete -C "mtl "; complete -C "mtl train backbone=res"'
    result = subprocess.run(["fish", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted([*ALL_COMMANDS, *options("backbone", "res")])
