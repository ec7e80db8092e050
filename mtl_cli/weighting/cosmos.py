"""COSMOS: a linear scalarization with a cosine penalty toward a preference.

Ruchte and Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning", ICDM 2021.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import Weighting

F64 = torch.float64


class COSMOS(Weighting):
    """total = sum_t a_t L_t - lambda_ cos(a, L), a the preference (on the simplex) and L the task losses: the
    cosine term pulls the vector of losses toward the preference's direction, so the trade-off follows a.

    It is back-propagated as the weighted sum with the detached weights w_t = d total / d L_t (the same gradient):

        w_t = a_t - lambda_ (a_t / (|a| |L|) - (a . L) L_t / (|a| |L|^3)).

    cos(a, L) does not change when L is scaled, so sum_t w_t L_t = a . L, and a weight can be negative (a task far
    below its share of the losses is pushed back up toward the preference's direction). Where |L| = 0 the cosine
    has no gradient and the weights are a.

    The preference: `preference` (relative values per task, tasks not listed 1.0, rescaled to sum to 1 over the
    tasks present: uniform by default), or, with `concentration` set, a fresh draw from Dirichlet(concentration)
    at every step, as the paper trains, from this weighting's own generator (seeded by `seed`, its state a buffer,
    so a resumed run draws the same preferences) over all tasks, then restricted to those present.

    Departure from the paper: COSMOS also feeds the preference to the network as extra input channels, so that
    one model covers the whole Pareto front and can be asked for any trade-off at test time. That is not done here:
    the model has one input, so it learns one trade-off (a fixed preference) or, when the preference is drawn per
    step, a randomised weighting of the tasks. lambda_ = 2 and concentration 1.2 are the official code's method
    defaults (its Multi-MNIST setting; its other settings range from 0.01 to 8).
    """

    def __init__(self, tasks: Sequence[str], lambda_: float = 2.0, preference: Mapping[str, float] | None = None,
                 concentration: float | Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks)
        if lambda_ < 0:
            raise UserError(f"COSMOS: lambda_={lambda_} must be >= 0 (0 is the linear scalarization alone)")
        if preference is not None and concentration is not None:
            raise UserError("COSMOS: give either a fixed preference or a concentration to draw one each step, not both")
        self.lambda_ = float(lambda_)
        self.preference = per_task(self.tasks, preference, "preference")  # from the config: not state
        self.concentration = None if concentration is None else per_task(self.tasks, concentration, "concentration")
        if (self.preference <= 0).any() or (self.concentration is not None and (self.concentration <= 0).any()):
            raise UserError(f"COSMOS: preference and concentration must be positive for every task; got "
                            f"{preference if preference is not None else concentration}")
        if self.concentration is not None:
            self.register_buffer("generator_state", torch.Generator().manual_seed(int(seed)).get_state())

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = [self.tasks.index(t) for t in losses]
        values = torch.stack([loss.detach() for loss in losses.values()]).to("cpu", F64)
        preference = (self.draw() if self.concentration is not None else self.preference)[index]
        preference = preference / preference.sum()
        weights = cosmos_weights(values, preference, self.lambda_)
        first = next(iter(losses.values()))
        return dict(zip(losses, weights.to(first.device, torch.promote_types(first.dtype, torch.float32))))

    def draw(self) -> torch.Tensor:
        """One preference from Dirichlet(concentration) over all tasks, from the generator kept in the buffer
        (torch's Dirichlet sampler reads the global generator: it runs on a forked copy set to this state)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.generator_state.cpu())
            draw = torch.distributions.Dirichlet(self.concentration).sample()
            self.generator_state.copy_(torch.get_rng_state())
        return draw


def cosmos_weights(values: torch.Tensor, preference: torch.Tensor, lambda_: float) -> torch.Tensor:
    """d/dL [a . L - lambda_ cos(a, L)] at L = values, a = preference."""
    norm_a, norm_l = preference.norm(), values.norm()
    if norm_l == 0:
        return preference.clone()
    cosine_grad = preference / (norm_a * norm_l) - (preference @ values) * values / (norm_a * norm_l**3)
    return preference - lambda_ * cosine_grad


def per_task(tasks: list[str], values: float | Mapping[str, float] | None, what: str,
             default: float = 1.0) -> torch.Tensor:
    """A value per task from a number (every task) or a mapping (tasks not listed get `default`), float64."""
    if values is None or isinstance(values, (int, float)):
        return torch.full((len(tasks),), float(default if values is None else values), dtype=F64)
    values = dict(values)
    unknown = sorted(set(values) - set(tasks))
    if unknown:
        raise UserError(f"weighting.{what} names {unknown}, which are not tasks of this run; tasks: {tasks}")
    return torch.tensor([float(values.get(t, default)) for t in tasks], dtype=F64)
