"""Each data config names the tasks a run trains on it (configs/data/*.yaml: `override /tasks@_global_.tasks`), so
`mtl train data=nyuv2 data.root=...` trains NYUv2's tasks; `tasks=[...]` on the command line and the experiment
presets that name tasks still decide over them."""

import json

import pytest
from omegaconf import OmegaConf
from test_configs import CONFIGS, compose_cfg, options
from test_npy_folders import NYU_SIZE, write_release

from mtl_cli.build import build_tasks

DEFAULT_TASKS = {
    "digit_scenes": ["segmentation", "depth", "normals", "count"],
    "nyuv2": ["segmentation", "depth", "normals"],
    "cityscapes": ["segmentation", "depth"],
    "celeba": ["attributes", "landmarks"],
    "lfw": ["identity"],
    "oxford_pet": ["classification", "species", "segmentation"],
    "coco": ["detection", "segmentation"],
    "multimnist": ["classification", "right"],
    "folder": ["classification"],      # the `label` column of the manifest
    "multi": [],                       # tasks=[...] names the tasks of data.tasks: no default can be read from them
}
# The tasks of each preset, as composed before the data configs named their own.
PRESET_TASKS = {
    "celeba_attributes": ["attributes", "landmarks"],
    "cityscapes_hps": ["segmentation", "depth"],
    "digits_detection": ["detection", "segmentation", "count"],
    "digits_multi": ["segmentation", "depth", "normals", "count"],
    "digits_quick": ["segmentation", "depth", "normals", "count"],
    "nyuv2_hps_resnet50": ["segmentation", "depth", "normals"],
    "nyuv2_mtan_resnet50": ["segmentation", "depth", "normals"],
    "oxford_pet_mtl": ["classification", "species", "segmentation"],
}


def test_every_data_option_and_preset_is_listed():
    assert sorted(DEFAULT_TASKS) == options("data")
    assert sorted(PRESET_TASKS) == options("experiment")


def test_the_default_run_trains_the_embedded_datas_tasks():
    assert list(compose_cfg([]).tasks) == DEFAULT_TASKS["digit_scenes"]


@pytest.mark.parametrize("option", sorted(DEFAULT_TASKS))
def test_a_data_option_selects_its_own_tasks(option):
    assert list(compose_cfg([f"data={option}"]).get("tasks") or []) == DEFAULT_TASKS[option]


@pytest.mark.parametrize("option", sorted(set(DEFAULT_TASKS) - {"multi"}))
def test_the_default_tasks_build_from_the_datas_own_targets(option):
    cfg = compose_cfg([f"data={option}"])
    assert set(cfg.tasks) <= set(cfg.data.targets)
    OmegaConf.to_container(cfg.tasks, resolve=True)  # each task's target facts come from this data's targets
    assert list(build_tasks(cfg)) == DEFAULT_TASKS[option]


@pytest.mark.parametrize("option", sorted(set(DEFAULT_TASKS) - {"multi"}))
def test_tasks_on_the_command_line_replace_the_datas(option):
    last = DEFAULT_TASKS[option][-1]
    assert list(compose_cfg([f"data={option}", f"tasks=[{last}]"]).tasks) == [last]
    assert list(compose_cfg([f"tasks=[{last}]", f"data={option}"]).tasks) == [last]  # the order typed does not matter
    assert "tasks" not in compose_cfg([f"data={option}", "tasks=[]"])  # none at all: the run refuses to start


@pytest.mark.parametrize("preset", sorted(PRESET_TASKS))
def test_the_presets_keep_their_tasks(preset):
    assert list(compose_cfg([f"experiment={preset}"]).tasks) == PRESET_TASKS[preset]


def test_a_preset_that_names_tasks_wins_over_the_datas_and_one_that_does_not_keeps_them():
    assert list(compose_cfg(["data=nyuv2", "experiment=digits_detection"]).tasks) == PRESET_TASKS["digits_detection"]
    assert list(compose_cfg(["data=nyuv2", "experiment=digits_quick"]).tasks) == DEFAULT_TASKS["nyuv2"]
    assert list(compose_cfg(["experiment=digits_detection", "tasks=[depth]"]).tasks) == ["depth"]


def test_a_users_data_config_can_name_its_own_tasks_over_the_one_it_extends(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pets.yaml").write_text(
        "defaults:\n  - folder\n  - _self_\n  - override /tasks@_global_.tasks: [classification, segmentation]\n"
        "name: pets\n")
    (tmp_path / "data" / "plain.yaml").write_text("defaults: [folder, _self_]\nname: plain\n")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        mine = [f"hydra.searchpath=[file://{tmp_path}]"]
        assert list(compose("train", [*mine, "data=pets"]).tasks) == ["classification", "segmentation"]
        assert list(compose("train", [*mine, "data=plain"]).tasks) == DEFAULT_TASKS["folder"]


def test_mtl_train_on_nyuv2_trains_its_tasks_when_none_are_given(mtl_main, tmp_path_factory):
    root = tmp_path_factory.mktemp("nyuv2")
    write_release(root, "nyuv2", NYU_SIZE)
    ran = mtl_main("train", "data=nyuv2", f"data.root={root}", f"data.dataset.size=[{NYU_SIZE[0]},{NYU_SIZE[1]}]",
                   "data.batch_size=2", "trainer.max_epochs=1", "trainer.progress=none", "logger=console",
                   "hydra.run.dir=run")
    assert ran.status == 0, ran
    final = json.loads(open("run/metrics.json").read())["final"]["metrics"]
    assert list(final) == DEFAULT_TASKS["nyuv2"]
    assert list(OmegaConf.load("run/.hydra/config.yaml").tasks) == DEFAULT_TASKS["nyuv2"]
