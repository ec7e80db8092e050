"""mtl predict: the files written per image at its original size, checked against the model's forward pass on the
same preprocessed tensors (resized back as the spec says: bilinear on logits, then argmax); bad images skipped
and named; a subset of tasks; the user's mistakes as one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_RUN, run_mtl
from mtl_cli.engine.state import HydraValues
from mtl_cli.inference.inputs import Images
from mtl_cli.inference.loaded import Loaded
from mtl_cli.inference.predict import output_names, predict_batches
from mtl_cli.inference.writers import ClassWriter, DepthWriter, LandmarksWriter, MultilabelWriter

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"a.png": (50, 70), "sub/a.jpg": (33, 41), "b.png": (64, 64)}  # (height, width)


def image_folder(root: Path) -> Path:
    """Good images of odd sizes (two sharing a stem), one corrupt PNG, one file that is no image."""
    rng = np.random.default_rng(0)
    for name, (height, width) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image after the signature")
    (root / "notes.txt").write_text("not an image")
    return root


def loaded_of(ckpt: Path, *overrides: str) -> Loaded:
    from hydra import compose, initialize_config_dir

    from mtl_cli.paths import config_dir

    typed = [f"ckpt={ckpt}", "input=unused", *overrides]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        composed = compose("predict", overrides=typed)
    return Loaded.of(composed, HydraValues(typed, {}, []))


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def predicted(tiny_run, tmp_path_factory):
    """One predict run of the tiny default model (segmentation, depth, normals, count) on the folder, 2 a batch."""
    root = tmp_path_factory.mktemp("predict")
    images = image_folder(root / "images")
    ran = run_mtl("predict", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", f"input={images}", f"out={root / 'out'}",
                  "predict.batch_size=2", f"hydra.run.dir={root / 'run'}", cwd=root)
    return ran, images, root / "out", loaded_of(tiny_run / "checkpoints" / "best.pt")


def test_writes_the_expected_files_at_the_original_sizes(predicted):
    ran, images, out, _ = predicted
    assert ran.status == 0, ran
    names = {"a.png": "a", "sub/a.jpg": "sub__a", "b.png": "b"}  # equal stems get their folder
    expected = {"predictions.jsonl"}
    for name in names.values():
        expected |= {f"segmentation/{name}.png", f"segmentation/{name}_overlay.png", f"depth/{name}.png",
                     f"depth/{name}.json", f"depth/{name}_preview.png", f"normals/{name}.png"}
    assert files_under(out) == expected
    for source, name in names.items():
        size = SIZES[source][::-1]  # PIL: (width, height)
        for file, mode in [("segmentation/{}.png", "P"), ("segmentation/{}_overlay.png", "RGB"),
                           ("depth/{}.png", "I;16"), ("depth/{}_preview.png", "RGB"), ("normals/{}.png", "RGB")]:
            with Image.open(out / file.format(name)) as image:
                assert (image.size, image.mode) == (size, mode), file.format(name)
    assert "3 images predicted" in ran.err + ran.out and f"1 skipped: {images / 'corrupt.png'}" in ran.err + ran.out


def test_files_hold_the_models_forward_pass_resized_back(predicted):
    """Each image alone through model(preprocess(image)); the run batched two: eval mode makes them agree."""
    _, images, out, loaded = predicted
    rows = {row["name"]: row for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["a", "b", "sub__a"]
    for source, name in {"a.png": "a", "sub/a.jpg": "sub__a", "b.png": "b"}.items():
        image = torch.from_numpy(np.array(Image.open(images / source).convert("RGB"))).permute(2, 0, 1)
        with torch.no_grad():
            raw = loaded.model(loaded.preprocess(image)[None])
        size = image.shape[-2:]
        logits = F.interpolate(raw["segmentation"], size=size, mode="bilinear", align_corners=False)[0]
        labels = np.array(Image.open(out / f"segmentation/{name}.png"))
        assert (labels == logits.argmax(0).numpy()).mean() > 0.995  # a near-tie may flip between batch sizes
        depth = F.interpolate(raw["depth"], size=size, mode="bilinear", align_corners=False)[0, 0]
        stored = np.array(Image.open(out / f"depth/{name}.png")).astype(np.float64) / 1000
        np.testing.assert_allclose(stored, depth.clamp(0, 65.535).numpy(), atol=0.5e-3 + 1e-6)
        normals = F.normalize(F.interpolate(raw["normals"], size=size, mode="bilinear", align_corners=False), dim=1)[0]
        rgb = np.array(Image.open(out / f"normals/{name}.png")).transpose(2, 0, 1).astype(np.float64)
        np.testing.assert_allclose(rgb / 127.5 - 1, normals.numpy(), atol=0.5 / 127.5 + 1e-6)
        assert rows[name]["count"]["value"] == pytest.approx(float(raw["count"]), abs=1e-5)
        assert rows[name]["image"] == str(images / source)


def test_raw_outputs_equal_the_model_on_the_same_preprocessed_batch(predicted):
    _, images, _, loaded = predicted
    found = Images.of(str(images))
    batches = list(predict_batches(loaded, found, batch_size=2))
    assert [len(paths) for paths, _, _ in batches] == [2, 1] and found.skipped == [images / "corrupt.png"]
    for paths, pictures, outputs in batches:
        with torch.no_grad():
            expected = loaded.model(loaded.batch(pictures))
        assert set(outputs) == set(expected)
        for task, value in outputs.items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(value, expected[task].cpu(), rtol=0, atol=0)


def test_a_subset_of_tasks(tiny_run, mtl_main, tmp_path):
    images = image_folder(tmp_path / "images")
    ran = mtl_main("predict", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", f"input={images / 'b.png'}", "out=out",
                   "tasks=[count,segmentation]", "hydra.run.dir=run")
    assert ran.status == 0, ran
    assert files_under(tmp_path / "out") == {"segmentation/b.png", "segmentation/b_overlay.png", "predictions.jsonl"}
    assert set(json.loads((tmp_path / "out" / "predictions.jsonl").read_text())) == {"image", "name", "count"}


@pytest.mark.parametrize("argv, message", [
    (["input=nowhere"], "input=nowhere: no such file or folder"),
    (["input=images", "tasks=[segmentation,classification]"],
     "the checkpoint has no task classification; its tasks are segmentation, depth, normals, count"),
    (["input=images/corrupt.png"], "none of the 1 images could be read"),
])
def test_mistakes_are_one_line_errors(tiny_run, mtl_main, tmp_path, argv, message):
    image_folder(tmp_path / "images")
    ran = mtl_main("predict", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", *argv, "hydra.run.dir=run")
    assert ran.status == 2, ran
    error = [line for line in ran.err.splitlines() if "error" in line]
    assert len(error) == 1 and message in error[0] and "Traceback" not in ran.err, ran.err


def test_equal_stems_get_distinct_names_in_a_fixed_way():
    paths = [Path("/d/x/a.png"), Path("/d/y/a.png"), Path("/d/x/b.png"), Path("/d/x/c.png"), Path("/d/x/c.jpg")]
    names = output_names(paths)
    assert names == {paths[0]: "x__a", paths[1]: "y__a", paths[2]: "b", paths[3]: "x__c_png", paths[4]: "x__c_jpg"}
    assert output_names(reversed(paths)) == names


def test_image_level_records_and_scaled_points(tmp_path):
    """Softmax and sigmoid by hand; points in 0..1 scaled to the original width and height."""
    logits = torch.tensor([1.0, 3.0, -2.0])
    record = ClassWriter("classification", tmp_path, classes=["cat", "dog", "eel"]).write("x", None, logits)
    e = np.exp([1.0, 3.0, -2.0])
    assert record["label"] == "dog" and record["index"] == 1
    assert record["scores"] == pytest.approx(dict(zip(["cat", "dog", "eel"], e / e.sum())), abs=1e-6)
    record = MultilabelWriter("multilabel", tmp_path, threshold=0.5).write("x", None, torch.tensor([0.2, -0.1, 4.0]))
    assert record["labels"] == ["0", "2"] and record["scores"]["1"] == pytest.approx(1 / (1 + np.exp(0.1)), abs=1e-6)
    image = torch.zeros(3, 40, 100, dtype=torch.uint8)
    LandmarksWriter("landmarks", tmp_path).write("x", image, torch.tensor([[0.5, 0.25], [1.0, 0.0]]))
    assert json.loads((tmp_path / "landmarks" / "x.json").read_text())["points"] == [[50.0, 10.0], [100.0, 0.0]]
    assert Image.open(tmp_path / "landmarks" / "x.png").size == (100, 40)


def test_depth_png_holds_depth_times_scale_and_counts_what_it_clips(tmp_path):
    depth = torch.tensor([[[0.0012, 2.5], [70.0, -1.0]]])  # 70 m and -1 m do not fit a 16-bit PNG in millimetres
    DepthWriter("depth", tmp_path, scale=1000.0).write("x", torch.zeros(3, 2, 2, dtype=torch.uint8), depth)
    stored = np.array(Image.open(tmp_path / "depth" / "x.png"))
    assert stored.tolist() == [[1, 2500], [65535, 0]]
    sidecar = json.loads((tmp_path / "depth" / "x.json").read_text())
    assert sidecar["scale"] == 1000.0 and sidecar["max"] == pytest.approx(70.0)
    assert (sidecar["below_zero"], sidecar["above_range"]) == (1, 1)
    preview = np.array(Image.open(tmp_path / "depth" / "x_preview.png"))
    assert preview[1, 1].tolist() == [0, 0, 0] and preview[0, 0].sum() > preview[1, 0].sum()  # none; near is bright


@pytest.mark.slow
def test_detection_landmarks_identity_and_image_level_tasks(tmp_path):
    """A tiny run of the other tasks of digit_scenes, then predict on two images of odd sizes."""
    tasks = "tasks=[detection,landmarks,identity,classification,multilabel,attributes]"
    ran = run_mtl("train", *TINY_RUN, tasks, f"hydra.run.dir={tmp_path / 'train'}", cwd=tmp_path)
    assert ran.status == 0, ran
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name, (height, width) in {"p.png": (45, 80), "q.jpg": (90, 30)}.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    ran = run_mtl("predict", f"ckpt={tmp_path / 'train' / 'checkpoints' / 'best.pt'}", f"input={images}", "out=out",
                  "++tasks.detection.writer.overlay_score=0.0", "hydra.run.dir=run", cwd=tmp_path)
    assert ran.status == 0, ran
    out = tmp_path / "out"
    assert files_under(out) == {"predictions.jsonl"} | {f"{task}/{name}{suffix}" for name in "pq" for task, suffix in [
        ("detection", ".json"), ("detection", ".png"), ("landmarks", ".json"), ("landmarks", ".png"),
        ("identity", ".npy")]}
    for name, (height, width) in {"p": (45, 80), "q": (90, 30)}.items():
        boxes = np.array(json.loads((out / f"detection/{name}.json").read_text())["boxes"]).reshape(-1, 4)
        assert len(boxes) and (boxes[:, [0, 2]] <= width + 1e-3).all() and (boxes[:, [1, 3]] <= height + 1e-3).all()
        assert Image.open(out / f"detection/{name}.png").size == (width, height)
        assert Image.open(out / f"landmarks/{name}.png").size == (width, height)
        embedding = np.load(out / f"identity/{name}.npy")
        assert embedding.shape == (64,) and embedding.dtype == np.float32
        assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ["p", "q"]
    for row in rows:
        assert set(row) == {"image", "name", "classification", "multilabel", "attributes"}
        assert row["classification"]["label"] in [str(i) for i in range(10)]
        assert sum(row["classification"]["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert len(row["multilabel"]["scores"]) == 10
