"""The MultiTaskModel contract (models/base.py): build_model refuses a decode that reaches the trunk or shares a
module between tasks undeclared; every architecture passes it; forward_cut computes forward's outputs from the
cut features; the check changes nothing in the model."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mtl_cli.build import build_model, build_tasks
from mtl_cli.errors import UserError
from mtl_cli.models.base import reached_parameters
from mtl_cli.models.hps import HardSharing
from mtl_cli.paths import config_dir

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
TASKS = ["segmentation", "count"]
ARCHITECTURES = ["hps", "stl", "mtan", "cross_stitch", "mmoe", "cgc", "pad_net", "mti_net", "ple", "dselect_k", "ltb"]
# resnet18 (a torchvision backbone cut into stages) with a plain, a columned and an expert architecture; -m slow: all
ON_RESNET = {"hps", "cross_stitch", "mmoe"}


def config(*overrides: str):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", [f"tasks=[{','.join(TASKS)}]", f"data.dataset.image_size={SIZE}", *overrides])


def build(*overrides: str):
    cfg = config(*overrides)
    torch.manual_seed(0)
    return build_model(cfg, build_tasks(cfg))


class TrunkInDecode(HardSharing):
    """Wrong: a temperature declared as trunk (shared_parameters) but applied in decode."""

    def __init__(self, backbone, heads):
        super().__init__(backbone, heads)
        self.temperature = nn.Parameter(torch.ones(()))

    def shared_parameters(self):
        yield from self.backbone.parameters()
        yield self.temperature

    def decode(self, features, size):
        return {task: out / self.temperature for task, out in super().decode(features, size).items()}


class NeckInDecode(HardSharing):
    """Wrong: a neck that every task's head reads, placed in decode (so every gradient method takes it for a head
    of each task); right once declared in decode_shared_parameters()."""

    declare = False

    def __init__(self, backbone, heads):
        super().__init__(backbone, heads)
        self.neck = nn.Conv2d(self.backbone.channels[-1], self.backbone.channels[-1], 1)

    def decode(self, features, size):
        return super().decode([*features[:-1], self.neck(features[-1])], size)

    def decode_shared_parameters(self):
        return self.neck.parameters() if self.declare else iter(())


class DeclaredNeck(NeckInDecode):
    declare = True


class NeckNeedsAnImage(NeckInDecode):
    """NeckInDecode, scaled by the batch's largest value: a reduction that an empty batch cannot take."""

    def decode(self, features, size):
        return super().decode([f / f.abs().amax().clamp(min=1e-6) for f in features], size)


def test_a_decode_that_uses_a_trunk_parameter_is_refused_by_mtl_train(mtl_main):
    r = mtl_main("train", "architecture._target_=test_model_contract.TrunkInDecode", f"data.dataset.image_size={SIZE}",
                 "trainer.progress=none", "hydra.run.dir=run")
    assert r.status == 2
    assert ("mtl train: error: architecture TrunkInDecode: decode uses the trunk parameter temperature (for "
            "segmentation, depth, normals, count); the task outputs must come from encode's features alone: compute "
            "it in encode") in r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize("wrong", ["NeckInDecode", "NeckNeedsAnImage"])
def test_a_decode_module_shared_by_several_tasks_is_refused(wrong):
    with pytest.raises(UserError) as refused:
        build(f"architecture._target_=test_model_contract.{wrong}")
    assert str(refused.value).startswith(f"architecture {wrong}: the decode parameter neck.weight serves several tasks "
                                         "(segmentation, count), so every gradient method would treat it")
    assert "decode_shared_parameters()" in str(refused.value) and "\n" not in str(refused.value)


def test_the_check_runs_under_no_grad_too_and_a_declared_shared_decoder_passes():
    model = build("architecture._target_=test_model_contract.DeclaredNeck")
    model.declare = False
    with torch.no_grad(), pytest.raises(UserError, match="the decode parameter neck.weight serves several tasks"):
        model.check_contract()


def test_an_architecture_that_is_not_a_multitask_model_is_refused():
    with pytest.raises(UserError, match=r"^architecture torch.nn.Identity builds Identity, not a "
                                        r"mtl_cli.models.base.MultiTaskModel: subclass it \(README, Extending\)$"):
        build("architecture._target_=torch.nn.Identity")


@pytest.mark.parametrize("architecture, backbone", [
    pytest.param(a, b, id=f"{a}-{b}", marks=() if b == "small_cnn" or a in ON_RESNET else pytest.mark.slow)
    for a in ARCHITECTURES for b in ("small_cnn", "resnet18")])
def test_the_architectures_pass_and_forward_cut_gives_forwards_outputs_from_the_cut(architecture, backbone):
    model = build(f"architecture={architecture}", f"backbone={backbone}").train()
    model.start_epoch(1, 2)  # past ltb's warm-up: its choices are sampled and its logits trained
    # the check (run by build_model) changed nothing: parameters, statistics, mode, random stream
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.check_contract()
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())

    image = torch.rand(2, 3, SIZE, SIZE)
    torch.manual_seed(1)  # the same draws for both forwards (ltb samples its tree)
    outputs, cut = model.forward_cut(image)
    torch.manual_seed(1)
    plain = model(image)
    assert set(outputs) == set(plain) == set(TASKS)
    assert all(torch.equal(outputs[t], plain[t]) for t in TASKS)
    # the outputs read the cut's leaves, not the trunk; the trunk is reached through the cut alone
    shared = {id(p) for p in model.shared_parameters()}
    assert all(x.is_leaf and x.requires_grad for x in cut.inputs)
    assert not reached_parameters(outputs.values()) & shared
    assert reached_parameters(plain.values()) & shared
    sum(o.square().mean() for o in outputs.values()).backward()
    cut.backward_trunk()
    assert all(p.grad is not None for p in model.shared_parameters())
