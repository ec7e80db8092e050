"""Every packaged config composes, resolves and builds into parts that run.

The options of each config group are discovered from the YAML files in configs/<group>/, so a new option is
covered as soon as it is added. Each is composed into `train` with Hydra's compose API, resolved whole, built with
the real builders of mtl_cli.build (tasks, model, weighting, optimizer, scheduler, dataset, logger) and run for
one training step on a tiny batch of the embedded data, checking every task's output against its target.
"""

import datetime
import itertools
import math
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from mtl_cli.build import (build_dataset, build_model, build_optimizer, build_scheduler, build_tasks,
                           build_weighting, instantiate)
from mtl_cli.data.collate import collate
from mtl_cli.data.held_out import HeldOut
from mtl_cli.errors import UserError
from mtl_cli.models.heads import DenseHead, PooledHead
from mtl_cli.paths import config_dir
from mtl_cli.runtime import autocast, pick_device
from mtl_cli.engine.batches import Scores
from mtl_cli.engine.monitor import Monitor
from mtl_cli.weighting.base import Lookahead
from mtl_cli.weighting.gradients import FeatureCut

CONFIGS = config_dir()
SIZE, BATCH = 32, 2
TINY_DATA = ["data.dataset.scenes={train:8,val:4,test:4}", f"data.dataset.image_size={SIZE}"]

# What the torchvision and small backbones give when tapped as configured: channels and strides of each map.
# (torchvision's papers and model cards give these widths; the strides are the stages' downsampling.)
S4_32 = [4, 8, 16, 32]
KNOWN_BACKBONES = {
    "small_cnn": ([32, 64, 128], [4, 8, 16]),
    "resnet18": ([64, 128, 256, 512], S4_32),
    "resnet34": ([64, 128, 256, 512], S4_32),
    "resnet50": ([256, 512, 1024, 2048], S4_32),
    "resnet101": ([256, 512, 1024, 2048], S4_32),
    "mobilenet_v3_small": ([16, 24, 48, 576], S4_32),
    "mobilenet_v3_large": ([24, 40, 112, 960], S4_32),
    "efficientnet_b0": ([24, 40, 112, 320], S4_32),
    "efficientnet_b1": ([24, 40, 112, 320], S4_32),
    "efficientnet_b2": ([24, 48, 120, 352], S4_32),
    "efficientnet_b3": ([32, 48, 136, 384], S4_32),
    "convnext_tiny": ([96, 192, 384, 768], S4_32),
    "convnext_small": ([96, 192, 384, 768], S4_32),
    "regnet_y_400mf": ([48, 104, 208, 440], S4_32),
    "regnet_y_800mf": ([64, 144, 320, 784], S4_32),
    "regnet_y_1_6gf": ([48, 120, 336, 888], S4_32),
    "regnet_y_3_2gf": ([72, 216, 576, 1512], S4_32),
    "swin_t": ([96, 192, 384, 768], S4_32),
    "vit_b_16": ([768], [16]),
}
# Larger sizes of a family the default run builds in its smallest size (the same code, more channels): `-m slow`.
LARGER_SIZES = {"resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_b1", "efficientnet_b2",
                "efficientnet_b3", "convnext_small", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf"}


def groups():
    return sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def task_package(option):
    """The package a task config writes to (its `# @package` line): two options with one package are exclusive."""
    first = (CONFIGS / "tasks" / f"{option}.yaml").read_text().splitlines()[0]
    match = re.fullmatch(r"#\s*@package\s+(\S+)\s*", first)
    return match.group(1) if match else f"tasks.{option}"


def task_sets():
    """Each task alone, then all compatible tasks together: as many sets as it takes for every option of a shared
    package (count / count_ce) to appear in one, each set taking one option per package."""
    by_package = {}
    for option in options("tasks"):
        by_package.setdefault(task_package(option), []).append(option)
    together = [[choices[i % len(choices)] for choices in by_package.values()]
                for i in range(max(len(c) for c in by_package.values()))]
    return [[option] for option in options("tasks")] + together


def compose_cfg(overrides=(), name="train", hydra=False):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def tiny(overrides):
    return [*overrides, *TINY_DATA]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def batch():
    """Two tiny scenes, built once with the default data config (it is the only data option so far)."""
    cfg = compose_cfg(tiny([]))
    dataset = build_dataset(cfg, "train")
    return collate([dataset[i] for i in range(BATCH)])


# ------------------------------------------------------------------------------------------ build and run


def check_builds_and_runs(cfg, tmp_path):
    """Resolves, builds every part and runs one training step; checks the outputs against the targets."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["tasks"], "no task"
    torch.manual_seed(0)

    tasks = build_tasks(cfg)
    assert list(tasks) == list(cfg.tasks)
    model = build_model(cfg, tasks)
    weighting = build_weighting(cfg, tasks)
    assert weighting.tasks == list(tasks)
    optimizer = build_optimizer(cfg, model, weighting)
    n_params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert n_params == sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in weighting.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    Monitor(cfg.trainer.monitor, cfg.trainer.monitor_mode, tasks)
    device = pick_device(cfg.trainer.device)
    assert device.type == "cpu"  # this machine has no GPU (and the test does not need one)

    splits = {}
    held_out = HeldOut.of(cfg)  # a weighting that learns on held-out data trains on the rest
    for split in ("train", cfg.data.split):
        splits[split] = build_dataset(cfg, split)
        size = dict(cfg.data.dataset.scenes)[split]
        assert len(splits[split]) == size - (math.ceil(held_out.fraction * size) if held_out and split == "train"
                                              else 0)
    batch = collate([splits["train"][i] for i in range(BATCH)])
    assert batch["image"].shape == (BATCH, 3, SIZE, SIZE)

    # the trunk's features; for a single backbone's maps, as it declares them
    model.start_epoch(1, 2)  # past any warm-up (ltb's), so that every trunk parameter trains
    features = model.encode(batch["image"])
    backbone = getattr(model, "backbone", None)
    if backbone is not None and len(features) == len(backbone.channels):
        assert [f.shape[1] for f in features] == backbone.channels
        assert [SIZE // f.shape[-1] for f in features] == backbone.strides
    assert all(f.shape[0] == BATCH and torch.isfinite(f).all() for f in features)

    def again():  # another forward pass on the batch: the samples and lookahead of the methods that read them
        outputs = model(batch["image"])
        return {name: task.loss(outputs[name], task.target_of(batch)) for name, task in tasks.items()}

    def sample():
        fresh = FeatureCut(model.encode(batch["image"]))
        outputs = model.decode(fresh.leaves, batch["image"].shape[-2:])
        return {name: task.loss(outputs[name], task.target_of(batch)) for name, task in tasks.items()}, fresh

    model.train()
    weighting.before_step(Lookahead(model, again, [again] * weighting.held_out_batches, 0.01, 1))  # first, as the loop
    with autocast(cfg.trainer.precision, device):  # as the training loop does: heads read the cut features
        cut = FeatureCut(model.encode(batch["image"]))
        outputs = model.decode(cut.leaves, batch["image"].shape[-2:])
    assert set(outputs) == set(tasks)
    losses = {}
    for name, task in tasks.items():
        target = task.target_of(batch)
        check_output(name, task, model.heads[name], outputs[name], target)
        task.check_targets(batch)
        losses[name] = task.loss(outputs[name], target)
        assert losses[name].shape == () and torch.isfinite(losses[name]), name
        scores = Scores({name: task})
        scores.update({name: detached(outputs[name])}, batch)
        values = scores.compute()["metrics"][name]
        assert values and set(values) == set(task.directions()), name
        undefined = {"verif_acc", "verif_auc"} if len(batch["image"]) < 4 else set()  # one pair: one kind only
        assert all(isinstance(v, float) and (k in undefined or not math.isnan(v)) for k, v in values.items()), (
            name, values)

    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    weighting.backward(losses, model, torch.amp.GradScaler("cpu", enabled=False), cut,
                       samples=[sample] * (weighting.batches_per_step - 1))
    assert all(p.grad is not None for p in model.shared_parameters())
    optimizer.step()
    scheduler.step()
    weighting.epoch_end()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    logger = instantiate(cfg.logger, "logger")(run_dir=tmp_path)
    logger.scalars({"train/loss/total": float(sum(losses.values()).detach())}, 1)
    logger.close()
    return model, tasks


def detached(output):
    return {k: v.detach() for k, v in output.items()} if isinstance(output, dict) else output.detach()


def check_output(name, task, head, output, target):
    """Dense tasks: [B,C,H,W] at the input size; pooled tasks: [B, num_classes] (or [B,1] for a scalar); other
    heads (detection, landmarks, identity: their own tests check their shapes) give finite tensors."""
    parts = list(output.values()) if isinstance(output, dict) else [output]
    assert all(torch.isfinite(part).all() for part in parts), name
    if not isinstance(head, (DenseHead, PooledHead)):
        return
    if isinstance(head, DenseHead):
        assert output.dim() == 4 and output.shape[-2:] == (SIZE, SIZE), (name, output.shape)
        if target.dim() == 4:  # per-pixel values: depth [B,1,H,W], normals [B,3,H,W]
            assert output.shape == target.shape, (name, output.shape, target.shape)
        else:  # per-pixel labels [B,H,W]
            assert target.shape == (BATCH, SIZE, SIZE) and output.shape == (BATCH, task.num_classes, SIZE, SIZE)
        if head.normalize or task.target == "normals":  # surface normals: unit vectors
            assert head.normalize, name
            norms = output.norm(dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    else:
        assert isinstance(head, PooledHead), (name, type(head))
        expected = (BATCH, task.num_classes if task.num_classes is not None else 1)
        assert output.shape == expected, (name, output.shape, expected)
        if target.dim() == 2:  # multilabel: one output per label
            assert output.shape == target.shape


def reads_files(group, option):
    """Data options that read a dataset from disk, and presets that pick one, are tested with fixtures in their own
    test files (test_npy_folders.py, test_face_data.py, ...); data=multi in test_multi.py."""
    text = (CONFIGS / group / f"{option}.yaml").read_text()
    if group == "data":
        return option != "digit_scenes"
    chosen = re.search(r"override /data:\s*(\w+)", text)
    return group == "experiment" and chosen is not None and chosen.group(1) != "digit_scenes"


# Experiment trackers write to stores of their own (MLflow's in the working directory): test_trackers.py builds them.
TRACKERS = {"logger=mlflow", "logger=wandb"}
TRANSFORMERS = {"vit_b_16", "swin_t"}  # built in the default run by test_models (with cross_stitch and ltb): slow here


def group_cases():
    return [pytest.param(group, option, id=f"{group}={option}",
                         marks=pytest.mark.slow if group == "backbone" and option in LARGER_SIZES | TRANSFORMERS
                         else ())
            for group in groups() if group not in ("tasks", "robustness")  # robustness: mtl eval's, test_robustness.py
            for option in options(group)
            if not reads_files(group, option) and f"{group}={option}" not in TRACKERS]


def stand_ins(selected):
    """A task of a dataset's own target (species, right: a second task of a kind, see configs/tasks) reads, in these
    tests, the embedded data's target of its kind."""
    overrides = []
    for option in selected:
        text = (CONFIGS / "tasks" / f"{option}.yaml").read_text()
        kind = re.search(r"/tasks/(\w+)@_here_", text)
        if kind:
            target = re.search(r"data\.targets\.(\w+)\.key", text).group(1)
            overrides.append(f"+data.targets.{target}=${{data.targets.{kind.group(1)}}}")
    return overrides


def test_the_groups_and_options_are_discovered():
    assert {"architecture", "backbone", "data", "experiment", "logger", "optimizer", "scheduler", "tasks", "trainer",
            "weighting"} <= set(groups())
    assert {"resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "small_cnn"} <= set(options("backbone"))
    assert LARGER_SIZES < set(KNOWN_BACKBONES) == set(options("backbone"))
    assert task_package("count") == task_package("count_ce") == "tasks.count"
    sets = task_sets()
    together = [s for s in sets if len(s) > 1]
    assert len(together) == 2 and all(len(s) == len(set(map(task_package, s))) for s in together)
    assert {"count", "count_ce"} <= set(itertools.chain(*together))
    assert all(s.count("count") + s.count("count_ce") == 1 for s in together)


@pytest.mark.parametrize("group,option", group_cases())
def test_every_option_composes_resolves_and_builds(group, option, tmp_path):
    cfg = compose_cfg(tiny([f"{group}={option}"]), hydra=True)
    assert cfg.hydra.runtime.choices[group] == option
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra's own node needs a running app to resolve
    if group == "backbone" and cfg.backbone.get("name") is not None:  # a torchvision model: no download
        assert cfg.backbone.weights is None
    model, _ = check_builds_and_runs(cfg, tmp_path)
    if group == "backbone":
        assert (model.backbone.channels, model.backbone.strides) == KNOWN_BACKBONES[option]


@pytest.mark.parametrize("selected", task_sets(), ids=[",".join(s) for s in task_sets()])
def test_every_task_set_composes_resolves_and_builds(selected, tmp_path):
    cfg = compose_cfg(tiny([f"tasks=[{','.join(selected)}]", *stand_ins(selected)]))
    expected = [task_package(option).removeprefix("tasks.") for option in selected]
    assert list(cfg.tasks) == expected
    _, tasks = check_builds_and_runs(cfg, tmp_path)
    assert list(tasks) == expected


def test_count_and_count_ce_are_the_same_task_by_regression_and_by_classification(batch):
    regression = build_tasks(compose_cfg(["tasks=[count]"]))["count"]
    classification = build_tasks(compose_cfg(["tasks=[count_ce]"]))["count"]
    assert regression.num_classes is None and classification.num_classes == 7
    assert regression.target == classification.target == "count"
    # decode: the regression output is flattened, the classification output is its argmax
    logits = torch.tensor([[0.1, 2.0, 0.3, 0, 0, 0, 0], [0, 0, 0, 0, 5.0, 0, 0]])
    assert classification.decode(logits).tolist() == [1, 4]
    assert regression.decode(torch.tensor([[1.5], [2.5]])).tolist() == [1.5, 2.5]


# ------------------------------------------------------------------------------------------ particular configs


def test_eval_composes_train_plus_a_checkpoint():
    train = compose_cfg([], hydra=True)
    cfg = compose_cfg(["ckpt=x"], name="eval", hydra=True)
    assert cfg.ckpt == "x"
    assert cfg.hydra.job.name == "eval" and train.hydra.job.name == "train"
    evaluated = OmegaConf.to_container(cfg, resolve=False)
    del evaluated["ckpt"], evaluated["hydra"]
    trained = OmegaConf.to_container(train, resolve=False)
    del trained["hydra"]
    assert evaluated == trained
    OmegaConf.to_container(compose_cfg(["ckpt=x", "data.split=test"], name="eval"), resolve=True,
                           throw_on_missing=True)

    with pytest.raises(MissingMandatoryValue):
        compose_cfg([], name="eval").ckpt


def test_digits_quick_sets_fewer_smaller_epochs_and_nothing_else():
    plain = compose_cfg([])
    quick = compose_cfg(["experiment=digits_quick"])
    assert dict(quick.data.dataset.scenes) == {"train": 800, "val": 200, "test": 200}
    assert quick.trainer.max_epochs == 3
    assert quick.scheduler.T_max == 3  # the cosine schedule follows the epochs
    assert plain.trainer.max_epochs > 3 and sum(plain.data.dataset.scenes.values()) > 1200
    changed = OmegaConf.to_container(quick, resolve=True)
    expected = OmegaConf.to_container(plain, resolve=True)
    for key, value in [(("data", "dataset", "scenes"), {"train": 800, "val": 200, "test": 200}),
                       (("trainer", "max_epochs"), 3), (("scheduler", "T_max"), 3), (("name",), "digits_quick")]:
        node = expected
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = value
    changed["name"] = "digits_quick"  # checked on its own by the next test
    assert changed == expected


def test_digits_quick_names_the_run():
    """experiment/digits_quick.yaml sets `name: digits_quick`, which names the run directory."""
    cfg = compose_cfg(["experiment=digits_quick"], hydra=True)
    assert cfg.name == "digits_quick"
    assert cfg.hydra.run.dir.endswith("_digits_quick")


@pytest.mark.parametrize("dir_key,root", [("run", "outputs"), ("sweep", "multirun")])
def test_the_run_dir_holds_the_date_a_time_with_microseconds_and_the_name(dir_key, root):
    first = compose_cfg(["name=my-run"], hydra=True)
    second = compose_cfg(["name=my-run"], hydra=True)
    start = datetime.datetime.now()
    dirs = [first.hydra[dir_key].dir, second.hydra[dir_key].dir]
    end = datetime.datetime.now()
    for path in dirs:
        match = re.fullmatch(rf"{root}/(\d{{4}}-\d{{2}}-\d{{2}})/(\d{{2}}-\d{{2}}-\d{{2}}-\d{{6}})_my-run", path)
        assert match, path
        when = datetime.datetime.strptime(f"{match.group(1)} {match.group(2)}", "%Y-%m-%d %H-%M-%S-%f")
        assert start <= when <= end
    assert dirs[0] != dirs[1]  # two runs started within the same second still get two directories
    default = compose_cfg([], hydra=True)
    assert default.hydra.run.dir.endswith("_digit_scenes") and default.name == default.data.name


def test_task_class_counts_and_ignore_values_come_from_the_data_targets(batch):
    cfg = compose_cfg(["tasks=[segmentation,classification,multilabel,count_ce,depth]",
                       "data.targets.segmentation.num_classes=5", "data.targets.segmentation.ignore_index=7",
                       "data.targets.classification.num_classes=4", "data.targets.classification.ignore_index=-3",
                       "data.targets.multilabel.num_classes=6", "data.targets.count.num_classes=9",
                       "data.targets.depth.invalid_value=-1.0"])
    tasks = build_tasks(cfg)
    model = build_model(cfg, tasks)

    seg = tasks["segmentation"]
    assert (seg.num_classes, seg.ignore_index) == (5, 7)
    assert model.heads["segmentation"].fuse[-1].out_channels == 5
    assert (seg.metrics["seg"].num_classes, seg.metrics["seg"].ignore_index) == (5, 7)
    assert seg.metrics["seg"].confmat.shape == (5, 5)
    assert seg.loss.ignore_index == 7
    assert seg.visualize.keywords["num_classes"] == 5

    cls = tasks["classification"]
    assert (cls.num_classes, cls.ignore_index) == (4, -3)
    assert model.heads["classification"].mlp[-1].out_features == 4
    assert (cls.metrics["accuracy"].num_classes, cls.metrics["accuracy"].ignore_index) == (4, -3)
    assert cls.loss.ignore_index == -3

    assert tasks["multilabel"].num_classes == 6 and tasks["multilabel"].metrics["f1"].num_labels == 6
    assert model.heads["multilabel"].mlp[-1].out_features == 6
    assert tasks["count"].num_classes == 9 and model.heads["count"].mlp[-1].out_features == 9
    assert tasks["depth"].loss.invalid_value == -1.0 and tasks["depth"].metrics["depth"].invalid_value == -1.0

    outputs = model(batch["image"])
    assert outputs["segmentation"].shape == (BATCH, 5, SIZE, SIZE)
    assert outputs["classification"].shape == (BATCH, 4)
    # the data holds labels up to 10 for segmentation: with 5 classes the first-batch check says so
    with pytest.raises(UserError, match="segmentation"):
        seg.check_targets(batch)


def test_a_task_whose_target_the_data_lacks_is_a_user_error():
    cfg = compose_cfg(["tasks=[segmentation,depth]", "~data.targets.depth"])
    with pytest.raises(UserError, match="depth"):
        build_tasks(cfg)
    with pytest.raises(UserError, match="no task"):
        build_tasks(compose_cfg(["tasks=[]"]))
