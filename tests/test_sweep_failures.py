"""A sweep runs every job: the failed ones (user errors and crashes alike) are named at the end, and the exit
status says that some failed."""

from __future__ import annotations

import json

from conftest import TINY_RUN


def test_a_failing_first_job_does_not_cancel_the_others(mtl_main, tmp_path):
    r = mtl_main("train", "-m", "seed=abc,0", *TINY_RUN, "hydra.sweep.dir=sweep")
    assert r.status == 2, r
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file()  # the job after the failed one ran
    assert not (tmp_path / "sweep" / "0" / "metrics.json").exists()
    failed = json.loads((tmp_path / "sweep" / "0" / "failed.json").read_text())
    assert failed["kind"] == "user error" and "seed='abc' is not valid" in failed["error"]
    assert r.err.endswith("mtl train: 1 of 2 jobs failed:\n  job 0 (seed=abc): user error: seed='abc' is not "
                          "valid: expected an integer of at least 0\n")


def test_a_crashing_job_is_named_with_its_error_and_the_sweep_goes_on(mtl_main, tmp_path, monkeypatch):
    import mtl_cli.train as train_module

    real_train = train_module.train

    def crashes_on_seed_1(cfg, run_dir, checkpoint=None):
        if cfg.seed == 1:
            raise RuntimeError("a bug")
        return real_train(cfg, run_dir, checkpoint)
    monkeypatch.setattr(train_module, "train", crashes_on_seed_1)
    r = mtl_main("train", "-m", "seed=1,2,3", *TINY_RUN, "hydra.sweep.dir=sweep")
    assert r.status == 1, r
    assert "  job 0 (seed=1): crash: RuntimeError: a bug" in r.err and "1 of 3 jobs failed" in r.err
    assert "Traceback" in r.out + r.err  # a bug keeps its traceback (in the job's log and on the console)
    assert [(tmp_path / "sweep" / str(i) / "metrics.json").is_file() for i in range(3)] == [False, True, True]


def test_a_sweep_without_failures_exits_0_and_a_reused_sweep_dir_forgets_old_failures(mtl_main, tmp_path):
    assert mtl_main("train", "-m", "seed=abc", *TINY_RUN, "hydra.sweep.dir=sweep").status == 2
    r = mtl_main("train", "-m", "seed=0", *TINY_RUN, "hydra.sweep.dir=sweep")
    assert r.status == 0 and "failed" not in r.err, r
    assert not (tmp_path / "sweep" / "0" / "failed.json").exists()
