"""Tab completion for `mtl` in bash, zsh and fish, built on Hydra's own.

Hydra's completion scripts call the program back as `mtl -sc query=<shell>` with the command line in $COMP_LINE,
and Hydra reads every word after the program as an override, so `mtl train back<TAB>` would take `train` for one.
Here the first word completes to a command, and the rest of the line goes to that command's Hydra app as if
`mtl train` were the program. Install: `eval "$(mtl completion bash)"` (zsh: the same with zsh),
`mtl completion fish | source`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterable

from mtl_cli.errors import UserError

SHELLS = ("bash", "zsh", "fish")
HYDRA_APPS = ("train", "eval", "predict", "export", "explain")  # the commands whose words Hydra completes
# Hydra's zsh completion is its bash script run through zsh's bash emulation, which needs compinit first.
ZSH_PREAMBLE = "autoload -Uz compinit bashcompinit\n(( $+functions[compdef] )) || compinit\nbashcompinit\n"


def shell_completion(args: Iterable[str], commands: Iterable[str]) -> None:
    """Hydra's `-sc install=SHELL | uninstall=SHELL | query=SHELL`, answered alike after any command."""
    given = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in ("install", "uninstall", "query"))
    if len(given) != 1 or next(iter(given.values())) not in SHELLS:
        raise UserError(f"--shell-completion takes one of install=SHELL, uninstall=SHELL or query=SHELL, with SHELL "
                        f"one of {', '.join(SHELLS)} (to install: eval \"$(mtl completion bash)\")")
    (action, shell), = given.items()
    if action == "install":
        print(script(shell), end="")
    elif action == "uninstall":
        hydra_app("train", f"uninstall={shell}")
    else:
        answer(shell, os.environ.get("COMP_LINE", ""), commands)


def script(shell: str) -> str:
    """`mtl completion SHELL`: the script that makes SHELL complete `mtl` (Hydra's, installed for the name mtl)."""
    if shell not in SHELLS:
        raise UserError(f"no completion for the shell {shell!r}; shells: {', '.join(SHELLS)}")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        hydra_app("train", f"install={'bash' if shell == 'zsh' else shell}")
    return (ZSH_PREAMBLE if shell == "zsh" else "") + text.getvalue()


def answer(shell: str, line: str, commands: Iterable[str]) -> None:
    """Prints the candidates for the last word of `line` (the whole `mtl ...` command line), as SHELL reads them."""
    args = line.lstrip().partition(" ")[2].lstrip()  # without the program's name
    command, space, rest = args.partition(" ")
    rest = rest.lstrip()
    if not space:  # still on the first word
        candidates = [c for c in commands if c.startswith(command)]
    elif command == "completion":
        candidates = [s for s in SHELLS if s.startswith(rest)]
    elif command in HYDRA_APPS:
        return hydra_app(command, f"query={shell}", line=f"mtl {rest}")
    else:
        candidates = []
    print(("\n" if shell == "fish" else " ").join(candidates))


def hydra_app(command: str, action: str, line: str | None = None) -> None:
    """Runs `mtl <command> -sc <action>` as Hydra would for a program named mtl, with $COMP_LINE set to `line`."""
    from mtl_cli import commands

    saved = sys.argv, os.environ.get("COMP_LINE")
    sys.argv = ["mtl", "-sc", action]  # Hydra's scripts name the program after argv[0]
    if line is not None:
        os.environ["COMP_LINE"] = line
    try:
        with commands.group_options_once():
            getattr(commands, f"{command}_command")()
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("COMP_LINE", None)
        else:
            os.environ["COMP_LINE"] = saved[1]
