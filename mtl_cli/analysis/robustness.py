"""Adversarial robustness per task: every task's metrics under attacks aimed at one task's loss at a time, and at the
joint loss, for a list of radii.

Mao, Gupta, Nitin, Ray, Song, Yang and Vondrick, "Multitask Learning Strengthens Adversarial Robustness" (ECCV
2020) measure a multi-task model this way: perturb the image to raise the loss of the attacked task (or of all of
them), then score every task on the perturbed image. The off-diagonal cells of the table (attack task i, score task
j) show how far an attack on one task carries over to the others through the shared trunk, the row "all" the joint
attack. Attacks:
- FGSM (Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015): one step
  x + eps * sign(grad) (L-inf); with norm=l2, one step of length eps along the gradient (the fast gradient method).
- PGD (Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
  ICLR 2018): `steps` ascent steps of `step_size` (along sign(grad) for L-inf, along grad / |grad|_2 per image for
  L2), each followed by the projection back onto the eps ball around the clean image and onto [0, 1], from a uniform
  random point of the ball (random_start) or from the image itself.

Departures and choices:
- Radii and step sizes are in pixel units, on the 0..255 scale (the model takes floats in [0, 1]: eps=8 is 8/255);
  an L2 radius is the length of one image's whole perturbation on that scale.
- The joint loss is the plain sum of the task losses (every weight 1). Mao et al. write the multi-task loss as a
  weighted sum; here the weights are not the training weighting's, because many methods' weights change with the
  state of training (uncertainty, GradNorm, Nash-MTL...) or do not exist as loss weights at all (PCGrad, CAGrad),
  and an attack that depends on the method would not compare models trained with different ones. A task whose loss
  is larger or steeper than the others' therefore leads the joint attack.
- Gradients of the attack are taken in float32 whatever trainer.precision is (fp16 input gradients of a mean loss
  underflow without a scaler); the attacked images are scored as mtl eval scores clean ones, at trainer.precision.
- Captum's captum.robust FGSM and PGD take a loss function over the model's output and an arbitrary target, so they
  would carry these losses; they are not used because their L2 PGD steps along sign(grad) (the L-inf direction)
  before renormalising, their L2 random start draws radii on the CPU (fails for CUDA images), FGSM leaves unchanged
  every pixel whose gradient is below 1e-6 by default (most pixels of a mean loss over a batch of images), and the
  random start draws from torch's global generator. The attack here is short; the tests check its L-inf PGD against
  captum's (random_start off, threshold 0) where both are defined.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from mtl_cli.engine.batches import Scores, predict, to_device
from mtl_cli.errors import UserError
from mtl_cli.tasks import Task

PIXEL = 255.0  # the images are floats in [0, 1]; radii are given on the 0..255 scale
JOINT = "all"  # the row of the attack on the sum of every task's loss
ATTACKS = ("fgsm", "pgd")
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Attack:
    """The attack of the `robustness` config node (configs/robustness/); radii and step size in pixel units."""
    name: str
    eps: tuple[float, ...]
    norm: str = "linf"
    steps: int = 1
    step_size: float | None = None  # None: 2.5 * eps / steps, so that a walk from the random start reaches any point
    random_start: bool = False

    @classmethod
    def of(cls, node: DictConfig) -> Attack:
        """The attack a config node describes, or a UserError naming the key at fault."""
        given = OmegaConf.to_container(node, resolve=True)
        name = str(given.pop("name", ""))
        if name not in ATTACKS:
            raise UserError(f"robustness.name={name!r}: use +robustness=fgsm or +robustness=pgd")
        allowed = {"eps", "norm"} | ({"steps", "step_size", "random_start"} if name == "pgd" else set())
        unknown = sorted(set(given) - allowed)
        if unknown:
            hint = " (FGSM is one step of size eps: use +robustness=pgd for steps)" if name == "fgsm" else ""
            raise UserError(f"robustness.{unknown[0]} is not a setting of {name}{hint}; it takes "
                            f"{', '.join(sorted(allowed))}")
        eps = given.get("eps")
        eps = [eps] if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
        if not isinstance(eps, (list, tuple, ListConfig)) or not eps or not all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and 0 <= e < float("inf") for e in eps):
            raise UserError(f"robustness.eps={given.get('eps')!r}: give a list of radii of at least 0 in pixel "
                            "units (0..255), e.g. robustness.eps=[1,2,4,8]")
        norm = str(given.get("norm", "linf")).lower()
        if norm not in NORMS:
            raise UserError(f"robustness.norm={given.get('norm')!r}: use linf or l2")
        if name == "fgsm":
            return cls(name, tuple(float(e) for e in eps), norm)
        steps, step_size = given.get("steps", 10), given.get("step_size")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"robustness.steps={steps!r}: give a whole number of at least 1")
        if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                      or not 0 < step_size < float("inf")):
            raise UserError(f"robustness.step_size={step_size!r}: give a size above 0 in pixel units, or null "
                            "for 2.5 * eps / steps")
        random_start = given.get("random_start", True)
        if not isinstance(random_start, bool):
            raise UserError(f"robustness.random_start={random_start!r}: give true or false")
        return cls(name, tuple(float(e) for e in eps), norm, steps, None if step_size is None else float(step_size),
                   random_start)

    def settings(self) -> dict:
        """What eval.json records of the attack."""
        return {**asdict(self), "eps": list(self.eps), "units": "pixels (0..255)",
                "joint_loss": "sum of the task losses, every weight 1"}

    def perturb(self, model: nn.Module, loss_of: Callable, image: torch.Tensor, eps: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """`image` attacked with radius `eps` (pixel units) to raise loss_of(model(image))."""
        eps = eps / PIXEL
        if self.name == "fgsm":
            return perturb(model, loss_of, image, eps, norm=self.norm, steps=1, step_size=eps)
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size / PIXEL
        return perturb(model, loss_of, image, eps, norm=self.norm, steps=self.steps, step_size=step_size,
                       random_start=self.random_start, generator=generator)

    def describe(self) -> str:
        size = "2.5 eps/steps" if self.step_size is None else f"{self.step_size:g}"
        start = ", random start" if self.random_start else ""
        walk = "" if self.name == "fgsm" else f", {self.steps} step{'s' if self.steps > 1 else ''} of {size}{start}"
        return f"{self.name.upper()} {self.norm}{walk}, eps in pixels (0..255)"


def perturb(model: nn.Module, loss_of: Callable, image: torch.Tensor, eps: float, norm: str = "linf", steps: int = 1,
            step_size: float | None = None, random_start: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on loss_of(model(x)) from `image` (float [B, 3, H, W] in [0, 1]); eps and
    step_size on that [0, 1] scale. Returns images in [0, 1] within `eps` of `image` per image in `norm` (up to
    float rounding). One step of size eps without random start is FGSM (the fast gradient method for l2)."""
    clean = image.detach()
    step_size = eps if step_size is None else step_size
    adversarial = clean
    if random_start and eps > 0:
        adversarial = (clean + random_point(clean, eps, norm, generator)).clamp(0, 1)
    for _ in range(steps):
        grad = input_gradient(model, loss_of, adversarial)
        if grad is None:  # the loss does not depend on the image (no target of the attacked task in the batch)
            break
        adversarial = adversarial + step_size * ascent(grad, norm)
        adversarial = (clean + project(adversarial - clean, eps, norm)).clamp(0, 1)
    return adversarial.detach()


def input_gradient(model: nn.Module, loss_of: Callable, image: torch.Tensor) -> torch.Tensor | None:
    with torch.enable_grad():
        image = image.detach().requires_grad_(True)
        loss = loss_of(model(image))
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        return torch.autograd.grad(loss, image)[0]


def per_image_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image's entries, shaped to broadcast over [B, ...]."""
    return x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))


def ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest ascent direction of unit `norm` length: sign(grad) for L-inf, grad / |grad|_2 per image for L2
    (zero where the gradient is zero)."""
    if norm == "linf":
        return grad.sign()
    length = per_image_norm(grad)
    return torch.where(length > 0, grad / torch.where(length > 0, length, 1.0), 0.0)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest perturbation to `delta` within the `norm` ball of radius eps (per image). Clamping the image to
    [0, 1] afterwards only moves each entry toward the clean one (inside [0, 1]), so it stays inside the ball."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    length = per_image_norm(delta)
    return delta * (eps / length.clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1.0)


def random_point(image: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random point of the `norm` ball of radius eps, per image, drawn on the CPU (the same on every
    device) from `generator`."""
    shape = image.shape
    if norm == "linf":
        point = (torch.rand(shape, generator=generator) * 2 - 1) * eps
    else:  # a uniform direction, and a radius with P(r <= t) = (t / eps)^d: uniform over the ball's volume
        direction = torch.randn(shape, generator=generator)
        direction = direction / per_image_norm(direction)
        radius = eps * torch.rand(shape[0], generator=generator) ** (1.0 / image[0].numel())
        point = direction * radius.view(-1, *[1] * (len(shape) - 1))
    return point.to(image.device, image.dtype)


def summed_loss(tasks: Mapping[str, Task], batch: Mapping) -> Callable:
    """outputs -> the sum of the losses of `tasks` on the batch's targets (tasks without a labelled sample in the
    batch left out), as training computes them."""
    def loss_of(outputs: Mapping) -> torch.Tensor | float:
        total = 0.0
        for name, task in tasks.items():
            mask = task.present(batch)
            if not task.has_target(batch) or (mask is not None and not bool(mask.any())):
                continue
            output, target = task.select(outputs[name], batch)
            total = total + task.loss(output.float() if isinstance(output, torch.Tensor) else output, target)
        return total
    return loss_of


def attacked_rows(tasks: Mapping[str, Task]) -> list[str]:
    """The attacks of the table: each task's loss, and the joint loss where there are several tasks."""
    return [*tasks, JOINT] if len(tasks) > 1 else list(tasks)


def under_attack(model: nn.Module, tasks: Mapping[str, Task], batches: Iterable[dict], device: torch.device,
                 attack: Attack, precision: str = "32", seed: int = 0, ranks=None) -> dict:
    """{eps: {attacked: {task: {metric: value}}}} over all of `batches`, eps keys as text ("2", "0.5"). Each
    (eps, attacked) pair scores with metrics of its own over the whole split; on several processes (`ranks`, see
    engine.batches.Scores) each attacks its shard and the scores combine, the random starts differing per rank."""
    model.eval()
    rows = attacked_rows(tasks)
    generator = torch.Generator().manual_seed(seed + (ranks.rank if ranks is not None else 0))
    scores = {eps: {row: Scores(tasks, ranks) for row in rows} for eps in attack.eps}
    for batch in batches:
        batch = to_device(batch, device)
        for eps in attack.eps:
            for row in rows:
                aimed_at = tasks if row == JOINT else {row: tasks[row]}
                image = attack.perturb(model, summed_loss(aimed_at, batch), batch["image"], eps, generator)
                scores[eps][row].update(predict(model, image, precision), batch)
    return {f"{eps:g}": {row: scores[eps][row].compute()["metrics"] for row in rows} for eps in attack.eps}


def robustness_table(clean: Mapping, attacked: Mapping, directions: Mapping[str, Mapping[str, bool]],
                     title: str) -> str:
    """The table as text: a row per (eps, attacked task), under the clean row; a column per task and metric."""
    columns = [(task, metric, higher) for task, metrics in directions.items() for metric, higher in metrics.items()]
    table = Table(title=title)
    table.add_column("eps", justify="right")
    table.add_column("attacked")
    for task, metric, higher in columns:
        table.add_column(f"{task}\n{metric} {'↑' if higher else '↓'}", justify="right")

    def cells(metrics: Mapping) -> list[str]:
        found = [metrics.get(task, {}).get(metric) for task, metric, _ in columns]
        return ["-" if value is None else f"{value:.4f}" for value in found]
    table.add_row("0", "(clean)", *cells(clean), end_section=True)
    for eps, rows in attacked.items():
        for i, (row, metrics) in enumerate(rows.items()):
            table.add_row(eps if i == 0 else "", row, *cells(metrics), end_section=i == len(rows) - 1)
    buffer = io.StringIO()
    Console(file=buffer, width=400, force_terminal=False, color_system=None).print(table)
    return "\n" + "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines())
