"""trainer.channels_last and trainer.compile change how the model runs, not what it computes: the same losses as
the plain run, for a loss-based and a gradient method. Through one compiled trunk, the T backward passes of
grad_target=params gave wrong task gradients after the first (torch 2.14, inductor on the CPU), so there the trunk
stays eager and the run says so: the pcgrad case would fail without that."""

from __future__ import annotations

import json

import pytest

RUN = ["data.dataset.scenes={train:32,val:8,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
       "trainer.max_epochs=1", "trainer.progress=none", "logger=console"]


def final(mtl_main, tmp_path, name: str, *overrides: str) -> dict:
    ran = mtl_main("train", *RUN, *overrides, f"hydra.run.dir={name}")
    assert ran.status == 0, ran
    eager_trunk = "trainer.compile: the trunk stays eager" in ran.out
    assert eager_trunk == ("trainer.compile=true" in overrides and "weighting=pcgrad" in overrides
                           and "weighting.grad_target=representation" not in overrides), ran.out[-2000:]
    return json.loads((tmp_path / name / "metrics.json").read_text())["final"]


def assert_same(a: dict, b: dict, tol: float) -> None:
    """The validation losses after the epoch (the continuous measure: threshold metrics such as normals' within_22.5
    flip a pixel or two at the last digit of a fused kernel)."""
    assert a["loss"].keys() == b["loss"].keys()
    for task, value in a["loss"].items():
        assert value == pytest.approx(b["loss"][task], rel=tol), task


@pytest.mark.parametrize("method", [["weighting=ew"], ["weighting=pcgrad", "weighting.grad_target=representation"]],
                         ids=["ew", "pcgrad-representation"])
def test_channels_last_trains_as_the_plain_layout(mtl_main, tmp_path, method):
    assert_same(final(mtl_main, tmp_path, "plain", *method),
                final(mtl_main, tmp_path, "channels_last", *method, "trainer.channels_last=true"), 1e-3)


@pytest.mark.slow  # torch.compile on the CPU: minutes of inductor compiling
@pytest.mark.parametrize("method", [["weighting=ew"], ["weighting=pcgrad"],
                                    ["weighting=pcgrad", "weighting.grad_target=representation"]],
                         ids=["ew", "pcgrad", "pcgrad-representation"])
def test_compile_trains_as_eager(mtl_main, tmp_path, method):
    assert_same(final(mtl_main, tmp_path, "eager", *method),
                final(mtl_main, tmp_path, "compiled", *method, "trainer.compile=true"), 1e-3)
