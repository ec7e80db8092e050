"""Benchmark: the training-step time of every weighting method relative to `ew` and to the limit of the exact
approach, in the same run, through the real training loop (`mtl_cli.train.train_batches`) on pre-collated batches
of the embedded data.

    python scripts/bench_weighting.py [--tasks 3 4] [--steps 4] [--rounds 6] [--threads 1] [--clock wall|cpu]
                                      [--copies 3] [--methods pcgrad ...] [--targets params representation]
                                      [--markdown] [overrides as for mtl train, e.g. backbone=resnet18]

For each number of tasks T, every option of configs/weighting/ runs with grad_target=params and, where the method
allows it, grad_target=representation. A method that reads several batches per step (`batches_per_step`: modo,
sdmgrad) gets that many times the batches and is timed per optimizer step (its limit: as many limits); one that
reads held-out batches (auto_lambda) reads the `held_out` split, built as `mtl train` builds it.

The limit of an exact parameter-gradient method is one ew step plus T - 1 extra backward passes through the shared
trunk. It is timed as a step of its own (the `limit` runs): ew's backward, whose trunk pass is preceded by T - 1
backward passes of the trunk from the same features' gradients onto the shared parameters, retaining the graph as
the exact path's first T - 1 passes do; so it runs in the same loop, on the same batches and at the same moments as
the methods. Every run trains its own copy of the same initial model. The runs take turns step by step, in a fresh
order each time; ew and the limit run `--copies` times each, and their step time at each turn is the copies' mean.
A ratio is the median, over the turns, of the ratio of two step times taken moments apart; [q1, q3] are its
quartiles (the loss-based rows and the copies, which do ew's or the limit's work, show the noise). --markdown prints
the README's table.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtl_cli.build import build_dataset, build_loader, build_model, build_optimizer, build_tasks, build_weighting
from mtl_cli.data.collate import collate
from mtl_cli.data.held_out import HeldOutBatches
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.progress import EpochProgress
from mtl_cli.engine.run import Run
from mtl_cli.engine.state import TrainState
from mtl_cli.paths import config_dir
from mtl_cli import train
from mtl_cli.weighting import gradients
from mtl_cli.weighting.base import GradientWeighting, Weighting
from mtl_cli.weighting.ew import EqualWeighting

TASK_SETS = {2: ["segmentation", "depth"], 3: ["segmentation", "depth", "normals"],
             4: ["segmentation", "depth", "normals", "count"],
             5: ["segmentation", "depth", "normals", "count", "multilabel"]}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
TARGET_NAMES = {"params": "params", "representation": "repr."}


class TrunkPasses:
    """Stands in for the step's FeatureCut: before the trunk's own backward pass, `passes` backward passes of the
    trunk from the same features' gradients onto the shared parameters, retaining the graph (the exact path's
    task_gradients retains it for all of its passes but the last)."""

    def __init__(self, cut, model: torch.nn.Module, passes: int):
        self.cut, self.model, self.passes = cut, model, passes

    def backward_trunk(self) -> None:
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        pairs = [(f, x.grad) for f, x in zip(self.cut.features, self.cut.inputs)
                 if x.grad is not None and f.requires_grad]
        for _ in range(self.passes):
            torch.autograd.grad([f for f, _ in pairs], shared, [g for _, g in pairs], retain_graph=True,
                                allow_unused=True)
        self.cut.backward_trunk()


class Limit(EqualWeighting):
    """ew's step plus T - 1 backward passes through the trunk: the limit of the exact approach."""

    def backward(self, losses, model, scaler, cut=None, log_grads=False, measure=False, samples=()):
        return super().backward(losses, model, scaler, TrunkPasses(cut, model, len(losses) - 1), log_grads, measure,
                                samples)


@dataclass
class Timed:
    cfg: DictConfig
    model: torch.nn.Module
    weighting: Weighting
    optimizer: torch.optim.Optimizer
    batches: list
    held_out: HeldOutBatches | None


def compose_train(count: int, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[f"tasks=[{','.join(TASK_SETS[count])}]", "logger.log_every=1000000",
                                           *overrides])


def build_runs(count: int, methods: list[str], steps: int, overrides: list[str], allowed: list[str], copies: int
               ) -> tuple[dict, dict]:
    """(the runs to time, keyed by (method, grad_target), the references ew and limit by (name, "#i") for each of
    their `copies`, every run with its own copy of the model; the tasks)."""
    base = compose_train(count, overrides)
    torch.manual_seed(0)
    tasks = build_tasks(base)
    loader = build_loader(base, build_dataset(base, "train"), train=True)
    loader.batch_sampler.set_epoch(0)
    batches = [b for _, b in zip(range(3 * steps), loader)]
    model0 = build_model(base, tasks)
    ew = compose_train(count, ["weighting=ew", *overrides])
    runs = {}
    for i in range(copies):
        runs[("limit", f"#{i}")] = Timed(base, copy.deepcopy(model0), Limit(list(tasks)), None, batches[:steps], None)
        runs[("ew", f"#{i}")] = Timed(ew, copy.deepcopy(model0), build_weighting(ew, tasks), None, batches[:steps],
                                      None)
    for method in methods:
        cfg = compose_train(count, [f"weighting={method}", *overrides])
        probe = build_weighting(cfg, tasks)
        targets = (None,)
        if isinstance(probe, GradientWeighting):
            targets = probe.grad_targets if "grad_target" in cfg.weighting else (probe.grad_target,)
            targets = [target for target in targets if target in allowed]
        held_out = None
        if probe.held_out_batches:  # as mtl train's prepare builds them, on one process
            held_out = HeldOutBatches(build_dataset(cfg, "held_out"), int(cfg.data.batch_size), int(cfg.seed),
                                      collate)
        if len(batches) < probe.batches_per_step * steps:
            raise SystemExit(f"{method} reads {probe.batches_per_step} batches per step: the train split has too few "
                             f"for --steps {steps}")
        for target in targets:
            run_cfg = cfg if target is None or "grad_target" not in cfg.weighting else OmegaConf.merge(
                cfg, {"weighting": {"grad_target": target}})
            weighting = build_weighting(run_cfg, tasks)
            runs[(method, target)] = Timed(run_cfg, copy.deepcopy(model0), weighting, None,
                                           batches[:probe.batches_per_step * steps], held_out)
    for run in runs.values():
        run.optimizer = build_optimizer(run.cfg, run.model, run.weighting)
    return runs, tasks


def time_steps(runs: dict, tasks: dict, rounds: int, steps: int, clock) -> dict:
    """{key: the `clock` seconds of each of its optimizer steps (each call of train_step), in the order of the
    samples}, through the real loop (train_batches, one step at a time). The runs take turns at every step, in a fresh
    order each time, so that the k-th samples of two runs were taken moments apart; round 0 warms up and is not
    kept."""
    device, scaler = torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False)
    timings, order, shuffle = {key: [] for key in runs}, list(runs), random.Random(0).shuffle
    seconds, step = [], train.train_step

    def timed_step(*args):
        start = clock()
        step(*args)
        seconds.append(clock() - start)

    train.train_step = timed_step  # train_batches calls it by its module's name
    try:
        with tempfile.TemporaryDirectory() as tmp:
            logger = Logger(Path(tmp), tensorboard=False, log_every=1000000, images=0)
            loops = {key: Run(TrainState(timed.cfg, timed.model, tasks, timed.weighting, timed.optimizer, None,
                                         scaler), device, logger, Path(tmp), progress=EpochProgress("none"),
                              held_out=timed.held_out) for key, timed in runs.items()}
            for round_ in range(rounds + 1):
                for position in range(steps):
                    shuffle(order)
                    for key in order:
                        size = runs[key].weighting.batches_per_step
                        seconds.clear()
                        train.train_batches(loops[key], runs[key].batches[position * size:(position + 1) * size],
                                            size)
                        if round_:
                            timings[key].extend(seconds)
    finally:
        train.train_step = step
    return timings


def pooled(timings: dict, name: str) -> list[float]:
    """A reference's step time at each sample: the mean over its copies of their samples taken then."""
    columns = [values for (run, copy_), values in timings.items() if run == name and str(copy_).startswith("#")]
    return [statistics.fmean(samples) for samples in zip(*columns)]


def ratios(values: list[float], reference: list[float], times: int = 1) -> tuple[float, float, float]:
    """The median and quartiles of the ratio of `values` to `times` x `reference`, sample by sample (each pair of
    steps taken moments apart)."""
    values = [a / (times * b) for a, b in zip(values, reference)]
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def exact(runs: dict, key) -> bool:
    """Whether the run is a gradient method on exact parameter gradients."""
    weighting = runs[key].weighting
    return isinstance(weighting, GradientWeighting) and weighting.grad_target == "params"


def batches(runs: dict, key) -> int:
    """The batches a step of the run reads: its limit is that many limits (a forward pass and the exact gradients
    of each batch)."""
    return runs[key].weighting.batches_per_step


def report(count: int, tasks: dict, runs: dict, timings: dict) -> None:
    ew, limit = pooled(timings, "ew"), pooled(timings, "limit")
    copies = len([key for key in runs if key[0] == "limit"])
    print(f"\nT={count} ({', '.join(tasks)}): ew {1000 * statistics.median(ew):.1f} ms/step; limit of exact parameter "
          f"gradients (ew + {count - 1} trunk backward passes) {1000 * statistics.median(limit):.1f} ms/step = "
          f"{ratios(limit, ew)[0]:.2f}x ew, i.e. {1000 * statistics.median(limit) - 1000 * statistics.median(ew):.1f} "
          f"ms for the {count - 1} passes (ew and limit: the mean of {copies} copies at each sample)")
    print(f"{'method':14s} {'grad_target':15s} {'ms/step':>8s} {'x ew':>6s} {'[q1, q3]':>13s} {'x limit':>8s} "
          f"{'[q1, q3]':>13s}")
    over = []
    for key, values in timings.items():
        on_ew, on_limit = ratios(values, ew), ratios(values, limit, batches(runs, key))
        name = key[0] + (f" {key[1]}" if str(key[1]).startswith("#") else "")
        target = runs[key].weighting.grad_target if isinstance(runs[key].weighting, GradientWeighting) else "-"
        mark = " *" if exact(runs, key) and on_limit[0] > 1.05 else ""
        over += [name] if mark else []
        print(f"{name:14s} {target:15s} {1000 * statistics.median(values):8.1f} {on_ew[0]:6.2f} "
              f"[{on_ew[1]:.2f}, {on_ew[2]:.2f}] {on_limit[0]:8.2f} [{on_limit[1]:.2f}, {on_limit[2]:.2f}]{mark}")
    print("exact methods (*) over 1.05x the limit: " + (", ".join(over) if over else "none"))


def breakdown(count: int, runs: dict, tasks: dict, timings: dict, reps: int, clock) -> None:
    """Where an exact method's step goes beyond the limit's, each part timed alone on the first batch with `reps`
    paired repetitions (steadier than whole steps): the exact path's task gradients (T head passes, T trunk passes,
    the rows) against the limit's backward (one head pass, T - 1 trunk passes and the trunk's own); then, on one real
    matrix of task gradients, each exact method's `combine` (Gramian, solver, update) and the write-back `apply`,
    which the limit does not have. Each extra is shown as a share of the limit's median step in the timed run."""
    reference = runs[("limit", "#0")]
    model, batch, limit = reference.model, reference.batches[0], Limit(list(tasks))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def forward():
        outputs, cut = model.forward_cut(batch["image"])
        return model.task_losses(tasks, outputs, batch), cut

    paths = {"limit": [], "exact": []}
    for rep in range(reps + 1):
        for path in sorted(paths, reverse=rep % 2 == 1):  # in turn first, so that a drift of the machine cancels
            losses, cut = forward()
            start = clock()
            if path == "limit":
                limit.backward(losses, model, scaler, cut)
            else:
                jacobian = gradients.task_gradients(list(losses.values()), model, cut, "params")
            if rep:
                paths[path].append(clock() - start)
            model.zero_grad(set_to_none=True)
    step = statistics.median(pooled(timings, "limit"))
    backward, exact_ = statistics.median(paths["limit"]), statistics.median(paths["exact"])
    print(f"\nT={count} breakdown (median of {reps} paired repetitions; limit step {1000 * step:.1f} ms): the limit's "
          f"backward {1000 * backward:.1f} ms, the exact path's task gradients {1000 * exact_:.1f} ms "
          f"({100 * (exact_ - backward) / step:+.1f}% of the limit step)")
    matrix, index = jacobian.matrix, list(range(count))
    values = torch.stack([loss.detach() for loss in losses.values()])
    print(f"{'method':14s} {'combine ms':>10s} {'apply ms':>9s} {'% of limit step':>16s}")
    for key, run in runs.items():
        if not exact(runs, key) or str(key[1]).startswith("#"):
            continue
        weighting, spent = run.weighting, {"combine": [], "apply": []}
        samples = [matrix.clone() for _ in range(weighting.batches_per_step - 1)]
        for rep in range(reps + 1):
            start = clock()
            update, weights = weighting.combine_groups(matrix, values, index, *samples)
            middle = clock()
            jacobian.apply(update, weighting.head_weights(weights.float(), values).to(update.dtype))
            if rep:
                spent["combine"].append(middle - start)
                spent["apply"].append(clock() - middle)
            model.zero_grad(set_to_none=True)
        combine, apply = (statistics.median(spent[part]) for part in ("combine", "apply"))
        share = 100 * (combine + apply) / (batches(runs, key) * step)
        print(f"{key[0]:14s} {1000 * combine:10.2f} {1000 * apply:9.2f} {share:15.1f}%")


def markdown(results: dict) -> None:
    """The README's table: a row per method (loss-based first), its ratio to ew per T and grad_target, and for
    params, in brackets, its ratio to the limit."""
    counts = sorted(results)
    print("\n" + "; ".join(f"T={count}: ew {1000 * statistics.median(pooled(timings, 'ew')):.1f} ms/step, limit "
                           f"{ratios(pooled(timings, 'limit'), pooled(timings, 'ew'))[0]:.2f}x ew"
                           for count, (_, timings) in sorted(results.items())) + "\n")
    first = results[counts[0]][0]
    timed = [target for target in ("params", "representation")
             if any(getattr(run.weighting, "grad_target", None) == target for run in first.values())]
    print("| method | " + " | ".join(f"T={count} {TARGET_NAMES[target]}" for count in counts for target in timed)
          + " |")
    print("|---|" + "---|" * len(timed) * len(counts))
    gradient = {name: isinstance(run.weighting, GradientWeighting) for (name, _), run in first.items()}
    for name in sorted((name for name in gradient if name != "limit"), key=lambda name: (gradient[name], name)):
        cells = []
        for count in counts:
            runs, timings = results[count]
            ew, limit = pooled(timings, "ew"), pooled(timings, "limit")
            by_target = {getattr(run.weighting, "grad_target", "params"): key
                         for key, run in runs.items() if key[0] == name}
            for position, target in enumerate(timed):
                key = by_target.get(target) if gradient[name] else (  # a loss-based method: once, in front
                    by_target.get("params") if position == 0 else None)
                if key is None:
                    cells.append("-" if gradient[name] else "")
                    continue
                values = ew if name == "ew" else timings[key]
                cell = f"{ratios(values, ew)[0]:.2f}"
                if exact(runs, key):
                    cell += f" ({ratios(values, limit, batches(runs, key))[0]:.2f})"
                cells.append(cell)
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    several = sorted({key[0] for key, run in first.items() if run.weighting.batches_per_step > 1})
    if several:
        print(f"\n{', '.join(several)}: per optimizer step, which reads several batches; in brackets against as many "
              "limits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 4], choices=sorted(TASK_SETS))
    parser.add_argument("--steps", type=int, default=4, help="training steps (batches) per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (with --threads 1 the step's own work, without the "
                        "time other processes hold the core: steadier on a shared machine)")
    parser.add_argument("--methods", nargs="*", help="weighting options (default: every one in configs/weighting)")
    parser.add_argument("--targets", nargs="+", default=["params", "representation"],
                        choices=["params", "representation"], help="the grad_targets to time (where allowed)")
    parser.add_argument("--copies", type=int, default=3, help="runs of each reference, ew and limit, pooled")
    parser.add_argument("--markdown", action="store_true", help="also print the README's table")
    parser.add_argument("--breakdown", type=int, default=0, metavar="REPS",
                        help="also time the parts of an exact step against the limit's, REPS paired repetitions")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods or sorted(p.stem for p in (config_dir() / "weighting").glob("*.yaml"))
    methods = [m for m in methods if m != "ew"]  # ew is a reference: its copies are timed anyway

    print(f"torch threads {torch.get_num_threads()}, {args.clock} clock; median ms per optimizer step over "
          f"{args.rounds} rounds x {args.steps} steps; ratios: median of the ratios of steps taken moments apart, "
          "[quartiles]")
    results = {}
    for count in args.tasks:
        runs, tasks = build_runs(count, methods, args.steps, args.overrides, args.targets, args.copies)
        timings = time_steps(runs, tasks, args.rounds, args.steps, CLOCKS[args.clock])
        report(count, tasks, runs, timings)
        if args.breakdown:
            breakdown(count, runs, tasks, timings, args.breakdown, CLOCKS[args.clock])
        results[count] = (runs, timings)
    if args.markdown:
        markdown(results)


if __name__ == "__main__":
    main()
