"""Adversarial robustness per task (mtl_cli/analysis/robustness.py, `mtl eval +robustness=...`): the attacks against
a hand computation and against Captum's PGD, their eps balls, eps=0 against the clean scores, degradation with eps on
a trained model, and the eval.json table."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY_RUN, run_mtl
from mtl_cli.analysis.robustness import Attack, perturb, under_attack
from mtl_cli.build import build_dataset, build_loader, resolve_data
from mtl_cli.engine.batches import limited
from mtl_cli.engine.checkpoint import load_checkpoint
from mtl_cli.engine.records import read_record, scored_metrics
from mtl_cli.engine.state import trained_model
from mtl_cli.errors import UserError
from mtl_cli.report.runs import read_run

TRAINED = [*TINY_RUN, "tasks=[segmentation,count]", "data.dataset.scenes={train:96,val:16,test:8}",
           "data.batch_size=16", "trainer.max_epochs=6", "optimizer.lr=3e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-task run trained long enough (36 steps) that its count head has learned something: val MAE about 0.74,
    where the best constant guess of 1..4 digits scores 1.0. Tests read, never edit it."""
    folder = tmp_path_factory.mktemp("robust_run")
    ran = run_mtl("train", *TRAINED, f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert ran.status == 0, ran
    return folder / "run"


class Linear(nn.Module):
    """output = <w, x> per image: the gradient of its mean over the batch is w / B for every image."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return {"t": (x * self.weight).flatten(1).sum(1)}


def mean_output(outputs):
    return outputs["t"].mean()


def test_fgsm_on_a_linear_model_is_eps_times_the_sign_of_the_gradient():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 4)
    weight[0, 0, :2] = 0.0  # no gradient there: sign 0, the pixel stays
    image = torch.rand(2, 3, 4, 4) * 0.5 + 0.25  # away from 0 and 1: the clamp does not bind at eps 4/255
    model = Linear(weight)
    expected = image + 4 / 255 * weight.sign()
    assert torch.equal(Attack("fgsm", (4.0,)).perturb(model, mean_output, image, 4.0), expected)
    # scale-free: a loss 1e-12 times smaller gives the same step (no threshold on small gradients)
    assert torch.equal(perturb(model, lambda o: mean_output(o) * 1e-12, image, 4 / 255), expected)
    l2 = Attack("fgsm", (64.0,), norm="l2").perturb(model, mean_output, image, 64.0)
    torch.testing.assert_close(l2, image + 64 / 255 * weight / weight.norm(), rtol=0, atol=1e-6)


def test_fgsm_clamps_to_the_unit_range():
    weight = torch.ones(3, 2, 2)
    image = torch.full((1, 3, 2, 2), 0.99)
    assert torch.equal(perturb(Linear(weight), mean_output, image, 8 / 255), torch.ones_like(image))


def small_model():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = trunk

        def forward(self, x):
            return {"seg": self.trunk(x)}
    return Model().eval()


def seg_loss(target):
    return lambda outputs: nn.functional.cross_entropy(outputs["seg"], target)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_its_eps_ball_and_the_unit_range(norm):
    model = small_model()
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(4, 3, 8, 8, generator=generator)
    image[:, :, :2] = torch.randint(0, 2, (4, 3, 2, 8), generator=generator).float()  # at the bounds, to be clamped
    target = torch.randint(0, 2, (4, 8, 8), generator=generator)
    eps = 16.0 if norm == "linf" else 255.0
    attack = Attack("pgd", (eps,), norm, steps=5, step_size=3 * eps, random_start=True)  # steps overshoot the ball
    attacked = attack.perturb(model, seg_loss(target), image, eps, torch.Generator().manual_seed(0))
    delta = (attacked - image).flatten(1)
    assert attacked.min() >= 0 and attacked.max() <= 1
    if norm == "linf":
        assert delta.abs().max() <= eps / 255 + 1e-6
        assert delta.abs().max() >= eps / 255 - 1e-6  # the attack uses its budget
    else:
        assert (delta.norm(dim=1) <= eps / 255 * (1 + 1e-5)).all()
        assert (delta.norm(dim=1) >= eps / 255 * 0.5).all()
    with torch.no_grad():
        assert seg_loss(target)(model(attacked)) > seg_loss(target)(model(image))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_the_image_exactly(norm):
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    attack = Attack("pgd", (0.0,), norm, steps=3, step_size=4.0, random_start=True)
    assert torch.equal(attack.perturb(small_model(), seg_loss(target), image, 0.0, torch.Generator()), image)


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_linf_pgd_equals_captums():
    robust = pytest.importorskip("captum.robust", reason="captum is not installed: pip install captum")
    model = small_model()
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(3, 3, 8, 8, generator=generator)
    target = torch.randint(0, 2, (3, 8, 8), generator=generator)
    ours = perturb(model, seg_loss(target), image, 8 / 255, steps=4, step_size=3 / 255)
    captum_pgd = robust.PGD(model, lambda outputs, t: seg_loss(t)(outputs).reshape(1), lower_bound=0, upper_bound=1)
    captum_pgd.fgsm.zero_thresh = 0.0  # Captum's default leaves pixels with |grad| <= 1e-6 unperturbed
    theirs = captum_pgd.perturb(image, radius=8 / 255, step_size=3 / 255, step_num=4, target=target)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    assert not torch.equal(ours, image)


def test_settings_are_checked():
    assert Attack.of(OmegaConf.create({"name": "pgd", "eps": [1, 2], "steps": 3})) == Attack(
        "pgd", (1.0, 2.0), "linf", 3, None, True)
    bad = [({"name": "pgd", "eps": [1], "norm": "l3"}, "robustness.norm"),
           ({"name": "pgd", "eps": [-1]}, "robustness.eps"),
           ({"name": "pgd", "eps": []}, "robustness.eps"),
           ({"name": "pgd", "eps": [1], "steps": 0}, "robustness.steps"),
           ({"name": "fgsm", "eps": [1], "steps": 3}, "robustness.steps is not a setting of fgsm"),
           ({"name": "cw", "eps": [1]}, "+robustness=pgd")]
    for node, message in bad:
        with pytest.raises(UserError, match=message.replace("+", r"\+")):
            Attack.of(OmegaConf.create(node))


def loaded(run):
    checkpoint = load_checkpoint(run / "checkpoints" / "best.pt", "eval")
    cfg = resolve_data(OmegaConf.create(checkpoint["config"]))
    tasks, model = trained_model(cfg, checkpoint, torch.device("cpu"))
    return cfg, tasks, model


@pytest.mark.slow  # trains a model for ~36 steps: too long for the default tier on two shared cores
def test_the_attacked_tasks_metric_degrades_monotonically_with_eps(trained):
    cfg, tasks, model = loaded(trained)
    loader = build_loader(cfg, build_dataset(cfg, "val"))
    attack = Attack("pgd", (0.0, 1.0, 2.0, 4.0, 8.0), "linf", steps=3, random_start=False)
    scored = under_attack(model, {"count": tasks["count"]}, limited(loader, 1), torch.device("cpu"), attack)
    mae = [scored[f"{eps:g}"]["count"]["count"]["mae"] for eps in attack.eps]
    assert mae[0] < 0.9, f"the model did not learn to count (val MAE {mae[0]:.3f}): the test needs a trained one"
    assert all(a < b for a, b in zip(mae, mae[1:])), mae
    assert mae[-1] > 2 * mae[0], mae


def test_mtl_eval_writes_the_robustness_table(tiny_run, mtl_main, tmp_path):
    ran = mtl_main("eval", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", "+robustness=pgd", "robustness.eps=[0,2]",
                   "robustness.steps=2", "data.batch_size=2", "trainer.limit_val_batches=1", "hydra.run.dir=ev")
    assert ran.status == 0, ran  # one batch of 2 images: on 8, this test took 48 s on two busy cores
    record = json.loads((tmp_path / "ev" / "eval.json").read_text())
    robustness = record["robustness"]
    assert robustness["attack"]["name"] == "pgd" and robustness["attack"]["steps"] == 2
    assert robustness["attack"]["eps"] == [0, 2]
    assert list(robustness["eps"]) == ["0", "2"]
    for eps, rows in robustness["eps"].items():
        assert list(rows) == [*record["metrics"], "all"]
        for scores in rows.values():
            assert set(scores) == set(record["metrics"])
    for scores in robustness["eps"]["0"].values():
        assert scores == record["metrics"]  # eps 0: the clean scores, exactly
    assert robustness["eps"]["2"]["all"] != record["metrics"]
    assert "under attack" in ran.out + ran.err
    # the run records' readers (mtl report) still read the record
    assert scored_metrics(read_record(tmp_path / "ev" / "eval.json")) == record["metrics"]
    assert read_run(tmp_path / "ev").status in ("finished", "unfinished")


def test_mtl_eval_refuses_a_bad_attack_setting(tiny_run, mtl_main):
    ran = mtl_main("eval", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", "+robustness=fgsm", "+robustness.steps=3",
                   "hydra.run.dir=ev")
    assert ran.status == 2
    assert "robustness.steps is not a setting of fgsm" in ran.err


def test_robustness_on_mtl_train_is_refused_before_the_run_dir_is_made(mtl_main, tmp_path):
    """Saved with a run, the node would make every later plain mtl eval of its checkpoints attack it."""
    ran = mtl_main("train", "+robustness=pgd", f"hydra.run.dir={tmp_path / 'run'}")
    assert ran.status == 2 and "attacks a trained model in mtl eval, not in mtl train" in ran.err, ran
    assert not (tmp_path / "run").exists()
