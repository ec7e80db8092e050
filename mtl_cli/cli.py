"""The `mtl` command: picks the subcommand and hands the rest of the command line to Hydra.

User mistakes made while Hydra composes the config (a bad option or key) end here with one message on stderr and
exit status 2; those found inside the job (a missing file, a checkpoint from elsewhere) are reported by
`reports_user_errors` around the job. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from mtl_cli import __version__, commands, completion, launch
from mtl_cli.errors import Stopped, UserError, suggest, user_message
from mtl_cli.guard import SWEEPS, Refused

# Nothing heavy is imported before Hydra has read the command line: --help, --cfg and tab completion stay fast.
COMMANDS = {"train": "train a multi-task model (the default config needs no download)",
            "eval": "score a checkpoint: mtl eval ckpt=<run dir>/checkpoints/best.pt",
            "predict": "run a checkpoint on your images: mtl predict ckpt=<best.pt or model.onnx> input=<image, folder, "
                       "glob or manifest>",
            "export": "export a checkpoint: mtl export ckpt=<best.pt> format=onnx|torchscript|exported_program",
            "explain": "saliency per task: mtl explain ckpt=<best.pt> input=<images> method=integrated_gradients",
            "report": "compare runs and sweeps: mtl report multirun/... (mean, spread, delta_m, significance)",
            "affinity": "task groupings from a run's measured affinities: mtl affinity <run dir> groups=K",
            "completion": 'tab completion: eval "$(mtl completion bash)" (or zsh); mtl completion fish | source'}
SHELL_COMPLETION = ("-sc", "--shell-completion")  # Hydra's flag; its installed scripts call `mtl -sc query=SHELL`
HELP_FLAGS = {"-h", "--help", "--hydra-help"}

USAGE = f"""usage: mtl <command> [group=option ...] [key=value ...] [-m] [--cfg job] [--help]

mtl {__version__}: a config-driven trainer for multi-task learning in computer vision.

commands:
""" + "\n".join(f"  {name:<12}{text}" for name, text in COMMANDS.items()) + """

Everything after the command is Hydra's: `mtl train --help` lists the config groups and their options,
`mtl train -m weighting=ew,uw seed=0,1` sweeps, `mtl train --cfg job` prints the composed config.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mtl {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "completion" or any(a in SHELL_COMPLETION for a in argv):
        return complete(command, rest)
    if command not in COMMANDS:
        return fail("mtl", f"unknown command {command!r}{suggest(command, COMMANDS)}; commands: {', '.join(COMMANDS)}")
    if command in ("report", "affinity"):  # not Hydra: they read runs, they compose nothing
        if command == "report":
            from mtl_cli.report.command import report as read_runs
        else:
            from mtl_cli.analysis.affinity_command import affinity as read_runs
        try:
            return read_runs(rest)
        except UserError as e:
            return fail(f"mtl {command}", str(e))
    flag_error = check_flags(rest)
    if flag_error:
        return fail(f"mtl {command}", f"{flag_error}; `mtl {command} --help` lists the flags and config groups")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, so user errors can be told from bugs
    sys.argv = [f"mtl {command}", *rest]
    entry = getattr(commands, f"{command}_command")
    SWEEPS.clear()
    if {"-m", "--multirun"}.intersection(rest) or "HYDRA.MODE=MULTIRUN" in (a.upper() for a in rest):
        from hydra_plugins.mtl_cli_plugins import register

        register()  # hydra/sweeper=study, hydra/launcher=slurm
    try:
        if launch.under_torchrun() and not HELP_FLAGS.intersection(rest):
            if os.environ["RANK"] != "0":  # torchrun's other ranks run what rank 0 sends (launch.py)
                return launch.follow()
            launch.lead()
        with commands.group_options_once() if HELP_FLAGS.intersection(rest) else commands.mode_from_the_command_line():
            entry()
        launch.release()  # torchrun's rank 0: no more jobs (a failed rank 0 leaves without: torchrun ends the rest)
    except Refused as e:
        return fail(f"mtl {command}", str(e.error))
    except KeyboardInterrupt as e:
        print(f"mtl {command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except Stopped as e:  # a scheduler's SIGTERM or SIGUSR1: the status a process killed by it would have
        print(f"mtl {command}: {e}", file=sys.stderr)
        return 128 + e.signal
    except BrokenPipeError:  # e.g. `mtl train --help | head`
        return 0
    except Exception as e:  # noqa: BLE001 -- sorted into user errors and bugs right below
        message = user_message(e, command, rest)
        if message is None:
            raise
        return fail(f"mtl {command}", message, getattr(e, "status", 2))
    return sweep_status(command)


def complete(command: str, rest: list[str]) -> int:
    """`mtl completion SHELL`, or Hydra's -sc flag after any command (or none: what the installed scripts run)."""
    try:
        if command == "completion":
            if len(rest) != 1:
                raise UserError(f"give one shell: {', '.join(completion.SHELLS)}, e.g. mtl completion bash")
            print(completion.script(rest[0]), end="")
        else:
            completion.shell_completion([command, *rest], COMMANDS)
    except UserError as e:
        return fail("mtl completion" if command == "completion" else "mtl", str(e))
    except BrokenPipeError:
        return 0
    return 0


def sweep_status(command: str) -> int:
    """0, or after a sweep with failed jobs: each named with its error, and 2 (all user errors) or 1."""
    failures = [f for sweep in SWEEPS for f in sweep["failures"]]
    if not failures:
        return 0
    jobs = sum(sweep["jobs"] for sweep in SWEEPS)
    lines = [f"  job {f['job']} ({' '.join(f['overrides']) or 'no overrides'}): {f['kind']}: {f['error']}"
             for f in failures]
    print(f"mtl {command}: {len(failures)} of {jobs} jobs failed:\n" + "\n".join(lines), file=sys.stderr)
    return 2 if all(f["kind"] == "user error" for f in failures) else 1


def check_flags(args: list[str]) -> str | None:
    """What is wrong with the flags of `args` (an unknown flag, a bad --cfg choice), said before Hydra's argparse
    would print its whole usage; None when they are fine or ask for help (argparse answers those itself)."""
    if any(a in ("-h", "--help", "--hydra-help", "--version") for a in args):
        return None
    from hydra._internal.utils import get_args_parser

    class Refused(Exception):
        pass

    def refuse(message: str):
        raise Refused(message)
    parser = get_args_parser()
    parser.error = refuse
    try:
        _, unknown = parser.parse_known_args(args)
    except Refused as e:
        return str(e)
    return f"unrecognized arguments: {' '.join(unknown)}" if unknown else None


def fail(prog: str, message: str, status: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def run() -> None:
    """The console script."""
    sys.exit(main())
