"""Learning to Branch (models/ltb.py): the forward is the tree of its choices, computed here node by node from the
columns' own stages; eval mode is the argmax tree; the hard samples follow softmax(logits) (the Gumbel-max
property) at any temperature; warm-up reads the mean of the parents and leaves the logits alone; `mtl train` logs the
tree, and a resumed run samples what the straight one did."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import TINY, ok

from mtl_cli.build import build_model, build_tasks
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
TASKS = ["segmentation", "depth", "count"]


def build(*overrides: str):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"tasks=[{','.join(TASKS)}]", f"data.dataset.image_size={SIZE}", "architecture=ltb",
                                *overrides])
    torch.manual_seed(0)
    return build_model(cfg, build_tasks(cfg))


def by_hand(model, image: torch.Tensor, mix: torch.Tensor) -> dict[str, torch.Tensor]:
    """The heads on the tree: node t of stage k runs column t's stage k on sum_s mix[k-1, t, s] * node s of k-1."""
    columns = list(model.columns.values())
    nodes = [c.stages[0](c.normalize(image)) for c in columns]
    taps = [[] for _ in columns]
    for k in range(len(columns[0].stages)):
        if k > 0:
            nodes = [columns[t].stages[k](sum(mix[k - 1, t, s] * nodes[s] for s in range(len(columns))))
                     for t in range(len(columns))]
        if k in columns[0].out_indices:
            for t, node in enumerate(nodes):
                taps[t].append(node)
    return {task: model.heads[task](taps[t], image.shape[-2:]) for t, task in enumerate(model.heads)}


def one_hot(parents: list[list[int]]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(parents), len(TASKS)).float()


def assert_outputs_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for task in got:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-6)


def test_eval_mode_runs_the_argmax_tree_and_names_each_tasks_path():
    model = build()
    model.start_epoch(1, 10)
    model.eval()
    stages = model.last_stage
    # one trunk node up to the last stage but one, where count's node branches off; its leaf reads that node
    parents = [[0, 0, 0]] * (stages - 2) + [[0, 0, 0], [0, 0, 1]][-min(stages, 2):]
    with torch.no_grad():
        model.branching.logits.copy_(one_hot(parents) * 3.0 - 1.0)
        image = torch.rand(2, 3, SIZE, SIZE)
        assert_outputs_equal(model(image), by_hand(model, image, one_hot(parents)))
        evaluated = build()  # as mtl eval loads a checkpoint saved after the warm-up: from its state alone
        evaluated.load_state_dict(model.state_dict())
        assert_outputs_equal(evaluated.eval()(image), by_hand(model, image, one_hot(parents)))
    assert model.branching.parents() == parents
    assert model.tree() == ("segmentation " + "0-" * stages + "0, depth " + "0-" * stages + "1, "
                            "count " + "0-" * (stages - 1) + "1-2")


def test_a_training_forward_runs_the_sampled_tree_and_trains_the_logits():
    model = build().train()
    model.start_epoch(1, 10)  # past the warm-up
    torch.manual_seed(3)
    choices = model.branching()
    assert set(choices.unique().tolist()) == {0.0, 1.0} and (choices.sum(-1) == 1).all()  # one parent each
    image = torch.rand(2, 3, SIZE, SIZE)
    torch.manual_seed(3)
    outputs = model(image)
    assert_outputs_equal(outputs, by_hand(model, image, choices.detach()))
    sum(o.square().mean() for o in outputs.values()).backward()
    assert model.branching.logits.grad.abs().sum() > 0  # straight-through: the soft sample's gradient


def test_warm_up_reads_the_mean_of_the_parents_and_leaves_the_logits_alone():
    model = build().train()
    model.start_epoch(0, 10)
    image = torch.rand(2, 3, SIZE, SIZE)
    outputs = model(image)
    mean = torch.full((model.last_stage, len(TASKS), len(TASKS)), 1 / len(TASKS))
    assert_outputs_equal(outputs, by_hand(model, image, mean))
    sum(o.square().mean() for o in outputs.values()).backward()
    assert model.branching.logits.grad is None
    with torch.no_grad():  # evaluated as it trains, also from its state alone (a checkpoint of the warm-up)
        model.branching.logits.normal_()
        evaluated = build()
        evaluated.start_epoch(5, 10)
        evaluated.load_state_dict(model.state_dict())
        assert_outputs_equal(evaluated.eval()(image), by_hand(model.eval(), image, mean))


@pytest.mark.parametrize("epoch", [1, 99])
def test_the_samples_follow_the_softmax_of_the_logits_at_any_temperature(epoch):
    """argmax(logits + Gumbel noise) is distributed as softmax(logits): the temperature shapes the gradient only."""
    model = build("architecture.temperature=5.0").train()
    model.start_epoch(epoch, 100)
    assert model.branching.tau == pytest.approx(5.0 / math.sqrt(epoch + 1))
    logits = torch.tensor([2.0, 0.0, -1.0])
    with torch.no_grad():
        model.branching.logits.copy_(logits.expand_as(model.branching.logits))
    torch.manual_seed(0)
    draws = 2000
    counts = sum(model.branching().detach().sum((0, 1)) for _ in range(draws))
    frequency = counts / (draws * model.last_stage * len(TASKS))
    expected = torch.softmax(logits, 0)
    # binomial standard error at n = draws * stages * tasks >= 12000 is under 0.005
    torch.testing.assert_close(frequency, expected, rtol=0, atol=0.015)


def test_a_bad_setting_is_one_message():
    with pytest.raises(UserError, match=r"architecture.temperature=0 must be above 0"):
        build("architecture.temperature=0")
    with pytest.raises(UserError, match=r"give backbone.out_indices a later stage"):
        build("backbone.out_indices=[0]")


LTB_RUN = [*TINY, "architecture=ltb", "architecture.warmup_epochs=0", "weighting=pcgrad",
           "trainer.limit_train_batches=2", "logger=console"]


def test_mtl_train_logs_the_tree(mtl_main, tmp_path):
    ran = ok(mtl_main("train", *LTB_RUN, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"))
    assert "ltb: epoch 1, tau 5, tree segmentation " in ran.err + ran.out


@pytest.mark.slow
def test_a_resumed_run_samples_as_the_straight_one(mtl_main, tmp_path):
    straight = ok(mtl_main("train", *LTB_RUN, f"hydra.run.dir={tmp_path / 'straight'}"))
    assert "ltb: epoch 2, tau 3.54, tree segmentation " in straight.err + straight.out
    ok(mtl_main("train", *LTB_RUN, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'short'}"))
    ok(mtl_main("train", f"resume={tmp_path / 'short' / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=2",
                f"hydra.run.dir={tmp_path / 'resumed'}"))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["model"]
            for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and "branching.logits" in a
    assert all(torch.equal(a[name], b[name]) for name in a)
