"""mtl explain: integrated gradients' completeness per task on a trained checkpoint, saliency and integrated
gradients against hand computations on a linear model, the per-task targets against independent definitions, and
the command's files."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torchvision.io import write_png

from mtl_cli.analysis import targets
from mtl_cli.analysis.saliency import Explained, attribute
from mtl_cli.engine.state import HydraValues
from mtl_cli.inference.loaded import Loaded, packaged_task
from mtl_cli.inference.writers import SegmentationWriter
from mtl_cli.models.detection import decode_detections
from mtl_cli.paths import config_dir
from mtl_cli.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["integrated_gradients", "saliency", "gradcam"]


def test_integrated_gradients_completeness_per_task(tiny_run, monkeypatch):
    """Sundararajan et al.'s completeness: the attributions sum to f(image) - f(black image), f computed here by the
    model's plain forward, to 1e-3 of the larger of the gap and the summed map (float32, 256 Gauss-Legendre steps,
    a 32x32 image; 64 steps leave 2e-3 of the summed map on segmentation)."""
    monkeypatch.setenv("MTL_TRUST_CHECKPOINT", "1")  # the test's own checkpoint, built without Hydra's config search
    loaded = Loaded.of(OmegaConf.create({"ckpt": str(tiny_run / "checkpoints" / "best.pt")}), HydraValues([], {}, []))
    model = loaded.model.requires_grad_(False)
    explained = Explained(model).eval()
    raw = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = loaded.preprocess(raw)[None]
    with torch.no_grad():
        outputs = model(image)
    for task in loaded.tasks:
        target = loaded.entry(task, "explain")(outputs[task])
        with torch.no_grad():
            gap = float(target.scalar(model(image)[task])[0] - target.scalar(model(torch.zeros_like(image))[task])[0])
        heat, record = attribute("integrated_gradients", lambda x, t=task: target.scalar(explained(x)[t]), image,
                                 steps=256, internal_batch_size=256)
        assert heat.shape == (32, 32)
        mass = float(heat.sum())  # (at most the attributions' total magnitude: the scale their sum cancels from)
        assert mass > 1e-3, task  # attributions of zero would make the check empty
        assert abs(record["attribution_sum"] - gap) <= 1e-3 * max(abs(gap), mass), task
        assert record["delta"] == pytest.approx(record["attribution_sum"] - gap, abs=1e-5), task
        for method in ("saliency", "gradcam"):  # (their command-line runs are in the slow tier)
            heat, record = attribute(method, lambda x, t=task: target.scalar(explained(x)[t]), image, explained.tap)
            assert heat.shape == (32, 32) and record == {} and heat.min() >= 0, (task, method)


def linear_model(seed: int = 0):
    """f(x) = sum of w * x with weights of both signs and one colour channel 1000 times the others."""
    weights = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
    weights[:, 1] *= 1000.0
    return weights, lambda x: (weights * x).sum((1, 2, 3))


def test_saliency_of_a_linear_model_is_the_weights_magnitude():
    """The gradient of w.x is w: the map is max over channels of |w| (Simonyan et al.'s channel rule)."""
    weights, f = linear_model()
    image = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    heat, record = attribute("saliency", f, image)
    assert record == {}
    assert torch.equal(heat, weights[0].abs().amax(0))


def test_integrated_gradients_of_a_linear_model_is_input_times_weights():
    """Along the path from zero the gradient of w.x stays w: attributions are x * w exactly, their sum f(x)."""
    weights, f = linear_model()
    image = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    heat, record = attribute("integrated_gradients", f, image, steps=3)
    torch.testing.assert_close(heat, (image * weights)[0].sum(0).abs(), rtol=1e-5, atol=1e-3)
    assert record["value"] == pytest.approx(float((weights * image).sum()), rel=1e-5)
    assert record["baseline_value"] == 0.0
    assert abs(record["delta"]) <= 1e-5 * abs(record["value"])


def test_segmentation_target_is_the_mean_logit_over_the_biggest_predicted_object():
    logits = torch.zeros(1, 3, 2, 4)
    logits[0, 0] = 5.0                                   # background everywhere but:
    logits[0, 1, 0, :3] = torch.tensor([6.0, 7.0, 9.0])  # class 1 wins 3 pixels
    logits[0, 2, 1, 3] = 8.0                             # class 2 wins 1 pixel
    target = targets.region_logit(logits)
    assert "class 1" in target.says and "3 predicted pixels" in target.says
    assert float(target.scalar(logits)[0]) == pytest.approx((6 + 7 + 9) / 3)
    assert float(targets.region_logit(torch.zeros(1, 3, 2, 2)).scalar(torch.ones(1, 3, 2, 2))[0]) == 1.0  # all class 0


def test_detection_target_is_the_top_box_score_that_decoding_reports():
    generator = torch.Generator().manual_seed(0)
    output = {"logits": torch.randn(1, 20, 4, generator=generator), "ltrb": torch.rand(1, 20, 4, generator=generator),
              "centerness": torch.randn(1, 20, generator=generator), "points": torch.rand(20, 2) * 30,
              "strides": torch.full((20,), 8.0), "image_size": torch.tensor([32, 32])}
    best = decode_detections(output)[0]
    target = targets.top_box_score(output)
    assert float(target.scalar(output)[0]) == pytest.approx(float(best["scores"][0]), rel=1e-6)
    assert f"class {int(best['labels'][0])}" in target.says


def test_classification_like_targets_take_the_predicted_class():
    logits = torch.tensor([[0.5, -2.0, 3.0, 1.0]])
    for choose in (targets.class_logit, targets.top_label_logit, targets.count_value):
        assert float(choose(logits).scalar(logits * 2)[0]) == 6.0
    assert float(targets.count_value(torch.tensor([[2.5]])).scalar(torch.tensor([[4.0]]))[0]) == 4.0
    cosine = {"embedding": torch.zeros(1, 2), "cosine": torch.tensor([[0.1, 0.9, -0.3]])}
    assert float(targets.identity_cosine(cosine).scalar(cosine)[0]) == pytest.approx(0.9)


def loaded_with(name: str, loss: str, **entries) -> Loaded:
    """A checkpoint's task `name` trained with `loss`, with these of its config's entries (writer, explain)."""
    cfg = OmegaConf.create({"tasks": {name: {"loss": {"_target_": loss}}}})
    task = Task(name, name, head=None, loss=None, metrics={}, **entries)
    return Loaded(cfg, {}, {name: task}, None, torch.device("cpu"), (32, 32))


def packaged_loss(name: str) -> str:
    return OmegaConf.load(config_dir() / "tasks" / f"{name}.yaml").loss._target_


def test_every_task_config_names_its_scalar_and_a_checkpoint_from_before_gets_the_packaged_entries():
    """Each configs/tasks/*.yaml builds a chooser of analysis/targets.py and names a writer; a task's own entry comes
    first; a task without one (a checkpoint trained before the entries) gets its packaged namesake's when that trains
    the same loss, and None otherwise (count trained as count_ce's classes must not get count's value writer)."""
    files = sorted((config_dir() / "tasks").glob("*.yaml"))
    assert len(files) >= 13
    for path in files:
        template = OmegaConf.load(path)
        choose = instantiate(template.explain)
        assert getattr(targets, choose.func.__name__) is choose.func, path.name
        assert "writer" in packaged_task(path.stem), path.name
        assert loaded_with(path.stem, "any.Loss", explain=choose).entry(path.stem, "explain") is choose
    before = loaded_with("segmentation", packaged_loss("segmentation"))
    assert before.entry("segmentation", "explain").func is targets.region_logit
    assert before.entry("segmentation", "writer").func is SegmentationWriter
    assert packaged_loss("count_ce") != packaged_loss("count")
    assert loaded_with("count", packaged_loss("count_ce")).entry("count", "writer") is None
    assert loaded_with("age", "any.Loss").entry("age", "explain") is None


def test_a_task_without_a_scalar_is_refused_in_one_line_before_any_map(tiny_run, mtl_main, tmp_path, monkeypatch):
    image_folder(tmp_path / "images")
    entry = Loaded.entry
    monkeypatch.setattr(Loaded, "entry", lambda self, name, key: None if name == "depth" else entry(self, name, key))
    ran = mtl_main("explain", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", f"input={tmp_path / 'images'}",
                   "explain.steps=2", "out=maps", "hydra.run.dir=run")
    assert ran.status == 2
    message = ran.err.strip()
    assert "\n" not in message and "task depth" in message and "+tasks.depth.explain=" in message
    assert not (tmp_path / "maps").exists()


def image_folder(folder):
    """Two good images of odd sizes and one corrupt file."""
    folder.mkdir()
    sizes = {"tall": (37, 23), "wide": (21, 45)}
    for name, (height, width) in sizes.items():
        write_png(torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(height),
                                dtype=torch.uint8), str(folder / f"{name}.png"))
    (folder / "broken.png").write_bytes(b"not a png at all")
    return sizes


@pytest.mark.parametrize("method", [METHODS[0], *(pytest.param(m, marks=pytest.mark.slow) for m in METHODS[1:])])
def test_explain_writes_one_overlay_per_task_and_image_and_a_grid(method, tiny_run, mtl_main, tmp_path):
    sizes = image_folder(tmp_path / "images")
    ran = mtl_main("explain", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", f"input={tmp_path / 'images'}",
                   f"method={method}", "explain.steps=4", "out=maps", "hydra.run.dir=run")
    assert ran.status == 0, ran
    tasks = ["count", "depth", "normals", "segmentation"]
    written = sorted(str(p.relative_to(tmp_path / "maps")) for p in (tmp_path / "maps").rglob("*") if p.is_file())
    assert written == sorted(["explain.json", "tall_grid.png", "wide_grid.png"]
                             + [f"{task}/{name}.png" for task in tasks for name in sizes])
    for task in tasks:
        for name, (height, width) in sizes.items():
            assert Image.open(tmp_path / "maps" / task / f"{name}.png").size == (width, height)
    record = json.loads((tmp_path / "maps" / "explain.json").read_text())
    assert record["method"] == method and [r["stem"] for r in record["images"]] == ["tall", "wide"]
    assert record["skipped"] == [str(tmp_path / "images" / "broken.png")]
    assert ("max_abs_delta" in record) == (method == "integrated_gradients")


def test_a_misspelt_method_is_one_line_listing_the_methods(tiny_run, mtl_main, tmp_path):
    image_folder(tmp_path / "images")
    ran = mtl_main("explain", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", f"input={tmp_path / 'images'}",
                   "method=integrated_gradient")
    assert ran.status == 2
    message = ran.err.strip()
    assert "\n" not in message and "did you mean 'integrated_gradients'" in message
    assert all(method in message for method in METHODS)
