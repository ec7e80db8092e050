"""Checks that SIGKILL at any moment, then `resume=auto`, ends with the weights of an uninterrupted run.

    .venv/bin/python scripts/kill_resume.py [--trials 20] [--seed 0] [--dir FOLDER]

Runs one straight tiny training run with the `mtl` console script (last.pt every 2 steps inside epochs and at each
epoch's end, a random flip as augmentation), watching its checkpoints folder to learn how long it takes and how
many checkpoints it writes. Then each trial starts the same command with `resume=auto` in a folder of its own and
kills it with SIGKILL at a random moment (seeded): a random delay after the start or after the k-th new last.pt
(up to the straight run's time to the next one), right after the k-th new last.pt appears, or as soon as the k-th
checkpoint temp file (`.last.pt.<pid>.tmp`, `.best.pt.<pid>.tmp`) exists, i.e. inside a write. After each kill
every checkpoint there must load with load_checkpoint(path, "resume"); the same command is started again (in some
trials killed a second time) until it completes. A trial passes when its final
last.pt equals the straight run's: every model tensor (torch.equal), epoch, batch, step, and the optimizer's state
tensors and groups; and when each restart said it resumed from the checkpoint that was there.

The checkpoints folder is polled every 2 ms. A kill "landed in a write" when the killed process left its temp file
behind. Every run uses one thread (OMP_NUM_THREADS=1): the same on every run, and fair to a shared machine.
Prints one row per trial and a summary; exit status 1 when a trial is not bit-identical or a checkpoint was
unreadable (the folder with every run's log is then kept and named).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MTL = str(Path(sys.executable).with_name("mtl"))
FLIP = "data.transforms.train=[{_target_: torchvision.transforms.v2.RandomHorizontalFlip}]"
RUN = ["data.dataset.scenes={train:96,val:16,test:16}", "data.dataset.image_size=32", "data.batch_size=8",
       "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=2", "trainer.progress=plain", "logger.log_every=1",
       "logger=console", "data.num_workers=0", FLIP]
POLL = 0.002  # seconds between two looks at the checkpoints folder
KINDS = ("delay", "saved", "writing")
RESUMED = re.compile(r"resumed from \S+ at epoch (\d+), step (\d+)(?:, batch (\d+) of the epoch)?")


def command(args: list[str], run_dir: Path, resume: bool) -> list[str]:
    return ["train", *args, *(["resume=auto"] if resume else []), f"hydra.run.dir={run_dir}"]


def console_script(argv: list[str], log: Path) -> subprocess.Popen:
    """Starts `mtl <argv>` as its own process, stdout and stderr (unbuffered) into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([MTL, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


class Forked:
    """Starts `mtl <argv>` in a fork of this process (cli.main in the child): a real process to kill, without the
    interpreter's start and the imports, for callers (the test) that hold one torch thread already. Quacks like
    the Popen that console_script returns: pid, poll(), wait()."""

    def __init__(self, argv: list[str], log: Path):
        import mtl_cli.train  # noqa: F401 -- the heavy imports, done once here rather than in every child
        from mtl_cli.cli import main

        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                sys.stdout = sys.stderr = open(log, "w", buffering=1)
                os.dup2(sys.stdout.fileno(), 1)
                os.dup2(sys.stdout.fileno(), 2)
                torch.set_num_threads(1)
                status = main(list(argv))
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 -- a bug's traceback goes to the log; the child must not return
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(status)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


@dataclass(frozen=True)
class Kill:
    """When to kill: `at` seconds after the start or after the `n`-th new last.pt (delay), as soon as the `n`-th
    new last.pt appeared (saved), or as soon as the `n`-th checkpoint write started (writing)."""
    kind: str
    at: float = 0.0
    n: int = 0

    def due(self, seconds: float, saves: list[float], writes: int) -> bool:
        if self.kind == "delay":
            return len(saves) >= self.n and seconds >= (saves[self.n - 1] if self.n else 0.0) + self.at
        return (len(saves) if self.kind == "saved" else writes) >= self.n

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"{self.at:.2f}s after save {self.n}" if self.n else f"at {self.at:.1f}s"
        return f"after save {self.n}" if self.kind == "saved" else f"in write {self.n}"


@dataclass
class Ended:
    """How one run ended: its exit code, whether we killed it and when, what it wrote until then."""
    code: int
    killed: bool
    seconds: float
    saves: list[float] = field(default_factory=list)  # when each new last.pt appeared
    writes: int = 0  # checkpoint temp files seen appearing
    left: list[str] = field(default_factory=list)  # temp files the killed process left: it died inside a write


def version(path: Path) -> tuple[int, int] | None:
    """A new last.pt is a new file (renamed over the old one): its inode and mtime tell it apart."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def temp_files(checkpoints: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(checkpoints) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def run_until(process, checkpoints: Path, kill: Kill | None, timeout: float) -> Ended:
    """Watches `process` write into `checkpoints` until it ends, or kills it with SIGKILL when `kill` is due."""
    start, last = time.monotonic(), checkpoints / "last.pt"
    seen, writing, ended = version(last), False, Ended(0, False, 0.0)
    stale = set(temp_files(checkpoints))  # left by a process killed before: this one removes them on its first write
    while process.poll() is None:
        ended.seconds = time.monotonic() - start
        now = version(last)
        if now != seen and now is not None:
            seen = now
            ended.saves.append(ended.seconds)
        temps = set(temp_files(checkpoints)) - stale
        if temps and not writing:
            ended.writes += 1
        writing = bool(temps)
        if kill is not None and kill.due(ended.seconds, ended.saves, ended.writes) or ended.seconds > timeout:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            ended.killed = True
            ended.left = [name for name in temp_files(checkpoints) if f".{process.pid}." in name]
            break
        time.sleep(POLL)
    ended.code = process.poll()
    if ended.seconds > timeout:
        raise RuntimeError(f"a run took more than {timeout:.0f}s: killed (its log is beside {checkpoints.parent})")
    return ended


@dataclass
class Profile:
    """The straight run as watched: its length, and how many checkpoints it wrote when."""
    last: Path
    seconds: float
    saves: list[float]
    writes: int


def straight_run(args: list[str], folder: Path, launch=console_script, timeout: float = 900) -> Profile:
    run_dir = folder / "straight"
    ended = run_until(launch(command(args, run_dir, resume=False), folder / "straight.log"),
                      run_dir / "checkpoints", None, timeout)
    if ended.code != 0 or not ended.saves:
        raise RuntimeError(f"the straight run failed (exit {ended.code}): see {folder / 'straight.log'}")
    return Profile(run_dir / "checkpoints" / "last.pt", ended.seconds, ended.saves, max(ended.writes,
                                                                                          len(ended.saves)))


def plan(rng: random.Random, kind: str, profile: Profile, first: bool) -> Kill:
    """A kill of `kind` spread over the straight run; a second kill aims at its first third (the restarted run has
    less left to do). A delay counts from a save (or the start), up to the straight run's next save: measured from
    the start alone, it would land in start-up or after the end whenever the machine's load changes."""
    share = 1.0 if first else 1 / 3
    if kind == "delay":
        n = rng.randint(0, max(1, round(len(profile.saves) * share)) - 1)
        times = [0.0, *profile.saves]
        return Kill(kind, at=rng.uniform(0, times[n + 1] - times[n]), n=n)
    count = len(profile.saves) if kind == "saved" else profile.writes
    return Kill(kind, n=rng.randint(1, max(1, round(count * share))))


def plan_trials(trials: int, seed: int, profile: Profile, second: float = 0.4) -> list[list[Kill]]:
    """The kills of each trial: the first cycles over the kinds; a second one follows with probability `second`."""
    rng = random.Random(seed)
    plans = []
    for i in range(trials):
        kills = [plan(rng, KINDS[i % len(KINDS)], profile, first=True)]
        if rng.random() < second:
            kills.append(plan(rng, rng.choice(KINDS), profile, first=False))
        plans.append(kills)
    return plans


@dataclass
class Trial:
    index: int
    kills: list[tuple[Kill, Ended]] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # the checkpoint each restart began from
    unreadable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.problems

    def row(self) -> str:
        kills = "; ".join(f"{kill} ({landed(ended)})" for kill, ended in self.kills)
        written = "yes" if any(ended.left for _, ended in self.kills) else "no"
        result = "bit-identical" if self.identical else "DIFFERENT"
        row = f"{self.index:>5}  {result:<13}  {written:<8}  {', '.join(self.resumed) or '-':<22}  {kills}"
        return row + "".join(f"\n         {problem}" for problem in self.problems)


def landed(ended: Ended) -> str:
    if not ended.killed:
        return f"ran to its end, {ended.seconds:.1f}s"
    where = f"in {ended.left[0].split('.')[1]}.pt write" if ended.left else (
        f"after {len(ended.saves)} saves" if ended.saves else "no save yet")
    return f"t={ended.seconds:.1f}s, {where}"


def run_trial(index: int, kills: list[Kill], args: list[str], folder: Path, reference: Path,
              launch=console_script, timeout: float = 900) -> Trial:
    """Starts the run with resume=auto, kills it at each of `kills` (checking every checkpoint left), restarts it
    until it completes, and compares its last.pt with `reference`."""
    trial, run_dir = Trial(index), folder / f"trial_{index}"
    checkpoints, expected = run_dir / "checkpoints", None
    argv = command(args, run_dir, resume=True)
    for attempt, kill in enumerate([*kills, None]):
        log = folder / f"trial_{index}.{attempt}.log"
        ended = run_until(launch(argv, log), checkpoints, kill, timeout)
        trial.problems += resume_problems(log, expected)
        if not ended.killed:
            if kill is not None:
                trial.kills.append((kill, ended))
            if ended.code != 0:
                trial.problems.append(f"exit {ended.code} (see {log})")
                return trial
            break
        trial.kills.append((kill, ended))
        expected = check_folder(checkpoints, trial)
        trial.resumed.append("fresh" if expected is None else "e{}/b{}/s{}".format(*expected))
    if not trial.problems:
        trial.problems += differences(load(reference), load(checkpoints / "last.pt"))
    return trial


def check_folder(checkpoints: Path, trial: Trial) -> tuple[int, int, int] | None:
    """Every checkpoint in the folder loads for a resume; returns last.pt's (epoch, batch, step), None if absent."""
    from mtl_cli.engine.checkpoint import load_checkpoint
    from mtl_cli.errors import UserError

    found = None
    for path in sorted(checkpoints.glob("*.pt")):
        try:
            state = load_checkpoint(path, "resume")
        except UserError as e:
            trial.unreadable.append(f"{path.name}: {e}")
            trial.problems.append(f"unreadable {path.name}")
            continue
        if path.name == "last.pt":
            found = (state["epoch"], state.get("batch", 0), state["step"])
    return found


def resume_problems(log: Path, expected: tuple[int, int, int] | None) -> list[str]:
    """The run in `log` said it resumed from `expected` (epoch, batch, step), or nothing when it started fresh. A
    run killed before it got that far (no "run dir:" line yet) says nothing either way."""
    text = log.read_text(errors="replace")
    if "run dir:" not in text:
        return []
    match = RESUMED.search(text)
    said = None if match is None else (int(match[1]), int(match[3] or 0), int(match[2]))
    return [] if said == expected else [f"{log.name}: resumed from {said}, expected {expected}"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two checkpoints: counters, model tensors (bit for bit), optimizer state and groups."""
    found = [f"{key} {a.get(key)} != {b.get(key)}" for key in ("epoch", "batch", "step") if a.get(key) != b.get(key)]
    if a["model"].keys() != b["model"].keys():
        found.append("model keys differ")
    found += [f"model {name}" for name, tensor in a["model"].items()
              if name in b["model"] and not torch.equal(tensor, b["model"][name])]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    if sa.keys() != sb.keys():
        found.append("optimizer state keys differ")
    for param in sa.keys() & sb.keys():
        for key, value in sa[param].items():
            other = sb[param].get(key)
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) \
                else value == other
            if not same:
                found.append(f"optimizer state {param}.{key}")
    if a["optimizer"]["param_groups"] != b["optimizer"]["param_groups"]:
        found.append("optimizer param_groups")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="where the runs go (kept); default: a temporary folder")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, runs in {folder}", flush=True)
    profile = straight_run(RUN, folder)
    print(f"straight run: {profile.seconds:.1f}s, {len(profile.saves)} last.pt saves (first at "
          f"{profile.saves[0]:.1f}s), {profile.writes} checkpoint writes seen", flush=True)
    print(f"{'trial':>5}  {'result':<13}  {'in write':<8}  {'resumed from (e/b/s)':<22}  kills (when; where it "
          "landed)", flush=True)
    trials = []
    for i, kills in enumerate(plan_trials(args.trials, args.seed, profile)):
        trials.append(run_trial(i, kills, RUN, folder, profile.last))
        print(trials[-1].row(), flush=True)
    same = sum(t.identical for t in trials)
    unreadable = [u for t in trials for u in t.unreadable]
    kills = [ended for t in trials for _, ended in t.kills if ended.killed]
    print(f"{same} of {len(trials)} trials bit-identical; {len(unreadable)} unreadable checkpoints")
    print(f"{len(kills)} kills, {sum(bool(e.left) for e in kills)} of them inside a checkpoint write; restarts from: "
          f"{sum(r != 'fresh' for t in trials for r in t.resumed)} checkpoints, "
          f"{sum(r == 'fresh' for t in trials for r in t.resumed)} fresh")
    for line in unreadable:
        print(f"  unreadable: {line}")
    if same < len(trials) or unreadable:
        print(f"the runs and their logs are kept in {folder}")
        sys.exit(1)
    if args.dir is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
