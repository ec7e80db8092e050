"""Auto-Lambda: the finite-difference lookahead against the exact bilevel gradient (autograd through the virtual
step), its Adam steps against torch.optim.Adam, and the held-out split the data config provides."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import TINY, ok
from torch import nn

from mtl_cli.build import build_dataset
from mtl_cli.data.held_out import HeldOutBatches
from mtl_cli.paths import config_dir
from mtl_cli.weighting.auto_lambda import AutoLambda
from mtl_cli.weighting.base import Lookahead

TASKS = ["a", "b", "c"]


class TwoLayer(nn.Module):
    """A shared layer and one linear head per task, in float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 4).double()
        self.heads = nn.ModuleList(nn.Linear(4, 1).double() for _ in TASKS)

    def losses(self, x, targets, params=None):
        out = torch.func.functional_call(self, params, (x,)) if params else self(x)
        return {t: ((o.squeeze(1) - y) ** 2).mean() * s for t, o, y, s in zip(TASKS, out, targets, (1.0, 1e-3, 1e2))}

    def forward(self, x):
        shared = torch.tanh(self.trunk(x))
        return [head(shared) for head in self.heads]


def data(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randn(3, 8, generator=generator,
                                                                                      dtype=torch.float64)


def test_the_lookahead_gradient_is_the_bilevel_gradient():
    model, method, lr = TwoLayer(), AutoLambda(TASKS, init=0.5), 0.3
    method.lambdas = torch.tensor([0.5, 2.0, 0.01], dtype=torch.float64)
    (x, y), (xv, yv) = data(1), data(2)
    ahead = Lookahead(model, lambda: model.losses(x, y), [lambda: model.losses(xv, yv)], lr, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = method.meta_gradient(ahead)

    lambdas = method.lambdas.clone().requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = sum(w * loss for w, loss in zip(lambdas, model.losses(x, y, dict(zip(names, params))).values()))
    grads = torch.autograd.grad(total, params, create_graph=True)
    ahead_params = {n: p - lr * g for n, p, g in zip(names, params, grads)}
    (exact,) = torch.autograd.grad(sum(model.losses(xv, yv, ahead_params).values()), lambdas)
    torch.testing.assert_close(found, exact, rtol=1e-4, atol=1e-9 * exact.abs().max().item())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the parameters are put back


def test_lambda_takes_adam_steps():
    method = AutoLambda(TASKS, init=0.2, meta_lr=0.01)
    reference = torch.full((3,), 0.2, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.01)
    for k in range(4):
        gradient = torch.tensor([0.3, -1e-4, 2.0]) * (k + 1)
        method._adam(gradient)
        reference.grad = gradient
        adam.step()
        torch.testing.assert_close(method.lambdas, reference.detach())


def _compose(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=["data.dataset.scenes={train:40,val:8,test:8}", "data.dataset.image_size=32",
                                           *overrides])


def test_only_a_run_that_reads_held_out_batches_holds_them_out():
    plain = build_dataset(_compose(["weighting=ew"]), "train")
    train = build_dataset(_compose(["weighting=auto_lambda"]), "train")
    held = build_dataset(_compose(["weighting=auto_lambda"]), "held_out")
    assert len(plain) == 40 and len(held) == math.ceil(0.1 * 40) and len(train) == 40 - len(held)
    assert not set(train.dataset.indices) & set(held.dataset.indices)
    everything = build_dataset(_compose(["weighting=auto_lambda", "data.held_out=null"]), "held_out")
    assert len(everything) == 40 == len(build_dataset(_compose(["weighting=auto_lambda", "data.held_out=null"]),
                                                      "train"))
    batches = HeldOutBatches(held, 3, seed=0, collate=lambda samples: torch.stack([s["image"] for s in samples]))
    assert torch.equal(batches.batch(5), batches.batch(5)) and not torch.equal(batches.batch(5), batches.batch(6))


@pytest.mark.parametrize("override, message", [
    ("data.held_out=1.5", "data.held_out=1.5: weighting AutoLambda learns on a held-out part"),
    ("weighting.primary=[depth,nomrals]", "primary=\\['depth', 'nomrals'\\] must name some of the run's tasks"),
])
def test_bad_settings_are_refused(mtl_main, tmp_path, override, message):
    ran = mtl_main("train", *TINY, "weighting=auto_lambda", override, f"hydra.run.dir={tmp_path}")
    assert ran.status == 2 and len(re.findall(message, ran.err)) == 1, ran.err


@pytest.mark.slow
def test_resuming_auto_lambda_gives_the_uninterrupted_run(mtl_main, tmp_path):
    args = [*TINY, "weighting=auto_lambda", "trainer.limit_train_batches=2", "logger=console"]
    ok(mtl_main("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(mtl_main("train", *args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'short'}"))
    ok(mtl_main("train", f"resume={tmp_path / 'short' / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=2",
                f"hydra.run.dir={tmp_path / 'resumed'}"))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
            for run in ("straight", "resumed"))
    assert int(a["weighting"]["meta_steps"]) == 4
    for part in ("weighting", "model"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"
