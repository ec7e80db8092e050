"""End to end through `mtl` on tiny embedded data, in this process (cli.main); in subprocesses only where the
process boundary is the point: the installed console script and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_mtl
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

MTL = str(Path(sys.executable).with_name("mtl"))
TINY = ["data.dataset.scenes={train:48,val:24,test:24}", "data.dataset.image_size=32", "data.batch_size=16",
        "trainer.max_epochs=2", "trainer.progress=plain", "logger.log_every=1"]
TASKS = ["segmentation", "depth", "normals", "count"]


def ok(ran):
    """The Ran of an `mtl` command that must succeed (tests/conftest.py)."""
    assert ran.status == 0, ran
    return ran


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


def scalar_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    return set(events.Tags()["scalars"]) | {f"image:{t}" for t in events.Tags()["images"]} | {
        f"text:{t}" for t in events.Tags()["tensors"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny default training run, in the run dir Hydra picks under outputs/."""
    cwd = tmp_path_factory.mktemp("train")
    ok(run_mtl("train", *TINY, cwd=cwd))
    (run_dir,) = run_dirs(cwd / "outputs")
    return run_dir


def test_the_console_script_prints_and_exits_as_main_returns(tmp_path):
    """The installed `mtl` script: main's output, and its return value as the exit status."""
    shown = subprocess.run([MTL, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and all(c in shown.stdout for c in ("train", "eval")), shown
    typo = subprocess.run([MTL, "trian"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and typo.stdout == "", typo
    assert typo.stderr == ("mtl: error: unknown command 'trian' (did you mean 'train'?); "
                           "commands: train, eval, predict, export, explain, report, affinity, completion\n")


def test_help_lists_commands_and_every_config_group(mtl_main):
    assert all(c in ok(mtl_main("--help")).out for c in ("train", "eval"))
    text = ok(mtl_main("train", "--help")).out
    groups = sorted(p.name for p in (Path(__file__).parents[1] / "configs").iterdir() if p.is_dir())
    for group in (g for g in groups if g != "hydra"):  # configs/hydra/ adds options to Hydra's own groups
        assert f"{group}:" in text, group
    assert "resnet18" in text and "uw" in text
    hydra_help = ok(mtl_main("train", "--hydra-help")).out  # Hydra's groups, with the options of configs/hydra/
    assert "parallel" in hydra_help and "slurm" in hydra_help and "study" in hydra_help


def test_run_dir_layout(trained):
    date, leaf = trained.parent.name, trained.name
    assert trained.parent.parent.name == "outputs" and len(date) == 10
    assert leaf.endswith("_digit_scenes") and len(leaf.split("_")[0]) == len("18-47-07-907998")
    for name in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.json",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (trained / name).is_file(), name
    assert list(trained.glob("events.out.tfevents.*"))
    assert "trainer:" in (trained / "config.yaml").read_text() and "${" not in (trained / "config.yaml").read_text()
    assert "validation metrics" in (trained / "train.log").read_text()
    assert not list(trained.rglob("*.tmp"))


def test_tensorboard_has_every_tag(trained):
    tags = scalar_tags(trained)
    expected = {"train/loss/total", "lr", "perf/samples_per_s", "val/loss/total", "text:config/text_summary"}
    for task in TASKS:
        expected |= {f"train/loss/{task}", f"train/weight/{task}", f"val/loss/{task}"}
    metrics = json.loads((trained / "metrics.json").read_text())
    for task, values in metrics["final"]["metrics"].items():
        expected |= {f"val/{task}/{metric}" for metric in values}
    expected |= {"image:images/input", "image:images/segmentation (target | prediction)",
                 "image:images/depth (target | prediction)", "image:images/normals (target | prediction)"}
    assert expected <= tags, expected - tags
    assert set(metrics["final"]["metrics"]) == set(TASKS)
    assert metrics["higher_is_better"]["segmentation"] == {"miou": True, "pixel_acc": True}
    assert metrics["higher_is_better"]["depth"] == {"abs_err": False, "rel_err": False}


def test_eval_reproduces_the_validation_of_training(trained, mtl_main, tmp_path, monkeypatch):
    best = json.loads((trained / "metrics.json").read_text())["best"]
    result = ok(mtl_main("eval", f"ckpt={trained / 'checkpoints' / 'best.pt'}"))  # in tmp_path
    (eval_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("eval.json")]
    report = json.loads((eval_dir / "eval.json").read_text())
    assert report["split"] == "val" and report["epoch"] == best["epoch"]
    for task, values in best["metrics"].items():
        for metric, value in values.items():
            assert report["metrics"][task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, metric)
    assert (eval_dir / "eval.log").is_file() and "miou" in result.out
    # An override on top of the checkpoint's config: the test split gives other numbers.
    (tmp_path / "t").mkdir()
    monkeypatch.chdir(tmp_path / "t")
    ok(mtl_main("eval", f"ckpt={trained / 'checkpoints' / 'best.pt'}", "data.split=test"))
    (test_report,) = [json.loads(p.read_text()) for p in (tmp_path / "t" / "outputs").rglob("eval.json")]
    assert test_report["split"] == "test" and test_report["metrics"] != report["metrics"]


def test_checkpoints_load_safely_and_hold_the_resolved_config(trained):
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "mtl-checkpoint/1" and state["epoch"] == 2
    assert "_target_: mtl_cli.models.hps.HardSharing" in state["config"]


@pytest.mark.slow  # the sweep path runs by default in test_weighting_cli and test_sweep_failures
def test_sweep_makes_one_run_dir_each_with_its_own_events(mtl_main, tmp_path):
    ok(mtl_main("train", "-m", "weighting=ew,uw", "seed=0,1", *TINY, "trainer.max_epochs=1"))  # in tmp_path
    dirs = run_dirs(tmp_path / "multirun")
    assert len(dirs) == 4 and len({d.name for d in dirs}) == 4
    weights = set()
    for d in dirs:
        tags = scalar_tags(d)
        assert {"train/loss/total", "train/weight/depth", "val/segmentation/miou", "lr"} <= tags
        assert len(list(d.glob("events.out.tfevents.*"))) == 1
        weights.add(json.loads((d / "metrics.json").read_text())["final"]["metrics"]["depth"]["abs_err"])
    assert len(weights) == 4  # four different runs, not one run logged four times


@pytest.mark.parametrize("args, expected", [
    (["backbone=resnet181"], ["resnet181", "did you mean 'resnet18'", "small_cnn"]),
    (["trainer.max_epoch=3"], ["trainer.max_epoch", "did you mean 'max_epochs'"]),
    (["tasks=[segmentation,depthh]"], ["tasks=depthh", "did you mean 'depth'"]),
    (["~data.targets.depth"], ["task 'depth' needs a target", "The data provides: segmentation"]),
    (["tasks.depth.target=altitude"], ["'altitude'", "does not provide"]),
    (["tasks.segmentation.num_classes=5"], ["predicts 5 classes", "labels from 0 to"]),
    (["backbone=resnet18", "backbone.weights=IMAGENET9K"], ["IMAGENET9K", "IMAGENET1K_V1"]),
    (["backbone=resnet18", "backbone.weights=IMAGENET1K_V1"], ["could not download", "place the file at"]),
    (["trainer.monitor=val/segmentation/iou"], ["trainer.monitor", "val/segmentation/miou"]),
    (["trainer.precision=16", "trainer.device=cpu"], ["CUDA", "bf16"]),
    (["trainer.val_every=0"], ["trainer.val_every=0", "at least 1"]),
    (["optimizer.lr=-1"], ["optimizer.lr=-1", "greater than 0"]),
    (["optimizer.betas=[0.9]"], ["optimizer", "betas"]),
    (["data.batch_size=0"], ["data.batch_size=0", "at least 1"]),
])
def test_user_errors_give_one_message_and_exit_2(mtl_main, tmp_path, monkeypatch, args, expected):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY"):  # a closed port: a download fails at once, network or not
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    result = mtl_main("train", *TINY, *args)
    assert result.status == 2, result
    assert "Traceback" not in result.err + result.out
    message = result.err.strip()
    assert message.startswith("mtl train: error:") and len(message.splitlines()) <= 3, message
    for part in expected:
        assert part in message, (part, message)


def test_eval_errors(mtl_main, tmp_path):
    missing = mtl_main("eval", f"ckpt={tmp_path / 'nope.pt'}")
    assert missing.status == 2 and "does not exist" in missing.err and "Traceback" not in missing.err
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    foreign = mtl_main("eval", f"ckpt={tmp_path / 'other.pt'}")
    assert foreign.status == 2 and "not written by mtl train" in foreign.err
    no_ckpt = mtl_main("eval")
    assert no_ckpt.status == 2 and "ckpt" in no_ckpt.err


@pytest.mark.slow  # a longer variant; the default run checks the same more cheaply
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(mtl_main, tmp_path):
    """Only the killed run is a process of its own (on as many threads as this one: the same sums)."""
    args = [*TINY, "data.dataset.scenes={train:320,val:16,test:16}", "trainer.max_epochs=3", "logger=console"]
    straight = tmp_path / "straight"
    ok(mtl_main("train", *args, f"hydra.run.dir={straight}"))

    killed = tmp_path / "killed"
    log = tmp_path / "killed.out"
    with open(log, "w") as out:
        threads = str(torch.get_num_threads())
        proc = subprocess.Popen([MTL, "train", *args, f"hydra.run.dir={killed}"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads})
        deadline = time.time() + 240
        while "epoch 2/3 step" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    assert not (killed / "metrics.json").exists()  # it really died before the end
    saved = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)  # whole, not half-written
    assert saved["epoch"] in (1, 2)

    resumed = tmp_path / "resumed"
    ok(mtl_main("train", f"resume={killed / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={resumed}"))
    final = json.loads((resumed / "metrics.json").read_text())
    assert final["epochs"] == 3
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert json.loads((straight / "metrics.json").read_text())["final"] == final["final"]


def test_users_own_config_dir_adds_options_and_cfg_job_prints_without_training(mtl_main, tmp_path):
    mine = tmp_path / "my_configs" / "backbone"
    mine.mkdir(parents=True)
    (mine / "wide_cnn.yaml").write_text("_target_: mtl_cli.models.backbones.small_cnn\n_partial_: true\n"
                                        "widths: [32, 64, 128, 256]\n")
    result = ok(mtl_main("train", "-cd", str(tmp_path / "my_configs"), "backbone=wide_cnn", "--cfg", "job"))
    assert "- 256" in result.out and not (tmp_path / "outputs").exists()
    info = ok(mtl_main("train", "-cd", str(tmp_path / "my_configs"), "--info", "searchpath"))
    assert str(tmp_path / "my_configs") in info.out


def test_a_checkpoint_cannot_make_mtl_call_functions_its_configs_do_not_name(trained, mtl_main, tmp_path):
    state = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    marker = tmp_path / "pwned.txt"
    cfg = OmegaConf.create(state["config"])
    cfg.tasks.depth.loss = {"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0]}  # would write a file
    state["config"] = OmegaConf.to_yaml(cfg)
    torch.save(state, tmp_path / "evil.pt")
    result = mtl_main("eval", f"ckpt={tmp_path / 'evil.pt'}")
    assert result.status == 2 and "numpy.savetxt" in result.err and "trust_checkpoint" in result.err
    assert not marker.exists()


@pytest.mark.slow  # a longer variant; the default run checks the same more cheaply
def test_resume_with_workers_and_a_longer_schedule_matches_a_straight_run(mtl_main, tmp_path):
    """With a random transform: each sample is augmented with a seed of its own drawn from the epoch's shuffle
    generator, so which worker loads it, and what that worker loaded before, change nothing."""
    flip = "data.transforms.train=[{_target_: torchvision.transforms.v2.RandomHorizontalFlip}]"
    args = [*TINY, "data.num_workers=2", "logger=console", "data.dataset.image_size=30", flip]  # 30: not 4k
    ok(mtl_main("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(mtl_main("train", *args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'short'}"))
    ok(mtl_main("train", f"resume={tmp_path / 'short' / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=2",
                f"hydra.run.dir={tmp_path / 'resumed'}"))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_overriding_the_model_of_a_checkpoint_is_a_user_error(trained, mtl_main):
    result = mtl_main("eval", f"ckpt={trained / 'checkpoints' / 'best.pt'}", "backbone=resnet18")
    assert result.status == 2 and "does not fit" in result.err and "Traceback" not in result.err
