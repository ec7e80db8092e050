"""How long `mtl` takes to answer the commands that only compose or print a config, against Python and torch.

    python scripts/bench_startup.py [--repeats 5]

Runs each command as a subprocess through the installed console script, `repeats` times in the same run, in an
empty temporary directory, and prints the median wall time and the median CPU time (user + system) of each. On a
busy machine the wall time grows with the load; the CPU time is what it would be on an idle one.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MTL = str(Path(sys.executable).with_name("mtl"))
COMMANDS = {  # label: (argv, extra environment)
    "python -c pass": ([sys.executable, "-c", "pass"], {}),
    "python -c 'import torch'": ([sys.executable, "-c", "import torch"], {}),
    "mtl --help": ([MTL, "--help"], {}),
    "mtl train --help": ([MTL, "train", "--help"], {}),
    "mtl train --cfg job": ([MTL, "train", "--cfg", "job"], {}),
    "mtl eval --help": ([MTL, "eval", "--help"], {}),
    # what the installed completion script runs for `mtl train backbone=res<TAB>`
    "mtl train backbone=res<TAB>": ([MTL, "-sc", "query=bash"], {"COMP_LINE": "mtl train backbone=res"}),
}


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall and CPU seconds of one run of argv (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'command':<30}{'wall (s)':>10}{'cpu (s)':>10}   median of {args.repeats}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as cwd:
        for label, (argv, env) in COMMANDS.items():
            walls, cpus = zip(*(timed(argv, env, cwd) for _ in range(args.repeats)))
            print(f"{label:<30}{statistics.median(walls):>10.2f}{statistics.median(cpus):>10.2f}")


if __name__ == "__main__":
    main()
