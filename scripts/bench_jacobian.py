"""Benchmark: ways to get the T x P matrix of per-task gradients of the shared parameters, against one ordinary
training backward (the cost of `ew`), on the embedded data.

    python scripts/bench_jacobian.py [--steps 10] [--rounds 3] [--device cpu|cuda] [overrides as for mtl train]

Every way computes the same matrix (checked against the first one before timing). Timed: forward + the
gradients, median per step over interleaved rounds; printed as ratios to forward + one backward.

  full-loop      T retained backward passes through the whole network (what most research code does); as
                 L_t depends on head t alone, each pass runs head t and the trunk
  full-batched   one backward with is_grads_batched=True over the stacked losses (vmap over the whole graph)
  torch.func     jacrev of the loss vector over functional_call (forward and T vector-Jacobian products)
  split-loop     mtl: heads once (per-task grads of the features), then T backward passes through the trunk
  split-batched  as split-loop, with the T trunk passes batched by is_grads_batched
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from torch.func import functional_call, jacrev, replace_all_batch_norm_modules_

from mtl_cli.build import build_dataset, build_loader, build_model, build_tasks
from mtl_cli.evaluate import to_device
from mtl_cli.paths import config_dir
from mtl_cli.weighting.gradients import FeatureCut, flat, task_gradients


def losses_of(model, tasks, batch, outputs=None):
    outputs = model(batch["image"]) if outputs is None else outputs
    return [task.loss(outputs[name], batch[task.target]) for name, task in tasks.items()]


def baseline(model, tasks, batch, shared):
    sum(losses_of(model, tasks, batch)).backward()


def heads_of(model, shared):
    ids = {id(p) for p in shared}
    return [p for p in model.parameters() if id(p) not in ids]


def full_loop(model, tasks, batch, shared):
    """(Also the heads' gradients of each task, as an update needs them: the same work as the other ways.)"""
    losses, heads = losses_of(model, tasks, batch), heads_of(model, shared)
    rows = [torch.autograd.grad(loss, shared + heads, retain_graph=i < len(losses) - 1, allow_unused=True)
            for i, loss in enumerate(losses)]
    return torch.stack([flat(row[:len(shared)], shared) for row in rows])


def full_batched(model, tasks, batch, shared):
    losses = torch.stack(losses_of(model, tasks, batch))
    eye = torch.eye(len(losses), device=losses.device)
    grads = torch.autograd.grad(losses, shared + heads_of(model, shared), eye, is_grads_batched=True,
                                allow_unused=True)
    return torch.cat([g.reshape(len(losses), -1) for g in grads[:len(shared)]], dim=1)


def func_jacrev(original, tasks, batch, shared):
    """(Runs on a copy whose batch norms keep no running statistics: torch.func forbids their in-place update.)"""
    if not hasattr(original, "func_copy"):
        original.func_copy = [replace_all_batch_norm_modules_(copy.deepcopy(original))]
    model = original.func_copy[0]
    names = [n for n, p in original.named_parameters() if any(p is s for s in shared)]
    others = {n: p for n, p in model.named_parameters() if n not in names}

    def losses(params):
        outputs = functional_call(model, {**others, **params}, (batch["image"],))
        return torch.stack(losses_of(model, tasks, batch, outputs))

    jac = jacrev(losses)({n: p for n, p in model.named_parameters() if n in names})
    return torch.cat([jac[n].reshape(len(tasks), -1) for n in names], dim=1)


def split(backend):
    def run(model, tasks, batch, shared):
        cut = FeatureCut(model.encode(batch["image"]))
        outputs = model.decode(cut.leaves, batch["image"].shape[-2:])
        return task_gradients(losses_of(model, tasks, batch, outputs), model, cut, "params",
                              backend=backend).matrix
    return run


WAYS = {"full-loop": full_loop, "full-batched": full_batched, "torch.func": func_jacrev,
        "split-loop": split("loop"), "split-batched": split("batched")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tasks = {name: task.to(device) for name, task in build_tasks(cfg).items()}
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True)
    loader.batch_sampler.set_epoch(0)
    batches = [to_device(b, device) for _, b in zip(range(args.steps), loader)]
    model = build_model(cfg, tasks).to(device).train()
    shared = list(model.shared_parameters())

    outputs = model(batches[0]["image"])
    reference = torch.stack([flat(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared)
                             for loss in losses_of(model, tasks, batches[0], outputs)])
    ways = {"ew (forward + 1 backward)": baseline}
    for name, way in WAYS.items():
        try:
            error = (way(model, tasks, batches[0], shared) - reference).abs().max() / reference.abs().max()
            assert error < 1e-4, f"{name} differs from full-loop by {error:.2e}"
            ways[name] = way
        except Exception as exc:  # report and go on: a way that cannot run here is a result too
            print(f"{name}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    timings = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            sync()
            start = time.perf_counter()
            for batch in batches:
                model.zero_grad(set_to_none=True)
                way(model, tasks, batch, shared)
            sync()
            timings[name].append((time.perf_counter() - start) / len(batches))
    medians = {name: statistics.median(t) for name, t in timings.items()}
    base = medians["ew (forward + 1 backward)"]
    print(f"backbone {cfg.backbone.get('name', 'small_cnn')}, batch {cfg.data.batch_size}, tasks {', '.join(tasks)}"
          f" (T={len(tasks)}), {sum(p.numel() for p in shared):,} shared parameters, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'way':28s} {'ms/step':>9s} {'x ew':>7s}")
    for name, value in medians.items():
        print(f"{name:28s} {1000 * value:9.1f} {value / base:7.2f}")


if __name__ == "__main__":
    main()
