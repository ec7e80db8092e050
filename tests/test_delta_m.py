"""delta_m: the formula on published NYUv2 numbers against a hand computation, baselines from config and from
single-task runs, and val/delta_m through mtl train and mtl eval."""

import json

import pytest
from test_cli import TINY, ok, run_dirs, scalar_tags

from mtl_cli.errors import UserError
from mtl_cli.metrics.delta_m import DeltaM, baselines_from_runs, build_delta_m, delta_m

# The single-task NYUv2 baselines LibMTL reports (DeepLab ResNet-50): mIoU, pixel accuracy (%), depth absolute and
# relative error, normals mean and median angle (degrees), and % of pixels within 11.25, 22.5 and 30 degrees.
STL = {"segmentation": {"miou": 38.30, "pixel_acc": 63.76}, "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
       "normals": {"mean_angle": 25.01, "median_angle": 19.21, "within_11.25": 30.14, "within_22.5": 57.20,
                   "within_30": 69.15}}
DIRECTIONS = {"segmentation": {"miou": True, "pixel_acc": True}, "depth": {"abs_err": False, "rel_err": False},
              "normals": {"mean_angle": False, "median_angle": False, "within_11.25": True, "within_22.5": True,
                          "within_30": True}}
# A hand-made multi-task row.
MTL_ROW = {"segmentation": {"miou": 40.00, "pixel_acc": 65.00}, "depth": {"abs_err": 0.6000, "rel_err": 0.2500},
           "normals": {"mean_angle": 24.00, "median_angle": 18.00, "within_11.25": 31.00, "within_22.5": 58.00,
                       "within_30": 70.00}}
# By hand, per metric, 100 * (+-)(M - B) / B (minus where lower is better):
#   miou       +(40.00 - 38.30) / 38.30   = +4.4386    pixel_acc  +(65.00 - 63.76) / 63.76  = +1.9448
#   abs_err    -(0.6000 - 0.6754) / 0.6754 = +11.1638  rel_err    -(0.2500 - 0.2780) / 0.2780 = +10.0719
#   mean       -(24.00 - 25.01) / 25.01   = +4.0384    median     -(18.00 - 19.21) / 19.21  = +6.2988
#   11.25      +(31.00 - 30.14) / 30.14   = +2.8534    22.5       +(58.00 - 57.20) / 57.20  = +1.3986
#   30         +(70.00 - 69.15) / 69.15   = +1.2292
# Over every metric: 43.4375 / 9 = 4.8264.
# Per task first: seg (4.4386 + 1.9448) / 2 = 3.1917, depth (11.1638 + 10.0719) / 2 = 10.6179,
#   normals (4.0384 + 6.2988 + 2.8534 + 1.3986 + 1.2292) / 5 = 3.1637; mean 16.9733 / 3 = 5.6578.
BY_METRIC, BY_TASK = 4.82639, 5.65775


def test_delta_m_on_published_nyuv2_baselines_matches_the_hand_computation():
    assert delta_m(MTL_ROW, STL, DIRECTIONS, "metrics") == pytest.approx(BY_METRIC, abs=1e-4)
    assert delta_m(MTL_ROW, STL, DIRECTIONS, "tasks") == pytest.approx(BY_TASK, abs=1e-4)
    assert delta_m(STL, STL, DIRECTIONS) == 0.0
    worse = {task: {m: v * (0.9 if DIRECTIONS[task][m] else 1.1) for m, v in row.items()} for task, row in STL.items()}
    assert delta_m(worse, STL, DIRECTIONS, "metrics") == pytest.approx(-10.0)  # 10% worse everywhere


def test_baselines_are_checked():
    with pytest.raises(UserError, match="does not train"):
        DeltaM({"edges": {"f1": 0.5}}, DIRECTIONS)
    with pytest.raises(UserError, match="it computes: miou, pixel_acc"):
        DeltaM({"segmentation": {"mIoU": 0.5}}, DIRECTIONS)
    with pytest.raises(UserError, match="non-zero"):
        DeltaM({"segmentation": {"miou": 0}}, DIRECTIONS)
    with pytest.raises(UserError, match="metrics averages"):
        DeltaM(STL, DIRECTIONS, "average")
    assert build_delta_m(None, [], DIRECTIONS) is None


def write_run(path, metrics, best=True):
    path.mkdir(parents=True)
    result = {"loss": {}, "metrics": metrics, "epoch": 1}
    (path / "metrics.json").write_text(json.dumps({"final": result, "best": result if best else None}))
    return path


def test_baselines_from_single_task_runs_and_the_config(tmp_path):
    seg = write_run(tmp_path / "seg", {"segmentation": STL["segmentation"]})
    depth = write_run(tmp_path / "depth", {"depth": STL["depth"]}, best=False)  # no best: the final results
    normals = write_run(tmp_path / "normals", {"normals": STL["normals"]})
    assert baselines_from_runs([seg, depth, normals]) == STL
    delta = build_delta_m(None, [seg, depth, normals], DIRECTIONS, "tasks")
    assert delta(MTL_ROW) == pytest.approx(BY_TASK, abs=1e-4)
    # a config baseline overrides the run's value of that metric only
    delta = build_delta_m({"depth": {"abs_err": 0.6000}}, [seg, depth, normals], DIRECTIONS)
    assert delta.baselines["depth"] == {"abs_err": 0.6000, "rel_err": 0.2780}
    with pytest.raises(UserError, match="in both"):
        baselines_from_runs([seg, seg])
    with pytest.raises(UserError, match="metrics.json does not exist"):
        baselines_from_runs([tmp_path / "nowhere"])


def test_val_delta_m_through_train_and_eval(mtl_main, tmp_path):
    ok(mtl_main("train", *TINY, "tasks=[segmentation]", "hydra.run.dir=stl"))  # in tmp_path
    stl = tmp_path / "stl"
    result = ok(mtl_main("train", *TINY, "tasks=[segmentation,depth]", f"baselines_from=[{stl}]",
                         "baselines={depth: {abs_err: 0.5}}", "delta_m_average=tasks", "trainer.monitor=val/delta_m",
                         "hydra.run.dir=mtl"))
    report = json.loads((tmp_path / "mtl" / "metrics.json").read_text())
    base = json.loads((stl / "metrics.json").read_text())["best"]["metrics"]["segmentation"]
    final = report["final"]["metrics"]
    seg = [(final["segmentation"][m] - base[m]) / base[m] for m in ("miou", "pixel_acc")]
    depth = [-(final["depth"]["abs_err"] - 0.5) / 0.5]
    assert report["final"]["delta_m"] == pytest.approx(100 * (sum(seg) / 2 + depth[0]) / 2, rel=1e-6)
    assert report["monitor"] == {"name": "val/delta_m", "mode": "max",
                                 "value": max(report["final"]["delta_m"], report["best"]["delta_m"])}
    assert "delta_m % ↑" in result.out
    assert "val/delta_m" in scalar_tags(tmp_path / "mtl")
    # the single-task run against its own best epoch: mtl eval of best.pt reproduces it, so delta_m is 0
    ok(mtl_main("eval", f"ckpt={stl}/checkpoints/best.pt", f"baselines_from=[{stl}]", "hydra.run.dir=eval"))
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["delta_m"] == pytest.approx(0.0, abs=1e-9)
    assert run_dirs(tmp_path)  # metrics.json files are where the runs were pointed


def test_monitoring_delta_m_without_baselines_says_what_is_missing(mtl_main):
    result = mtl_main("train", *TINY, "trainer.monitor=val/delta_m")
    assert result.status == 2 and "needs baselines or baselines_from" in result.err


def test_malformed_baselines_and_a_unit_slip_are_reported(caplog):
    for baselines in ([1], {"segmentation": {}}, {"segmentation": 0.38}):
        with pytest.raises(UserError, match="must map each task to its metrics"):
            DeltaM(baselines, DIRECTIONS)
        with pytest.raises(UserError, match="must map each task to its metrics"):
            build_delta_m(baselines, [], DIRECTIONS)
    delta = DeltaM({"segmentation": {"miou": 38.30}}, DIRECTIONS)  # a percentage for a fraction
    with caplog.at_level("WARNING", logger="mtl"):
        delta({"segmentation": {"miou": 0.40}})
    assert "baselines.segmentation.miou=38.3 is far from this run's 0.4" in caplog.text
