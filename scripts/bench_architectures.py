"""Benchmark: the training-step time of every architecture relative to `hps`, in the same run, through the real
training loop (`mtl_cli.train.train_batches`) on pre-collated batches of the embedded data.

    python scripts/bench_architectures.py [--tasks 3] [--weightings ew mgda] [--steps 4] [--rounds 4]
                                          [--threads 1] [--clock wall|cpu] [--copies 2] [--architectures mtan ...]
                                          [--markdown] [overrides as for mtl train, e.g. backbone=resnet18]

For each weighting (ew, and an exact-gradient method such as mgda, whose cost grows with the trunk), every option of
configs/architecture/ trains its own model from the same seed on the same batches; hps runs `--copies` times and is
the reference. The runs take turns step by step, in a fresh order each time (bench_weighting's `time_steps`), and a
ratio is the median over the turns of the ratio of two step times taken moments apart, with its quartiles. Every
model is told it is past its first epoch (`start_epoch(1, 2)`), so ltb is timed searching, not warming up.
--markdown prints the README's column.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_weighting import CLOCKS, TASK_SETS, Timed, compose_train, pooled, ratios, time_steps
from mtl_cli.build import build_dataset, build_loader, build_model, build_optimizer, build_tasks, build_weighting
from mtl_cli.paths import config_dir

REFERENCE = "hps"


def build_runs(count: int, architectures: list[str], weighting: str, steps: int, overrides: list[str],
               copies: int) -> tuple[dict, dict]:
    """(the runs keyed by (architecture, "#i") for the reference's copies and (architecture, weighting) for the
    others, each model built from seed 0; the tasks)."""
    base = compose_train(count, [f"weighting={weighting}", *overrides])
    torch.manual_seed(0)
    tasks = build_tasks(base)
    loader = build_loader(base, build_dataset(base, "train"), train=True)
    loader.batch_sampler.set_epoch(0)
    batches = [b for _, b in zip(range(steps), loader)]
    keys = [(REFERENCE, f"#{i}") for i in range(copies)] + [(a, weighting) for a in architectures if a != REFERENCE]
    runs = {}
    for key in keys:
        cfg = compose_train(count, [f"architecture={key[0]}", f"weighting={weighting}", *overrides])
        torch.manual_seed(0)
        model = build_model(cfg, tasks)
        model.start_epoch(1, 2)
        weighting_ = build_weighting(cfg, tasks)
        runs[key] = Timed(cfg, model, weighting_, build_optimizer(cfg, model, weighting_), batches, None)
    return runs, tasks


def report(count: int, weighting: str, tasks: dict, runs: dict, timings: dict) -> dict[str, tuple]:
    """Prints each architecture's step time and ratio to hps; returns {architecture: (ms, median, q1, q3)}."""
    reference = pooled(timings, REFERENCE)
    print(f"\nT={count} ({', '.join(tasks)}), weighting={weighting}: hps {1000 * statistics.median(reference):.1f} "
          f"ms/step (the mean of {sum(key[0] == REFERENCE for key in runs)} copies at each sample)")
    print(f"{'architecture':14s} {'ms/step':>8s} {'x hps':>6s} {'[q1, q3]':>13s}")
    rows = {}
    for key, values in timings.items():
        median, q1, q3 = ratios(values, reference)
        name = key[0] + (f" {key[1]}" if str(key[1]).startswith("#") else "")
        print(f"{name:14s} {1000 * statistics.median(values):8.1f} {median:6.2f} [{q1:.2f}, {q3:.2f}]")
        if key[0] != REFERENCE:
            rows[key[0]] = (1000 * statistics.median(values), median, q1, q3)
    rows[REFERENCE] = (1000 * statistics.median(reference), 1.0, 1.0, 1.0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, choices=sorted(TASK_SETS))
    parser.add_argument("--weightings", nargs="+", default=["ew", "mgda"])
    parser.add_argument("--steps", type=int, default=4, help="training steps (batches) per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--architectures", nargs="*", help="default: every option in configs/architecture")
    parser.add_argument("--copies", type=int, default=2, help="runs of the reference, hps, pooled")
    parser.add_argument("--markdown", action="store_true", help="also print the README's column")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    architectures = args.architectures or sorted(p.stem for p in (config_dir() / "architecture").glob("*.yaml"))

    print(f"torch threads {torch.get_num_threads()}, {args.clock} clock; median ms per step over {args.rounds} "
          f"rounds x {args.steps} steps; ratios: median of the ratios of steps taken moments apart, [quartiles]")
    results = {}
    for weighting in args.weightings:
        runs, tasks = build_runs(args.tasks, architectures, weighting, args.steps, args.overrides, args.copies)
        timings = time_steps(runs, tasks, args.rounds, args.steps, CLOCKS[args.clock])
        results[weighting] = report(args.tasks, weighting, tasks, runs, timings)
    if args.markdown:
        print("\n| architecture | " + " | ".join(f"{w}: ms/step (x hps)" for w in args.weightings) + " |")
        print("|---|" + "---:|" * len(args.weightings))
        for name in [REFERENCE] + [a for a in architectures if a != REFERENCE]:
            cells = [f"{rows[name][0]:.0f} ({rows[name][1]:.2f})" for rows in results.values()]
            print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
