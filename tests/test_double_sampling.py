"""MoDo and SDMGrad: methods that read the task gradients of independent batches (samples), checked against torchjd
and on badly scaled gradients; the loop draws their batches."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY, ok
from torchjd.aggregation import MoDoWeighting, SDMGradWeighting

from mtl_cli.weighting.modo import MoDo
from mtl_cli.weighting.sdmgrad import SDMGrad

TASKS = ["a", "b", "c"]


def batches(seed: int, dtype: torch.dtype, sizes=(1.0, 3.0, 0.5), steps: int = 6, columns: int = 40):
    """`steps` triples of independent task-gradient matrices whose rows have the given sizes."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor(sizes, dtype=torch.float64)[:, None]
    return [[(torch.randn(len(sizes), columns, generator=generator, dtype=torch.float64) * scale).to(dtype)
             for _ in range(3)] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modo_follows_torchjd_step_by_step(dtype):
    ours, theirs = MoDo(TASKS, gamma=0.05, rho=0.1), MoDoWeighting(gamma=0.05, rho=0.1)
    for own, first, second in batches(0, dtype):
        update, weights = ours.combine(own, torch.ones(3), [0, 1, 2], first, second)
        expected = theirs(first.double() @ second.double().T)
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(update, expected.to(dtype) @ own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdmgrad_follows_torchjd_step_by_step(dtype):
    """Where each task's two gradients point alike (here: parallel), torchjd's scale (from G1 G2^T's diagonal) and
    ours (from the rows' norms) agree; so must the weights."""
    ours, theirs = SDMGrad(TASKS, lr=1.0), SDMGradWeighting(lr=1.0)
    for own, first, _ in batches(1, dtype):
        second = first * torch.tensor([[0.5], [2.0], [1.5]], dtype=dtype)
        update, weights = ours.combine(own, torch.ones(3), [0, 1, 2], first, second)
        # theirs divides by (scale^2 + 1e-8), ours by scale^2: fed 1e6 times the matrix, the 1e-8 vanishes
        torch.testing.assert_close(weights, theirs(1e6 * first.double() @ second.double().T), rtol=1e-6, atol=1e-9)
        assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0.3 / 3 / 1.3 - 1e-12).all()


def test_sdmgrad_weights_do_not_depend_on_the_size_of_the_gradients():
    """The official code divides by (scale^2 + 1e-8): gradients below about 1e-4 froze w at uniform."""
    for factor in (1e-7, 1e-3, 1e3):
        plain, scaled = SDMGrad(TASKS, lr=1.0), SDMGrad(TASKS, lr=1.0)
        for own, first, second in batches(2, torch.float32):
            _, expected = plain.combine(own, torch.ones(3), [0, 1, 2], first, second)
            _, weights = scaled.combine(own * factor, torch.ones(3), [0, 1, 2], first * factor, second * factor)
            torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(plain.simplex_weights, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("method", [MoDo(TASKS, gamma=1.0), SDMGrad(TASKS)], ids=["modo", "sdmgrad"])
def test_badly_scaled_gradients_give_a_finite_nonzero_update_on_the_simplex(method):
    for own, first, second in batches(3, torch.float32, sizes=(1e-6, 1.0, 1e3)):
        update, weights = method.combine(own, torch.ones(3), [0, 1, 2], first, second)
        assert torch.isfinite(update).all() and update.abs().max() > 0
        assert (weights >= 0).all() and weights.sum().item() == pytest.approx(1.0)


def test_a_step_with_some_tasks_moves_their_weights_and_keeps_the_others():
    method = MoDo(TASKS, gamma=0.5)
    own, first, second = batches(4, torch.float64)[0]
    method.combine(own[[0, 2]], torch.ones(2), [0, 2], first[[0, 2]], second[[0, 2]])
    assert method.lambdas[1] == pytest.approx(1 / 3) and method.lambdas.sum().item() == pytest.approx(1.0)
    assert method.lambdas[0] != pytest.approx(1 / 3)


def test_the_loop_draws_three_batches_per_step(mtl_main, tmp_path):
    """Six batches of the epoch make two steps; an epoch shorter than one step is refused in one line."""
    args = [*TINY, "weighting=modo", "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_val_batches=1"]
    ok(mtl_main("train", *args, "trainer.limit_train_batches=6", f"hydra.run.dir={tmp_path / 'run'}"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
    refused = mtl_main("train", *args, "trainer.limit_train_batches=2", f"hydra.run.dir={tmp_path / 'short'}")
    assert refused.status == 2 and "reads 3 independent batches per step, but an epoch has 2" in refused.err


@pytest.mark.slow
def test_resuming_modo_gives_the_uninterrupted_run(mtl_main, tmp_path):
    args = [*TINY, "weighting=modo", "data.batch_size=8", "trainer.limit_train_batches=6", "logger=console"]
    ok(mtl_main("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(mtl_main("train", *args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'short'}"))
    ok(mtl_main("train", f"resume={tmp_path / 'short' / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=2",
                f"hydra.run.dir={tmp_path / 'resumed'}"))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
            for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("weighting", "model"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"


def test_sdmgrad_is_finite_when_the_two_batches_disagree():
    """Opposite draws make G1 G2^T's diagonal negative: the official scale (its clamped square roots) is then 0."""
    method = SDMGrad(TASKS)
    for own, first, _ in batches(5, torch.float32, sizes=(1e-6, 1.0, 1e3)):
        update, weights = method.combine(own, torch.ones(3), [0, 1, 2], first, -first)
        assert torch.isfinite(update).all() and weights.sum().item() == pytest.approx(1.0)
