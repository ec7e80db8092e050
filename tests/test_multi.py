"""Tasks from different datasets (data=multi) and samples with missing labels."""

import json

import pytest
import torch
from test_cli import ok, run_dirs, scalar_tags
from omegaconf import OmegaConf
from test_configs import CONFIGS, compose_cfg
from torch.utils.data import Dataset

from mtl_cli.build import build_dataset, build_loader, build_tasks, resolve_data
from mtl_cli.data.collate import collate
from mtl_cli.data.multi import MultiDataset
from mtl_cli.errors import UserError

TINY_MULTI = ["data.members.scenes.dataset.scenes={train:24,val:12,test:12}",
              "data.members.counts.dataset.scenes={train:16,val:8,test:8}",
              "data.members.scenes.dataset.image_size=32", "data.members.counts.dataset.image_size=32"]


class Numbers(Dataset):
    """Samples that say where they come from: {"image", "a": i, "b": -i}."""

    def __init__(self, size: int, tag: int):
        self.size, self.tag = size, tag

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"image": torch.full((1,), float(self.tag)), "a": torch.tensor(i), "b": torch.tensor(-i)}


def multi(sampling="round_robin", tau=2.0, sizes=(100, 300)):
    members = {f"m{k}": Numbers(size, k) for k, size in enumerate(sizes)}
    return MultiDataset(members, {"m0": ["a"], "m1": ["b"]}, sampling, tau)


def member_counts(dataset, batch_size=10, epochs=1, seed=0):
    generator = torch.Generator()
    counts = torch.zeros(len(dataset.sizes))
    for epoch in range(epochs):
        generator.manual_seed(seed * 1000 + epoch)
        for batch in dataset.batch_sampler(batch_size, generator):
            members = {dataset.member_of(i) for i in batch}
            assert len(members) == 1 and len(batch) == batch_size  # one member per batch
            counts[members.pop()] += 1
    return counts


def test_round_robin_alternates_and_covers_each_member():
    dataset = multi("round_robin")
    generator = torch.Generator().manual_seed(0)
    batches = list(dataset.batch_sampler(10, generator))
    assert len(batches) == 40  # as many batches as the members hold together
    assert [dataset.member_of(b[0]) for b in batches[:4]] == [0, 1, 0, 1]
    first = sorted(i for b in batches if dataset.member_of(b[0]) == 0 for i in b)
    assert first == sorted(list(range(100)) * 2)  # member 0 (10 batches) went round twice, each sample once a round
    second = [i for b in batches if dataset.member_of(b[0]) == 1 for i in b]
    assert len(set(second)) == 200  # member 1: 20 of its 30 batches, no sample twice


@pytest.mark.parametrize("sampling, tau, expected", [("proportional", 2.0, [0.25, 0.75]),
                                                     ("temperature", 2.0, [10 / (10 + 300 ** 0.5), None]),
                                                     ("temperature", 1e6, [0.5, 0.5])])
def test_random_strategies_draw_members_in_their_proportions(sampling, tau, expected):
    expected[1] = 1 - expected[0]
    dataset = multi(sampling, tau)
    assert dataset.probabilities().tolist() == pytest.approx(expected, abs=1e-4)
    counts = member_counts(dataset, epochs=50)  # 2000 draws: 3 standard deviations < 0.033
    assert (counts / counts.sum()).tolist() == pytest.approx(expected, abs=0.033)


def test_the_order_depends_on_the_generator_seed_only():
    dataset = multi("temperature")
    runs = [list(dataset.batch_sampler(10, torch.Generator().manual_seed(seed))) for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_members_keep_the_keys_of_their_tasks_and_validation_visits_every_sample_once():
    dataset = multi(sizes=(5, 7))
    assert set(dataset[0]) == {"image", "a"} and set(dataset[5]) == {"image", "b"}
    batches = list(dataset.batch_sampler(3, None))
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert [len(b) for b in batches] == [3, 3, 2, 3, 1]  # the members in turn: 0, 1, 0, 1, 1
    assert [dataset.member_of(b[0]) for b in batches] == [0, 1, 0, 1, 1]


def test_task_assignment_errors():
    for overrides, message in [(["+data.tasks.nobody=[depth]"], "names the member 'nobody'"),
                               (["data.tasks.counts=[count,boxes]"], "does not provide it"),
                               (["data.tasks.counts=[count,depth]"], "two members"),
                               (["~data.tasks"], "needs members")]:
        with pytest.raises(UserError, match=message):
            resolve_data(compose_cfg(["experiment=digits_multi", *overrides]))


def test_each_batch_trains_the_tasks_of_its_member():
    cfg = resolve_data(compose_cfg(["experiment=digits_multi", *TINY_MULTI, "data.batch_size=4"]))
    tasks = build_tasks(cfg)
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True)
    loader.batch_sampler.set_epoch(0)
    present = [tuple(name for name, task in tasks.items() if task.has_target(batch)) for batch in loader]
    assert len(present) == 6 + 4
    assert set(present) == {("segmentation", "depth", "normals"), ("count",)}


def test_a_missing_label_gives_the_loss_of_the_batch_without_that_sample():
    cfg = compose_cfg(["tasks=[classification,depth]"])
    tasks = build_tasks(cfg)
    torch.manual_seed(0)
    samples = [{"image": torch.rand(3, 4, 4), "classification": torch.tensor(k % 3),
                "depth": torch.rand(1, 4, 4) + 0.5} for k in range(5)]
    for k in (1, 3):
        del samples[k]["classification"]
    samples[2]["depth"] = None
    batch = collate(samples)
    assert batch["present/classification"].tolist() == [True, False, True, False, True]
    outputs = {"classification": torch.randn(5, 10), "depth": torch.rand(5, 1, 4, 4)}
    for name, keep in [("classification", [0, 2, 4]), ("depth", [0, 1, 3, 4])]:
        task = tasks[name]
        loss = task.loss(*task.select(outputs[name], batch))
        only = collate([samples[k] for k in keep])
        assert "present/" + task.target not in only
        assert loss == pytest.approx(float(task.loss(outputs[name][keep], task.target_of(only))), rel=1e-6)


def test_a_mixed_run_trains_and_reports_every_task_and_delta_m(mtl_main, tmp_path):
    result = ok(mtl_main("train", "experiment=digits_multi", *TINY_MULTI, "data.batch_size=8",
                         "data.sampling=proportional", "trainer.max_epochs=2", "trainer.progress=plain",
                         "logger.log_every=1", "baselines={segmentation: {miou: 0.1}, count: {mae: 1.0}}"))
    (run_dir,) = run_dirs(tmp_path / "outputs")
    report = json.loads((run_dir / "metrics.json").read_text())
    assert set(report["final"]["metrics"]) == {"segmentation", "depth", "normals", "count"}
    final = report["final"]["metrics"]
    expected = 100 * ((final["segmentation"]["miou"] - 0.1) / 0.1 - (final["count"]["mae"] - 1.0)) / 2
    assert report["final"]["delta_m"] == pytest.approx(expected, rel=1e-6)
    tags = scalar_tags(run_dir)
    assert {"val/delta_m", "train/weight/count", "train/weight/segmentation", "val/count/mae"} <= tags
    assert "delta_m leaves out the tasks without a baseline: depth, normals" in result.out


DATA_OPTIONS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml") if p.stem != "multi")


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_every_data_option_can_be_a_member_with_its_own_interpolations(option):
    """A member's `${data.root}`, `${data.image_size}`, `${oc.dict.keys:tasks}` read the member's own config and
    tasks: the whole config then resolves (as config.yaml is written) with the member's values."""
    targets = OmegaConf.load(CONFIGS / "data" / f"{option}.yaml").targets
    task = next(t for t in targets if (CONFIGS / "tasks" / f"{t}.yaml").exists())
    other = "depth" if task != "depth" else "normals"
    cfg = compose_cfg(["data=multi", f"+data@data.members.mine={option}", "+data.members.mine.root=/data/mine",
                       "+data@data.members.scenes=digit_scenes", f"+data.tasks={{mine: [{task}], scenes: [{other}]}}",
                       f"tasks=[{task},{other}]"])
    cfg = resolve_data(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    member = resolved["data"]["members"]["mine"]
    if "root" in member["dataset"]:
        assert member["dataset"]["root"] == "/data/mine"
    if "tasks" in member["dataset"]:  # data=folder reads the columns of its own tasks only
        assert member["dataset"]["tasks"] == [task]
    assert resolved["data"]["targets"][task] == member["targets"][task]
    assert resolved["data"]["targets"][other] == resolved["data"]["members"]["scenes"]["targets"][other]


def test_the_labels_of_every_member_are_checked_on_its_first_batch(mtl_main):
    """The second member's first batch (round robin: the second batch) holds counts beyond the declared classes."""
    result = mtl_main("train", "experiment=digits_multi", *TINY_MULTI, "data.batch_size=8",
                      "tasks=[segmentation,count_ce]", "data.tasks.scenes=[segmentation]",
                      "data.members.counts.targets.count.num_classes=2")
    assert result.status == 2 and "task 'count' predicts 2 classes" in result.err
