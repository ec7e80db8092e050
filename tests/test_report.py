"""mtl report on a sweep the test writes in the run directories' real formats (.hydra/overrides.yaml, config.yaml,
metrics.json written by the trainer's own writer), plus a real run of mtl train: the numbers against a hand
computation, failed and unfinished runs listed, the files it writes, and no torch import."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

from mtl_cli.engine.records import write_record

WAYS = {"seg": {"miou": True}, "depth": {"abs_err": False, "rel_err": False}}
# (overrides, seed, seg miou, depth abs_err, depth rel_err): three seeds of ew and of pcgrad, two single-task runs
RUNS = [(["weighting=ew"], 0, 0.50, 0.60, 0.20), (["weighting=ew"], 1, 0.52, 0.62, 0.21),
        (["weighting=ew"], 2, 0.51, 0.61, 0.19),
        (["weighting=pcgrad"], 0, 0.60, 0.55, 0.18), (["weighting=pcgrad"], 1, 0.61, 0.56, 0.17),
        (["weighting=pcgrad"], 2, 0.62, 0.54, 0.18),
        (["architecture=stl"], 0, 0.55, 0.58, 0.20), (["architecture=stl"], 1, 0.57, 0.60, 0.20)]
FIXED = ["trainer.max_epochs=2"]  # typed for every job: names no group


def write_run(folder: Path, overrides: list[str], seed: int, miou: float, abs_err: float, rel_err: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*FIXED, *overrides, f"seed={seed}"]))
    architecture = "mtl_cli.models.stl.SingleTask" if "architecture=stl" in overrides else "mtl_cli.models.hps.HPS"
    weighting = "mtl_cli.weighting.ew.EqualWeighting" if overrides != ["weighting=pcgrad"] else \
        "mtl_cli.weighting.pcgrad.PCGrad"
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "architecture": {"_target_": architecture},
                                                        "weighting": {"_target_": weighting},
                                                        "tasks": {"seg": {}, "depth": {}}}))
    results = {"metrics": {"seg": {"miou": miou}, "depth": {"abs_err": abs_err, "rel_err": rel_err}},
               "loss": {}, "epoch": 2}
    write_record(folder / "metrics.json", {"kind": "train", "final": {**results, "epoch": 2}, "best": results,
                                           "higher_is_better": WAYS})


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "sweep"
    for job, run in enumerate(RUNS):
        write_run(root / str(job), *run)
    failed = root / "8"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*FIXED, "weighting=uw", "seed=0"]))
    (failed / "failed.json").write_text(json.dumps({"job": 8, "overrides": ["weighting=uw", "seed=0"],
                                                    "kind": "run failed", "error": "the loss of depth is NaN"}))
    running = root / "9"
    (running / ".hydra").mkdir(parents=True)
    (running / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*FIXED, "weighting=uw", "seed=1"]))
    (running / "config.yaml").write_text("seed: 1\n")
    return root


def hand_delta_m(miou: float, abs_err: float, rel_err: float, per: str) -> float:
    base = {"miou": statistics.fmean([0.55, 0.57]), "abs_err": statistics.fmean([0.58, 0.60]), "rel_err": 0.20}
    seg = (miou - base["miou"]) / base["miou"]
    depth = [-(abs_err - base["abs_err"]) / base["abs_err"], -(rel_err - base["rel_err"]) / base["rel_err"]]
    return 100 * ((seg + sum(depth)) / 3 if per == "metrics" else (seg + statistics.fmean(depth)) / 2)


def test_report_numbers_equal_a_hand_computation(sweep, mtl_main):
    ran = mtl_main("report", str(sweep))
    assert ran.status == 0, ran
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in ran.out.splitlines() if line.startswith("│")}
    header = next(line for line in ran.out.splitlines() if line.startswith("┃") and "#1" in line)
    assert [c.strip() for c in header.split("┃")[2:-1]] == ["#1 weighting=pcgrad (n=3)", "#2 weighting=ew (n=3)",
                                                          "#3 architecture=stl (n=2)"]  # ranked by delta_m
    ew = [r for r in RUNS if r[0] == ["weighting=ew"]]
    pcgrad = [r for r in RUNS if r[0] == ["weighting=pcgrad"]]
    miou_pc, miou_ew = [r[2] for r in pcgrad], [r[2] for r in ew]
    assert lines["seg miou ↑"][0] == f"{statistics.fmean(miou_pc):.4g} ± {statistics.stdev(miou_pc):.2g}*"
    assert lines["seg miou ↑"][1] == f"{statistics.fmean(miou_ew):.4g} ± {statistics.stdev(miou_ew):.2g}"
    # Welch's t-test by its formula, p from the t distribution: pcgrad's miou is significantly above ew's
    va, vb = statistics.variance(miou_pc) / 3, statistics.variance(miou_ew) / 3
    t = (statistics.fmean(miou_pc) - statistics.fmean(miou_ew)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert 2 * stats.t.sf(abs(t), df) < 0.05
    for per, label in [("metrics", "delta_m % (per metric) ↑"), ("tasks", "delta_m % (per task) ↑")]:
        for column, runs in [(0, pcgrad), (1, ew)]:
            values = [hand_delta_m(*r[2:], per) for r in runs]
            assert lines[label][column].rstrip("*") == f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"
        assert lines[label][2] == "-"
    assert f"failed: {sweep / '8'} (run failed: the loss of depth is NaN)" in ran.out
    assert f"unfinished: {sweep / '9'}" in ran.out


def test_report_writes_a_tidy_csv_markdown_and_plots(sweep, mtl_main):
    assert mtl_main("report", str(sweep), "--out", "out").status == 0
    out = Path("out")  # mtl_main runs in tmp_path
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    finished = [row for row in rows if row["status"] == "finished" and row["task"] != "all"]
    assert len(finished) == len(RUNS) * 3
    first = next(row for row in finished if row["run"] == str(sweep / "0") and row["metric"] == "miou")
    assert (float(first["value"]), first["group"], first["seed"], first["higher_is_better"]) == (
        0.50, "weighting=ew", "0", "True")
    deltas = [row for row in rows if row["task"] == "all" and row["run"] == str(sweep / "3")]
    assert {row["metric"] for row in deltas} == {"delta_m/metrics", "delta_m/tasks"}
    assert float(next(r for r in deltas if r["metric"] == "delta_m/tasks")["value"]) == pytest.approx(
        hand_delta_m(*RUNS[3][2:], "tasks"))
    assert {row["status"] for row in rows} == {"finished", "failed", "unfinished"}
    assert "| #1 weighting=pcgrad (n=3) |" in (out / "report.md").read_text()
    from matplotlib import image

    for name in ("delta_m.png", "metrics.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = image.imread(out / name).shape
        assert height > 200 and width > 300


def test_report_reads_a_real_training_run_beside_the_sweep(sweep, tiny_run, mtl_main):
    shutil.copytree(tiny_run, sweep / "real")
    ran = mtl_main("report", str(sweep), "--by", "weighting._target_", "--anchor", "final")
    assert ran.status == 0, ran
    # ew's 3, the 2 single-task runs (which train with ew) and the real one
    assert "weighting._target_=mtl_cli.weighting.ew.EqualWeighting (n=6)" in ran.out
    assert "final epoch of each" in ran.out


def test_report_errors_are_one_line(sweep, mtl_main):
    ran = mtl_main("report", "nowhere")
    assert (ran.status, ran.err.strip()) == (2, "mtl report: error: nowhere: no such file or folder; give run "
                                                "directories or sweep directories of mtl train")
    ran = mtl_main("report", str(sweep), "--ref", "weighting=dwa")
    assert ran.status == 2 and ran.err.startswith("mtl report: error: --ref 'weighting=dwa' matches 0 groups")


def test_mtl_report_does_not_import_torch(sweep):
    code = ("import sys; from mtl_cli.cli import main; status = main(['report', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow  # 10-17 s: a real sweep; the default run reports on real runs in test_report_reads_a_real_training_run
def test_report_draws_what_the_runs_logged_over_time(mtl_main, tmp_path):
    """A real sweep with TensorBoard events: validation curves, task weights and gradient conflicts per group; a
    curve is the mean of the runs' logged values (read back here with tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = ["data.dataset.scenes={train:32,val:8,test:8}", "data.dataset.image_size=32", "data.batch_size=16",
            "trainer.max_epochs=2", "trainer.progress=none", "logger.log_every=1", "logger.images=0"]
    assert mtl_main("train", "-m", *tiny, "weighting=ew", "seed=0,1", "hydra.sweep.dir=sweep/ew").status == 0
    assert mtl_main("train", *tiny, "weighting=pcgrad", "hydra.run.dir=sweep/pcgrad").status == 0
    ran = mtl_main("report", "sweep")
    assert ran.status == 0, ran
    for name in ("val_curves.png", "weights.png", "conflicts.png", "metrics.png"):
        assert (tmp_path / "sweep/report" / name).read_bytes()[:4] == b"\x89PNG", name
    html = (tmp_path / "sweep/report/report.html").read_text()
    assert html.count("<img ") == 4 and "<table>" in html and "weighting=pcgrad" in html
    from mtl_cli.report.curves import band, scalars

    runs = [tmp_path / "sweep/ew" / str(job) for job in (0, 1)]  # weighting=ew, seeds 0 and 1
    steps, mean, low, high = band([scalars(run)["val/loss/depth"] for run in runs])
    by_hand = []
    for run in runs:
        events = EventAccumulator(str(run))
        events.Reload()
        by_hand.append([e.value for e in events.Scalars("val/loss/depth")])
    assert list(steps) == [2, 4] and mean.tolist() == pytest.approx([sum(v) / 2 for v in zip(*by_hand)])
    assert (low <= mean).all() and (mean <= high).all()
