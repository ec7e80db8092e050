"""weighting.groups: the shared parameters' groups (weighting/groups.py) and per-group aggregation, checked against
torchjd's UPGrad applied to each group's columns on its own."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_gradients import cut_forward
from torchjd.aggregation import UPGrad as TorchjdUPGrad

from mtl_cli.build import build_dataset, build_loader, build_model, build_tasks, build_weighting
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.weighting.gradients import task_gradients
from mtl_cli.weighting.groups import column_groups, group_key


def compose_train(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=["data.batch_size=4", "data.dataset.scenes.train=8",
                                           "data.dataset.image_size=32", *overrides])


@pytest.fixture(scope="module")
def setup():
    cfg = compose_train([])
    torch.manual_seed(0)
    tasks = build_tasks(cfg)
    batch = next(iter(build_loader(cfg, build_dataset(cfg, "train"))))
    return tasks, build_model(cfg, tasks).train(), batch


def test_group_keys():
    assert group_key("backbone.stages.2.0.conv1.weight", "stage") == "backbone.stages.2"
    assert group_key("backbone.stages.2.0.conv1.weight", "layer") == "backbone.stages.2.0.conv1"
    assert group_key("experts.1.3.weight", "stage") == "experts.1"
    assert group_key("stem.weight", "stage") == "stem"


def test_groups_tile_the_shared_columns_in_order(setup):
    _, model, _ = setup
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    total = sum(p.numel() for p in shared)
    for level in ("stage", "layer"):
        found = column_groups(model, level)
        assert found[0][1].start == 0 and found[-1][1].stop == total
        assert all(a[1].stop == b[1].start for a, b in zip(found, found[1:]))
    stages = column_groups(model, "stage")
    names = {id(p): n for n, p in model.named_parameters()}
    by_stage = {}
    for p in shared:
        by_stage.setdefault(group_key(names[id(p)], "stage"), 0)
        by_stage[group_key(names[id(p)], "stage")] += p.numel()
    assert [(k, s.stop - s.start) for k, s in stages] == list(by_stage.items())
    layers = column_groups(model, "layer")
    owners = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if id(p) in {id(q) for q in shared}}
    assert len(layers) == len(owners) > len(stages) > 1


def test_each_group_is_aggregated_on_its_own(setup):
    tasks, model, batch = setup
    upgrad = ["weighting=upgrad", "weighting.norm_eps=1e-4"]  # torchjd's threshold
    weighting = build_weighting(compose_train([*upgrad, "weighting.groups=stage"]), tasks, model)
    cut, losses = cut_forward(model, tasks, batch)
    matrix = task_gradients(list(losses.values()), model, cut, "params").matrix
    update, weights = weighting.combine_groups(matrix, torch.ones(len(losses)), list(range(len(losses))))
    reference = TorchjdUPGrad()
    expected = torch.cat([reference(matrix[:, columns].double()) for columns in weighting.columns])
    # torchjd solves with quadprog, ours by KKT systems: they agree to 2e-4 of the largest entry
    torch.testing.assert_close(update.double(), expected, rtol=0, atol=1e-3 * expected.abs().max().item())
    whole = build_weighting(compose_train(upgrad), tasks, model)
    assert not torch.allclose(whole.combine_groups(matrix, torch.ones(len(losses)), list(range(len(losses))))[0],
                              update, rtol=1e-3)  # on this model the groups do change the update
    assert weights.shape == (len(losses),)


def test_gradvac_keeps_targets_per_group_and_they_survive_a_checkpoint(setup):
    tasks, model, batch = setup
    cfg = compose_train(["weighting=gradvac", "weighting.groups=layer", "weighting.beta=0.5"])
    weighting = build_weighting(cfg, tasks, model)
    cut, losses = cut_forward(model, tasks, batch)
    weighting.backward(losses, model, torch.amp.GradScaler("cpu", enabled=False), cut)
    targets = torch.stack([part.targets for part in weighting.parts])
    assert len(weighting.parts) > 2 and not torch.allclose(targets[0], targets[1])
    restored = build_weighting(cfg, tasks, model)
    restored.load_state_dict(weighting.state_dict())
    assert torch.equal(torch.stack([part.targets for part in restored.parts]), targets)


@pytest.mark.parametrize("overrides, message", [
    (["weighting=uw", "+weighting.groups=layer"], "UncertaintyWeighting weighs the losses"),
    (["weighting=pcgrad", "weighting.groups=block"], "weighting.groups='block' is not one of whole, stage, layer"),
    (["weighting=pcgrad", "weighting.groups=layer", "weighting.grad_target=representation"], "use grad_target=params"),
])
def test_groups_that_cannot_apply_are_refused(setup, overrides, message):
    tasks, model, _ = setup
    with pytest.raises(UserError, match=message):
        build_weighting(compose_train(overrides), tasks, model)
