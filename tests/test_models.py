"""Backbones and architectures: every architecture on one backbone of every family, at a tiny input size, and the
properties that define each (stl shares nothing, cross-stitch at identity keeps columns apart, MTAN and MMoE keep
one branch per task); stage cutting, frozen stages, norm swaps, weights from a file, the model summary."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.models import get_model
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FrozenBatchNorm2d

from mtl_cli.build import build_model, build_tasks
from mtl_cli.errors import UserError
from mtl_cli.models.backbones import small_cnn, torchvision_backbone
from mtl_cli.models.stages import split_stages
from mtl_cli.models.summary import summarize
from mtl_cli.paths import config_dir
from mtl_cli.weighting.gradients import FeatureCut
from test_cli import TINY, ok, run_dirs, scalar_tags

SIZE = 32
TASKS = ["segmentation", "count"]
ARCHITECTURES = ["stl", "mtan", "cross_stitch", "mmoe", "cgc", "pad_net", "mti_net", "ple", "dselect_k", "ltb"]
BACKBONES = sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml"))
# The default run: every architecture on NCHW maps of several stages (small_cnn); the two that run the stages
# themselves on the other two layouts a stage can pass on, ltb on NHWC maps (Swin), cross-stitch on tokens (ViT);
# test_configs builds and steps one backbone of each family with hard sharing. `-m slow` runs every architecture on
# every backbone option.
CHEAP = {(a, "small_cnn") for a in ARCHITECTURES} | {("ltb", "swin_t"), ("cross_stitch", "vit_b_16")}


def build(*overrides: str, tasks=TASKS):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"tasks=[{','.join(tasks)}]", f"data.dataset.image_size={SIZE}", *overrides])
    torch.manual_seed(0)
    built = build_tasks(cfg)
    return build_model(cfg, built), built


def step(model, image):
    """A training step's forward and backward as the loop runs it: heads on the cut features."""
    cut = FeatureCut(model.encode(image))
    outputs = model.decode(cut.leaves, image.shape[-2:])
    return cut, outputs


@pytest.mark.parametrize("architecture, backbone", [
    pytest.param(a, b, id=f"{a}-{b}", marks=() if (a, b) in CHEAP else pytest.mark.slow)
    for a in ARCHITECTURES for b in BACKBONES])
def test_every_architecture_runs_forward_and_backward_on_every_backbone(architecture, backbone):
    model, _ = build(f"architecture={architecture}", f"backbone={backbone}")
    model.start_epoch(1, 2)  # past ltb's warm-up: its choices are sampled and its logits trained
    image = torch.rand(2, 3, SIZE, SIZE)
    cut, outputs = step(model.train(), image)
    assert set(outputs) == set(TASKS)
    assert outputs["segmentation"].shape == (2, 11, SIZE, SIZE) and outputs["count"].shape == (2, 1)
    # intermediate predictions (pad_net, mti_net): only their own losses reach their heads
    auxiliary = [p for ps in getattr(outputs, "intermediate", {}).values() for p in ps]
    (outputs["segmentation"].square().mean() + outputs["count"].square().mean() + sum(a.mean() for a in auxiliary)
     ).backward()
    cut.backward_trunk()
    # (None, not zero: stochastic depth in Swin and ConvNeXt drops whole blocks of a step at random)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():  # eval mode and the plain forward agree with the cut one
        plain = model(image)
        cut_again = model.decode(model.encode(image), image.shape[-2:])
    torch.testing.assert_close(plain["segmentation"], cut_again["segmentation"])


def test_cgc_gates_mix_shared_and_own_experts_and_a_task_never_reaches_anothers():
    model, _ = build("architecture=cgc", "architecture.experts=2", "architecture.task_experts=2")
    stages = len(model.backbone.channels)
    assert model.gates["segmentation"].out_features == 4  # 2 shared + 2 of its own
    assert [sorted(e) for e in model.own_experts["segmentation"]] == [[str(j) for j in range(stages)]] * 2
    assert [sorted(e) for e in model.own_experts["count"]] == [[str(stages - 1)]] * 2  # its head reads the coarsest
    cut, outputs = step(model.train(), torch.rand(2, 3, SIZE, SIZE))
    outputs["count"].mean().backward()
    cut.backward_trunk()
    assert all(p.grad is None for p in model.own_experts["segmentation"].parameters())
    assert all(p.grad is not None and p.grad.any() for p in model.own_experts["count"].parameters())
    assert all(p.grad is not None for e in model.experts for p in e[stages - 1].parameters())  # shared, read


def test_stl_trains_one_separate_network_per_task():
    model, _ = build("architecture=stl", tasks=["segmentation", "depth", "count"])
    parts = model.parts()
    assert parts["shared"] == []
    owned = {task: {id(p) for m in modules for p in m.parameters()} for task, modules in parts.items() if task != "shared"}
    assert sum(map(len, owned.values())) == len({id(p) for p in model.parameters()})  # every parameter owned once
    for a in owned:
        for b in owned:
            assert a == b or not owned[a] & owned[b], (a, b)
    # and nothing flows between them: task t's loss reaches no parameter of another task
    cut, outputs = step(model.train(), torch.rand(2, 3, SIZE, SIZE))
    outputs["depth"].mean().backward()
    cut.backward_trunk()
    for task, modules in parts.items():
        grads = [p.grad for m in modules for p in m.parameters()]
        if task == "depth":
            assert all(g is not None for g in grads)
        else:
            assert all(g is None or not g.any() for g in grads), task


@pytest.mark.parametrize("self_weight,independent", [(1.0, True), (0.9, False)])
def test_cross_stitch_at_identity_keeps_the_columns_independent(self_weight, independent):
    model, _ = build("architecture=cross_stitch", f"architecture.self_weight={self_weight}")
    alpha = model.units[0].alpha
    assert alpha.shape == (2, 2, model.columns["segmentation"].channels[0] // 2)  # stage 0 of small_cnn: 16 ch
    torch.testing.assert_close(alpha[0, 0], torch.full_like(alpha[0, 0], self_weight))
    torch.testing.assert_close(alpha.sum(1), torch.ones_like(alpha.sum(1)))  # rows are convex combinations
    cut, outputs = step(model.train(), torch.rand(2, 3, SIZE, SIZE))
    outputs["count"].sum().backward()
    cut.backward_trunk()
    other = [p.grad for p in model.columns["segmentation"].parameters()]
    own = [p.grad for p in model.columns["count"].parameters()]
    assert all(g is not None and g.any() for g in own)
    reached = any(g is not None and g.any() for g in other)
    assert reached != independent


def test_mtan_attends_per_task_and_mmoe_gates_mix_the_shared_experts():
    model, _ = build("architecture=mtan")
    image = torch.rand(2, 3, SIZE, SIZE)
    shared = model.encode(image)
    assert len(model.attention) == 2 and model.attention["segmentation"] is not model.attention["count"]
    attended = model.attention["count"](shared)
    assert [a.shape for a in attended] == [s.shape for s in shared]
    ratio = torch.cat([(a / s)[s.abs() > 1e-3].flatten() for a, s in zip(attended, shared)])
    assert ratio.min() >= 0 and ratio.max() <= 1  # a sigmoid mask on the shared features

    model, _ = build("architecture=mmoe", "architecture.experts=3")
    features = model.encode(image)
    assert len(features) == 3 * len(model.backbone.channels) + 1  # 3 experts per stage, then the gates' input
    gate = torch.softmax(model.gates["count"](features[-1].mean((2, 3))), dim=1)
    torch.testing.assert_close(gate.sum(1), torch.ones(2))
    # with one expert the gate is 1 and the heads read that expert: MMoE is then hard sharing plus an adapter
    model, _ = build("architecture=mmoe", "architecture.experts=1")
    model.eval()
    with torch.no_grad():
        features = model.encode(image)
        expected = model.heads["segmentation"](features[:-1], (SIZE, SIZE))
        torch.testing.assert_close(model(image)["segmentation"], expected)


def test_stages_run_one_after_another_give_the_traced_models_maps():
    model = get_model("resnet18").eval()
    nodes = ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    traced = create_feature_extractor(model, return_nodes=nodes)
    stages = split_stages(traced, "resnet18")
    x = torch.rand(1, 3, 64, 64)
    expected = list(traced(x).values())
    with torch.no_grad():
        for stage, want in zip(stages, expected):
            x = stage(x)
            torch.testing.assert_close(x, want)


def test_a_network_whose_stages_do_not_form_a_chain_cannot_be_cut():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a = self.a(x)
            return self.c(self.b(a) + a)  # c's input reads a, from before stage b's output

    traced = create_feature_extractor(Skip(), return_nodes=["a", "b", "c"])
    with pytest.raises(UserError, match="cannot be cut into stages"):
        split_stages(traced, "skip")
    assert isinstance(split_stages(create_feature_extractor(Skip(), return_nodes=["a", "c"]), "skip")[1],
                      fx.GraphModule)


def test_frozen_stages_get_no_gradient_and_keep_their_statistics():
    backbone = small_cnn(frozen_stages=2)
    frozen, trained = backbone.stages[:2], backbone.stages[2:]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    backbone.train()
    assert not any(m.training for stage in frozen for m in stage.modules())
    assert all(m.training for stage in trained for m in stage.modules())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    sum(m.mean() for m in backbone(torch.rand(4, 3, SIZE, SIZE))).backward()
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    with pytest.raises(UserError, match="frozen_stages=5"):
        small_cnn(frozen_stages=5)


def test_norm_choice_replaces_batch_norm_and_keeps_what_it_can():
    torch.manual_seed(0)
    reference = small_cnn().eval()
    for module in reference.modules():  # statistics worth keeping
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    torch.manual_seed(0)
    frozen = small_cnn(norm="frozen_batch_norm")
    frozen.load_state_dict(reference.state_dict(), strict=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 8
    group = small_cnn(norm="group_norm")
    assert all(m.num_groups == min(32, m.num_channels) for m in group.modules() if isinstance(m, nn.GroupNorm))
    # frozen batch norm computes what batch norm computes in eval mode, whatever the mode
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                swapped = frozen.get_submodule(name)
                swapped.running_mean.copy_(module.running_mean)
                swapped.running_var.copy_(module.running_var)
        x = torch.rand(2, 3, SIZE, SIZE)
        for a, b in zip(reference(x), frozen.train()(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="no batch norm"):
        torchvision_backbone("convnext_tiny", ["features.1"], norm="group_norm")
    with pytest.raises(UserError, match="frozen_batch_norm"):
        small_cnn(norm="instance")


def test_weights_load_from_a_local_file_and_bad_files_are_named(tmp_path):
    torch.manual_seed(1)
    source = get_model("resnet18")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "r18.pth")  # a wrapped state dict loads too
    backbone = torchvision_backbone("resnet18", ["maxpool", "layer1"], weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(backbone.stages[1].get_submodule("layer1.0.conv1").weight, source.layer1[0].conv1.weight)
    with pytest.raises(UserError, match="no such file"):
        torchvision_backbone("resnet18", ["layer1"], weights=str(tmp_path / "missing.pth"))
    torch.save(get_model("mobilenet_v3_small").state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit resnet18"):
        torchvision_backbone("resnet18", ["layer1"], weights=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch state dict"):
        torchvision_backbone("resnet18", ["layer1"], weights=str(tmp_path / "junk.pth"))


def test_vit_weights_for_224_pixels_load_at_another_input_size(tmp_path):
    torch.manual_seed(0)
    source = get_model("vit_b_16")  # 224 x 224: 14 x 14 patches
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    backbone = torchvision_backbone("vit_b_16", ["encoder.layers.encoder_layer_0"], weights=str(tmp_path / "vit.pth"),
                                    layout="tokens", image_size=SIZE)
    assert backbone.channels == [768] and backbone.strides == [16]
    torch.testing.assert_close(backbone.stages[0].conv_proj.weight, source.conv_proj.weight)


def test_summary_counts_parameters_and_macs_by_hand():
    model, _ = build("architecture=hps", tasks=["count"])
    rows = {row["part"]: row for row in summarize(model, (SIZE, SIZE))}
    # small_cnn: per stage two 3x3 convs, the first halving the size: MACs = c_in * c_out * 9 * h * w
    macs, c_in, side = 0, 3, SIZE
    for width in (16, 32, 64, 128):
        side //= 2
        macs += (c_in * width + width * width) * 9 * side * side
        c_in = width
    assert rows["shared"]["macs"] == macs
    assert rows["count"]["macs"] == 256 * 128 + 128 * 1  # the pooled head's two linear layers
    assert rows["total"]["macs"] == macs + rows["count"]["macs"]
    assert rows["total"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert rows["shared"]["parameters"] + rows["count"]["parameters"] == rows["total"]["parameters"]


@pytest.mark.slow  # a longer variant; the default run checks the same more cheaply
def test_every_architecture_trains_from_the_command_line_and_reports_its_summary(mtl_main, tmp_path):
    ok(mtl_main("train", "-m", "architecture=stl,mtan,cross_stitch,mmoe", *TINY, "trainer.max_epochs=1"))
    runs = run_dirs(tmp_path / "multirun")
    assert len(runs) == 4
    for run in runs:
        final = json.loads((run / "metrics.json").read_text())["final"]
        assert set(final["metrics"]) == {"segmentation", "depth", "normals", "count"}, run
        assert "text:model/text_summary" in scalar_tags(run)
        log = (run / "train.log").read_text()
        assert "MACs / image" in log and "shared" in log


def test_summary_counts_vit_attention_by_hand():
    """ViT-B/16 at 32 px: 4 patches + the class token. nn.MultiheadAttention's fused eval kernel must not hide
    its projections from the count."""
    backbone = torchvision_backbone("vit_b_16", ["encoder.layers.encoder_layer_11"], layout="tokens", image_size=SIZE)
    tokens, width, layers = 5, 768, 12
    patch_embedding = width * 3 * 16 * 16 * 4
    linear = tokens * (4 * width * width + 2 * width * 4 * width)  # q, k, v, out; the MLP's two layers
    attention = 2 * tokens * tokens * width  # q k^T and (attention) v, all heads
    (row, _) = summarize(backbone, (SIZE, SIZE))
    assert row["macs"] == patch_embedding + layers * (linear + attention)


@pytest.mark.slow  # 5 s: two ViT-B/16 models; test_summary_counts_vit_attention_by_hand counts ViT in the default run
def test_summary_counts_a_frozen_vit_the_same_under_any_sdpa_backend():
    """Frozen weights send nn.MultiheadAttention to its fused eval kernel even with autograd on, and the caller's
    choice of attention kernel reaches the summary: neither may change the count."""
    trainable = torchvision_backbone("vit_b_16", ["encoder.layers.encoder_layer_11"], layout="tokens", image_size=SIZE)
    frozen = torchvision_backbone("vit_b_16", ["encoder.layers.encoder_layer_11"], layout="tokens", image_size=SIZE,
                                  frozen_stages=1)
    (expected, _) = summarize(trainable, (SIZE, SIZE))
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            (row, _) = summarize(frozen, (SIZE, SIZE))
        assert (row["macs"], row["trainable"]) == (expected["macs"], 0), backend
    assert torch.backends.mha.get_fastpath_enabled()  # the summary leaves the setting as it found it
