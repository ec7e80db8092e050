"""mtl export: the exported model (ONNX through onnxruntime, TorchScript, torch.export's ExportedProgram) gives the
PyTorch model's outputs at batch and image sizes other than the ones it was exported with, carries what mtl predict
needs, and a failed check leaves no file; mtl predict ckpt=model.onnx writes what best.pt writes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.io import write_png

from conftest import run_mtl
from mtl_cli.build import resolve_data
from mtl_cli.engine.checkpoint import load_checkpoint
from mtl_cli.engine.state import trained_model

pytestmark = pytest.mark.usefixtures("one_thread")


def pytorch_model(tiny_run: Path):
    checkpoint = load_checkpoint(tiny_run / "checkpoints" / "best.pt", "eval")
    tasks, model = trained_model(resolve_data(OmegaConf.create(checkpoint["config"])), checkpoint, torch.device("cpu"))
    return checkpoint, tasks, model


def images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height + width))


def assert_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float):
    """Within `tolerance` of the output's scale, max(1, its largest magnitude): export.py's rule."""
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= tolerance * scale


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory):  # 15 s of torch's exporter: its tests run with -m slow
    """The tiny run's best.pt exported as ONNX with the defaults (exported at batch 2)."""
    pytest.importorskip("onnxruntime", reason='the export extra is not installed: pip install "mtl-cli[export]"')
    folder = tmp_path_factory.mktemp("onnx_export")
    ran = run_mtl("export", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={folder / 'run'}",
                  cwd=folder)
    assert ran.status == 0, ran
    return folder / "run" / "model.onnx", ran


@pytest.mark.slow
def test_onnx_matches_pytorch_at_other_batch_and_image_sizes(onnx_export, tiny_run):
    import onnxruntime

    path, ran = onnx_export
    checkpoint, tasks, model = pytorch_model(tiny_run)
    runner = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in runner.get_outputs()]
    assert names == list(tasks)  # one output per task, none of them a dict on the default tasks
    for x in (images(3, 32, 32), images(1, 48, 40)):  # exported at batch 2, size 32x32
        got = dict(zip(names, runner.run(names, {"image": x.numpy()})))
        with torch.no_grad():
            expected = model(x)
        for name in names:
            assert got[name].shape == tuple(expected[name].shape)
            assert_close(torch.from_numpy(got[name]), expected[name], 1e-4)
    metadata = runner.get_modelmeta().custom_metadata_map
    assert metadata["mtl.config"] == checkpoint["config"]
    assert json.loads(metadata["mtl.input_size"]) == [32, 32]
    assert json.loads(metadata["mtl.tasks"]) == list(tasks)
    assert metadata["mtl.version"]
    assert "verified against the PyTorch model on 4 images of the val split" in ran.out
    assert all(f"  {name} " in ran.out for name in tasks)
    assert "image size dynamic" in ran.out
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.slow
def test_load_onnx_rebuilds_each_tasks_output_and_config(onnx_export, tiny_run):
    from mtl_cli.engine.state import HydraValues
    from mtl_cli.inference.export import NamedOutputs, structure
    from mtl_cli.inference.onnx_model import OnnxModel, load_onnx, session

    path, _ = onnx_export
    _, tasks, model = pytorch_model(tiny_run)
    x = images(3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    # A dict output (detection's) travels as `task.key` outputs and comes back as the dict.
    nested = {"segmentation": expected["segmentation"], "boxes": {"ltrb": expected["depth"], "n": expected["count"]}}
    assert list(NamedOutputs(lambda _: nested)(x)) == ["segmentation", "boxes.ltrb", "boxes.n"]
    assert structure(nested) == {"segmentation": None, "boxes": ["ltrb", "n"]}

    class Flat:
        def run(self, names, feeds):
            return [{"segmentation": nested["segmentation"], "boxes.ltrb": nested["boxes"]["ltrb"],
                     "boxes.n": nested["boxes"]["n"]}[n].numpy() for n in names]

        def get_outputs(self):
            return [type("Output", (), {"name": n}) for n in ("segmentation", "boxes.ltrb", "boxes.n")]
    rebuilt = OnnxModel(Flat(), structure(nested))(x)
    assert torch.equal(rebuilt["boxes"]["n"], nested["boxes"]["n"]) and torch.equal(rebuilt["segmentation"],
                                                                                     nested["segmentation"])
    composed = OmegaConf.create({"ckpt": str(path), "data": {"batch_size": 5}})
    loaded = load_onnx(composed, HydraValues(["data.batch_size=5"], {}, []))
    assert loaded.input_size == (32, 32) and list(loaded.tasks) == list(tasks)
    assert loaded.cfg.data.batch_size == 5  # this command line's override on the stored config
    got = loaded.model(x)
    for name in tasks:
        assert_close(got[name], expected[name], 1e-4)
    assert session(path).get_outputs()[0].name == "segmentation"


@pytest.mark.slow
def test_predict_with_the_onnx_model_writes_what_best_pt_writes(onnx_export, tiny_run, mtl_main, tmp_path):
    path, _ = onnx_export
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i, (height, width) in enumerate([(32, 32), (40, 56), (64, 48)]):
        write_png((torch.rand(3, height, width, generator=generator) * 255).to(torch.uint8), str(folder / f"{i}.png"))
    best = tiny_run / "checkpoints" / "best.pt"
    for ckpt, out in ((best, "pt"), (path, "onnx")):
        ran = mtl_main("predict", f"ckpt={ckpt}", f"input={folder}", f"out={tmp_path / out}",
                       f"hydra.run.dir={tmp_path / (out + '_run')}")
        assert ran.status == 0, ran
    files = sorted(p.relative_to(tmp_path / "pt") for p in (tmp_path / "pt").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "onnx") for p in (tmp_path / "onnx").rglob("*") if p.is_file())
    assert len(files) > 3 * 4
    for name in files:
        ours, theirs = tmp_path / "onnx" / name, tmp_path / "pt" / name
        if name.suffix == ".png":  # the values: one level of rounding apart at most; the pictures drawn from them
            # (depth's colour map over the image's own range, the overlays) a few levels
            a, b = (np.asarray(Image.open(p)).astype(np.int64) for p in (ours, theirs))  # palette PNGs: indices
            assert a.shape == b.shape and a.dtype == b.dtype
            assert np.abs(a - b).max() <= (8 if name.stem.endswith(("_preview", "_overlay")) else 1), name
        else:
            for line_a, line_b in zip(ours.read_text().splitlines(), theirs.read_text().splitlines(), strict=True):
                assert_json_close(json.loads(line_a), json.loads(line_b))


def assert_json_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_json_close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_json_close(x, y)
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    else:
        assert a == b


def test_torchscript_matches_pytorch_at_another_batch_size(mtl_main, tiny_run, tmp_path):
    ran = mtl_main("export", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", "format=torchscript",
                   f"out={tmp_path / 'ts' / 'model.pt'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert ran.status == 0, ran
    assert "image size fixed at 32x32" in ran.out
    checkpoint, tasks, model = pytorch_model(tiny_run)
    extra = {"mtl.config": "", "mtl.input_size": ""}
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.pt"), _extra_files=extra)
    assert extra["mtl.config"].decode() == checkpoint["config"] and json.loads(extra["mtl.input_size"]) == [32, 32]
    x = images(5, 32, 32)
    with torch.no_grad():
        got, expected = scripted(x), model(x)
    assert list(got) == list(tasks)
    for name in tasks:
        assert_close(got[name], expected[name], 1e-5)


@pytest.mark.slow  # 10 s of torch.export, as format=onnx: the default tier exports through torchscript
def test_exported_program_matches_pytorch_at_other_batch_and_image_sizes(mtl_main, tiny_run, tmp_path):
    ran = mtl_main("export", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", "format=exported_program",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert ran.status == 0, ran
    _, tasks, model = pytorch_model(tiny_run)
    program = torch.export.load(str(tmp_path / "run" / "model.pt2")).module()
    for x in (images(5, 32, 32), images(1, 64, 48)):
        with torch.no_grad():
            got, expected = program(x), model(x)
        for name in tasks:
            assert_close(got[name], expected[name], 1e-5)


def test_a_verification_failure_is_an_error_and_leaves_no_file(mtl_main, tiny_run, tmp_path, monkeypatch):
    from mtl_cli.inference import export

    read = export.READERS["torchscript"]

    def off_by_a_little(path):
        model = read(path)
        return lambda x: {name: value + 1e-3 * (name == "depth") for name, value in model(x).items()}
    monkeypatch.setitem(export.READERS, "torchscript", off_by_a_little)
    ran = mtl_main("export", f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}", "format=torchscript",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert ran.status == 2
    assert "differs from the PyTorch model beyond the tolerance 1e-05 in depth (1.00e-03)" in ran.err
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(("model", ".model"))]


def test_format_errors_are_one_line(mtl_main, tiny_run, tmp_path, monkeypatch):
    best = f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}"
    ran = mtl_main("export", best, "format=onnxx")
    assert ran.status == 2 and len(ran.err.strip().splitlines()) == 1
    assert "format=onnxx: not an export format (did you mean 'onnx'?)" in ran.err
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    ran = mtl_main("export", f"ckpt={bad}", "format=torchscript")
    assert ran.status == 2 and "is not a readable mtl checkpoint" in ran.err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra not installed
    ran = mtl_main("export", best)
    assert ran.status == 2 and 'pip install "mtl-cli[export]"' in ran.err and len(ran.err.strip().splitlines()) == 1


def test_an_onnx_file_without_mtls_metadata_is_refused(mtl_main, tmp_path):
    onnx = pytest.importorskip("onnx", reason='the export extra is not installed: pip install "mtl-cli[export]"')
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    out = helper.make_tensor_value_info("depth", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["depth"])], "bare", [image], [out])
    onnx.save(helper.make_model(graph), str(tmp_path / "bare.onnx"))  # a valid model that mtl export did not write
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "image.png"))
    ran = mtl_main("predict", f"ckpt={tmp_path / 'bare.onnx'}", f"input={tmp_path / 'image.png'}")
    assert ran.status == 2 and "lacks the metadata mtl export writes (mtl.config" in ran.err
    assert len(ran.err.strip().splitlines()) == 1
