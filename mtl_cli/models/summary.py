"""The model summary printed at the start of training: parameters and multiply-accumulates, shared and per task.

MACs are counted by torch's FlopCounterMode (convolutions, matrix products and attention; two FLOPs per MAC) on
one forward pass of one image in eval mode (nothing is updated), split by the modules each part of the model owns (`model.parts()`).
"""

from __future__ import annotations

import io

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def summarize(model: nn.Module, image_size: tuple[int, int]) -> list[dict]:
    """Rows {part, parameters, trainable, macs}: `shared` and one per task (from `model.parts()`), then `total`."""
    parts = model.parts() if hasattr(model, "parts") else {"model": [model]}
    names = {id(m): f"{type(model).__name__}.{n}" if n else type(model).__name__ for n, m in model.named_modules()}
    device = next(model.parameters()).device
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    # FlopCounterMode has no formula for some fused attention kernels (nn.MultiheadAttention's eval fast path, which
    # hides its projections too; scaled_dot_product_attention's CPU flash kernel), and which kernel runs depends on
    # the torch build, autograd and frozen weights. So count one path everywhere: no fast path, and attention by the
    # math backend, which is plain matrix products.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, 3, *image_size, device=device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    rows = []
    for part, modules in parts.items():
        params = [p for m in modules for p in m.parameters()]
        rows.append({"part": part, "parameters": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad),
                     "macs": sum(_flops_within(flops, names[id(m)]) for m in modules) // 2})
    everything = list(model.parameters())
    rows.append({"part": "total", "parameters": sum(p.numel() for p in everything),
                 "trainable": sum(p.numel() for p in everything if p.requires_grad),
                 "macs": flops.get("Global", 0) // 2})
    return rows


def _flops_within(flops: dict[str, int], prefix: str) -> int:
    """The FLOPs counted inside the module `prefix`: its own count when it was called, else the sum over the
    outermost of its submodules that were (a cross-stitch column's stages run one by one, not through it)."""
    inside = sorted(name for name in flops if name == prefix or name.startswith(prefix + "."))
    outermost: list[str] = []
    for name in inside:
        if not any(name.startswith(top + ".") for top in outermost):
            outermost.append(name)
    return sum(flops[name] for name in outermost)


def summary_table(rows: list[dict], title: str) -> str:
    """The rows as a console table (rich)."""
    table = Table(title=title)
    for column in ("part", "parameters", "trainable", "MACs / image"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for row in rows:
        table.add_row(row["part"], f"{row['parameters']:,}", f"{row['trainable']:,}", human(row["macs"]))
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip()


def summary_markdown(rows: list[dict], title: str) -> str:
    """The rows as a Markdown table (TensorBoard's text tab renders it)."""
    lines = [f"**{title}**", "", "| part | parameters | trainable | MACs / image |", "|---|---:|---:|---:|"]
    lines += [f"| {r['part']} | {r['parameters']:,} | {r['trainable']:,} | {human(r['macs'])} |" for r in rows]
    return "\n".join(lines)


def human(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def input_size(dataset) -> tuple[int, int]:
    """The image size of the first sample that is not a skipped bad file; its random augmentation draws from a
    forked generator, so that the run's random stream (and an exact resume) does not depend on this look."""
    from mtl_cli.errors import UserError

    with torch.random.fork_rng(devices=[]):
        first = next((s for s in map(dataset.__getitem__, range(len(dataset))) if s), None)
    if first is None:
        raise UserError("every sample of the train split is bad (data.skip_bad=true skipped them all)")
    return tuple(first["image"].shape[-2:])


def log_summary(model: nn.Module, size: tuple[int, int], cfg, logger) -> None:
    """The summary on the console and in TensorBoard's text tab."""
    import logging

    title = f"model: {type(model).__name__}, {cfg.backbone.get('name', 'small_cnn')}, {size[0]}x{size[1]} input"
    rows = summarize(model, size)
    logging.getLogger("mtl").info(summary_table(rows, title))
    logger.text("model", summary_markdown(rows, title))
