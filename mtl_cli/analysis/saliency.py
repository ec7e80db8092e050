"""`mtl explain ckpt=... input=... method=integrated_gradients | saliency | gradcam`: per image and per task, a heat
map of the pixels that drive that task's prediction, through Captum (Kokhlikyan et al., "Captum: A unified and
generic model interpretability library for PyTorch", arXiv 2020).

The methods, each attributing one scalar per task (analysis/targets.py):
- integrated_gradients (Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017): the
  gradient averaged along the straight path from a baseline to the image, times (image - baseline). Its
  completeness axiom, sum of attributions = f(image) - f(baseline), holds up to the Riemann error of `steps`
  points (Gauss-Legendre, Captum's default); explain.json records the gap (Captum's convergence delta) per task.
  The baseline is a black image (all zeros in [0, 1], before the model's own normalisation), the paper's choice
  for images. The map is |sum of the attributions over the colour channels| per pixel.
- saliency (Simonyan, Vedaldi and Zisserman, "Deep Inside Convolutional Networks", ICLR workshop 2014): the
  gradient's magnitude, its largest over the colour channels per pixel, as in the paper.
- gradcam (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
  ICCV 2017): ReLU of the channels of the trunk's last shared feature map (the last map `encode` returns, which
  the heads read) weighted by their spatially averaged gradients, upsampled bilinearly to the input. The paper
  applies it to a classifier's last convolution; here that map is the one every task shares.

Departures: maps are computed at the size the model takes (the checkpoint's preprocessing) and resized bilinearly
to the image's own size; each map is scaled by its `explain.percentile` percentile for display (Captum's own
visualisation clips outliers the same way), so colours compare within a map, not across maps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn
from torchvision.io import write_png

from mtl_cli.analysis.targets import Target
from mtl_cli.engine.state import HydraValues
from mtl_cli.errors import UserError, suggest
from mtl_cli.inference.inputs import Images
from mtl_cli.inference.loaded import Loaded

log = logging.getLogger("mtl")

METHODS = ("integrated_gradients", "saliency", "gradcam")


class Explained(nn.Module):
    """The model's forward with a tap (an identity module) on the trunk's last feature map, for Grad-CAM's hook."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.tap = model, nn.Identity()

    def forward(self, image: torch.Tensor) -> dict:
        features = self.model.encode(image.contiguous(memory_format=self.model.memory_format))
        return self.model.decode([*features[:-1], self.tap(features[-1])], image.shape[-2:])


def attribute(method: str, scalar, image: torch.Tensor, tap: nn.Module | None = None, steps: int = 32,
              internal_batch_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """The map [h, w] of `method` for `scalar` ([B,3,h,w] -> [B]) at `image` [1,3,h,w], and, for integrated
    gradients, its completeness record."""
    image = image.detach().clone().requires_grad_(True)  # (Captum warns when it has to set this itself)
    if method == "integrated_gradients":
        baseline = torch.zeros_like(image)
        attributions, delta = IntegratedGradients(scalar).attribute(
            image, baselines=baseline, n_steps=steps, internal_batch_size=internal_batch_size,
            return_convergence_delta=True)
        attributions, delta = attributions.detach(), delta.detach()
        with torch.no_grad():
            value, at_baseline = float(scalar(image)[0]), float(scalar(baseline)[0])
        record = {"value": value, "baseline_value": at_baseline, "attribution_sum": float(attributions.sum()),
                  "delta": float(delta[0])}
        return attributions[0].sum(0).abs(), record
    if method == "saliency":
        return Saliency(scalar).attribute(image, abs=True)[0].amax(0).detach(), {}
    cam = LayerGradCam(scalar, tap).attribute(image, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(image.shape[-2:]), "bilinear")[0, 0].detach(), {}


def to_size(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map [h, w] resized bilinearly to `size` [H, W]."""
    if tuple(heat.shape) == tuple(size):
        return heat
    return F.interpolate(heat[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0]


def overlay(image: torch.Tensor, heat: torch.Tensor, colormap: str, alpha: float, percentile: float) -> torch.Tensor:
    """uint8 RGB [3,H,W]: the image under the map [H,W] in `colormap`, the map scaled by its `percentile`."""
    heat = heat.float().clamp(min=0).cpu()
    scale = float(torch.quantile(heat.flatten(), percentile / 100)) if heat.numel() else 0.0
    scale = scale if scale > 0 else float(heat.max())
    level = (heat / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(heat)
    colours = torch.from_numpy(matplotlib.colormaps[colormap](level.numpy())[..., :3]).permute(2, 0, 1).float()
    mixed = (1 - alpha) * image.float() / 255 + alpha * colours
    return (mixed * 255).round().clamp(0, 255).to(torch.uint8)


def write_grid(path: Path, image: torch.Tensor, overlays: dict[str, torch.Tensor], method: str) -> None:
    """One row: the image, then each task's overlay titled with the task's name."""
    count = 1 + len(overlays)
    figure = Figure(figsize=(2.2 * count, 2.5))  # placed by hand: a constrained layout takes twice as long
    figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.1, wspace=0.05)
    panels = figure.subplots(1, count, squeeze=False)[0]
    for panel, (title, shown) in zip(panels, [("image", image), *overlays.items()]):
        panel.imshow(shown.permute(1, 2, 0).numpy())
        panel.set_title(title, fontsize=10)
        panel.set_axis_off()
    figure.supxlabel(f"{path.name.removesuffix('_grid.png')}: {method.replace('_', ' ')}", y=0.02, fontsize=9)
    figure.savefig(path, dpi=100)


def check_options(cfg: DictConfig) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method}{suggest(str(cfg.method), METHODS)}: choose one of {', '.join(METHODS)}")
    options = cfg.explain
    if int(options.steps) < 1:
        raise UserError(f"explain.steps={options.steps}: give the number of integrated-gradients steps, 1 or more")
    if options.colormap not in matplotlib.colormaps:
        raise UserError(f"explain.colormap={options.colormap}{suggest(str(options.colormap), matplotlib.colormaps)}: "
                        "give a matplotlib colormap name")
    if not 0 <= float(options.alpha) <= 1 or not 0 < float(options.percentile) <= 100:
        raise UserError(f"explain.alpha={options.alpha}, explain.percentile={options.percentile}: give alpha in "
                        "[0, 1] and percentile in (0, 100]")


def unique_stem(path: Path, used: set[str]) -> str:
    """The image's file stem, numbered when another input already had it (folders are searched recursively)."""
    stem, number = path.stem, 2
    while stem in used:
        stem, number = f"{path.stem}_{number}", number + 1
    used.add(stem)
    return stem


def explain(composed: DictConfig, run_dir: Path, hydra: HydraValues) -> dict:
    """`mtl explain`: writes <out>/<task>/<stem>.png, <out>/<stem>_grid.png and <out>/explain.json."""
    check_options(composed)
    options, method = composed.explain, str(composed.method)
    images = Images.of(str(composed.input))
    loaded = Loaded.of(composed, hydra, purpose="eval")
    out = Path(composed.out) if composed.get("out") else run_dir
    loaded.model.requires_grad_(False)  # attributions need gradients with respect to the image alone
    explained = Explained(loaded.model).eval()
    steps, chunk = int(options.steps), options.get("internal_batch_size")
    choosers = {name: loaded.entry(name, "explain") for name in loaded.tasks}  # before any image: fails early
    if None in choosers.values():
        missing = [name for name, choose in choosers.items() if choose is None]
        raise UserError(f"mtl explain has no scalar to attribute for the task {', '.join(missing)}: its config has no "
                        "`explain` entry; add one naming a chooser of mtl_cli/analysis/targets.py, e.g. "
                        f"+tasks.{missing[0]}.explain='{{_target_:mtl_cli.analysis.targets.class_logit,_partial_:true}}'")
    records, used = [], set()
    for path, raw in images:
        image = loaded.preprocess(raw)[None].to(loaded.device)
        with torch.no_grad():
            outputs = explained(image)
        stem, overlays, per_task = unique_stem(path, used), {}, {}
        for task in loaded.tasks:
            target: Target = choosers[task](outputs[task])
            heat, record = attribute(method, lambda x, t=task, s=target.scalar: s(explained(x)[t]), image,
                                     explained.tap, steps, None if chunk is None else int(chunk))
            heat = to_size(heat, tuple(raw.shape[-2:]))
            overlays[task] = overlay(raw, heat, str(options.colormap), float(options.alpha), float(options.percentile))
            (out / task).mkdir(parents=True, exist_ok=True)
            write_png(overlays[task], str(out / task / f"{stem}.png"))
            per_task[task] = {"target": target.says, **record}
        write_grid(out / f"{stem}_grid.png", raw, overlays, method)
        records.append({"image": str(path), "stem": stem, "size": list(raw.shape[-2:]), "tasks": per_task})
    summary = {"method": method, "ckpt": str(composed.ckpt), "input_size": list(loaded.input_size),
               "images": records, "skipped": [str(p) for p in images.skipped]}
    if method == "integrated_gradients":
        summary.update(steps=steps, baseline="black image (zeros in [0, 1], before the model's normalisation)",
                       max_abs_delta={task: max(abs(r["tasks"][task]["delta"]) for r in records)
                                      for task in loaded.tasks} if records else {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info(summary_lines(summary, loaded.tasks, out))
    return summary


def summary_lines(summary: dict, tasks, out: Path) -> str:
    lines = [f"explained {len(summary['images'])} image(s) by {summary['method']}"
             + (f", skipped {len(summary['skipped'])} unreadable" if summary["skipped"] else "") + f"; wrote {out}"]
    if summary["images"]:  # the targets chosen at the first image
        first = summary["images"][0]["tasks"]
        for task in tasks:
            gap = summary.get("max_abs_delta", {}).get(task)
            lines.append(f"  {task}: {first[task]['target']}" + ("" if gap is None else
                                                                 f"; completeness gap (max |delta|) {gap:.3g}"))
    return "\n".join(lines)
