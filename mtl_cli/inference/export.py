"""mtl export: a trained checkpoint as one self-contained model for another runtime (ONNX, TorchScript, or a
torch.export ExportedProgram), checked against the PyTorch model before it is kept.

The exported model takes a float image batch [B, 3, H, W] in [0, 1] (the model normalises inside) and has one
output per task; a task whose head returns a dict (detection) gives one output per key, named `<task>.<key>`.
The batch size is dynamic in every format. The image size is dynamic where the model allows it: torch.export is
asked to keep height and width symbolic (Dim.AUTO) and keeps them so for convolutional backbones, while a backbone
that checks its input size (ViT, which asserts it; the detection head, which records the size as numbers) pins them
to the size trained on. TorchScript is traced, so only its batch size is known to generalise; its image size stays
the one trained on.

ONNX goes through torch.onnx.export's dynamo exporter (torch.export, then ONNX Script's translation), the default
and maintained path since torch 2.9; the TorchScript-based exporter is deprecated. Its metadata_props carry what
`mtl predict ckpt=model.onnx` needs (inference/onnx_model.py): the checkpoint's config YAML (unresolved, as
checkpoints store it), the input size, the tasks and their outputs, and the mtl version. The torch formats carry the
same entries as extra files.

Verification runs the PyTorch model and the exported file, read back from disk, on real images of the checkpoint's
data split (random images only when the data cannot be read), at a batch size other than the one exported with,
at batch size 1, and at twice the image size where that is dynamic. The largest absolute difference of each output
must stay within `tolerance` times the output's scale (max(1, its largest magnitude)); the file is written under a
temp name and renamed only once verified.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

import mtl_cli
from mtl_cli.build import build_dataset, build_loader
from mtl_cli.engine.state import HydraValues
from mtl_cli.errors import UserError, suggest
from mtl_cli.inference.loaded import Loaded
from mtl_cli.launch import quiet

log = logging.getLogger("mtl")

SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported_program": ".pt2"}
# The largest difference allowed, as a fraction of an output's scale. The torch formats run the same ATen kernels
# as the model (measured: 0 to 1e-7); onnxruntime has kernels of its own (other summation orders, batch norm folded
# into the convolutions), whose float32 rounding grows with depth: measured up to 3e-7 on the default model, and
# a few 1e-6 is usual on ResNet-sized ones, so 1e-4 leaves room while a wrong graph (a missed eval mode gives
# differences of order 1) fails at once.
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5, "exported_program": 1e-5}
EXTRA = 'pip install "mtl-cli[export]"'
EXAMPLE_BATCH = 2  # torch.export specialises a size of 1; the verification uses other sizes


class NamedOutputs(nn.Module):
    """The model with its outputs flattened into one dict of tensors: `task`, or `task.key` for a dict output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return flatten(self.model(image))


def flatten(outputs: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for task, output in outputs.items():
        if isinstance(output, dict):
            flat.update({f"{task}.{key}": value for key, value in output.items()})
        else:
            flat[task] = output
    return flat


def structure(outputs: dict) -> dict[str, list[str] | None]:
    """{task: None for a tensor output, or its dict's keys}: how onnx_model.py rebuilds the outputs."""
    return {task: list(output) if isinstance(output, dict) else None for task, output in outputs.items()}


def export(cfg: DictConfig, run_dir: Path, hydra: HydraValues) -> dict:
    """Writes cfg.ckpt's model as cfg.format to cfg.out (default <run_dir>/model<suffix>), verified."""
    form = str(cfg.format)
    if form not in SUFFIX:
        raise UserError(f"format={form}: not an export format{suggest(form, SUFFIX)}; give one of "
                        f"{', '.join(SUFFIX)}")
    if cfg.get("tolerance") is not None and not float(cfg.tolerance) >= 0:
        raise UserError(f"tolerance={cfg.tolerance}: give a number >= 0, or null for the format's own")
    if form == "onnx":
        require_onnx()
    loaded = Loaded.of(cfg, hydra)
    model = NamedOutputs(loaded.model.cpu().eval()).eval()
    images, source = sample_images(loaded)
    with torch.no_grad():
        reference = model.model(images[:EXAMPLE_BATCH])
    metadata = {"mtl.config": loaded.checkpoint["config"], "mtl.input_size": json.dumps(list(loaded.input_size)),
                "mtl.tasks": json.dumps(list(loaded.tasks)), "mtl.outputs": json.dumps(structure(reference)),
                "mtl.version": mtl_cli.__version__, "mtl.source": str(cfg.ckpt)}
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else run_dir / f"model{SUFFIX[form]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        dynamic = WRITERS[form](model, images[:EXAMPLE_BATCH], tmp, metadata)
        run = READERS[form](tmp)
        differences = verify(model, run, images, dynamic, form, cfg.get("tolerance"), source)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = "dynamic" if dynamic else "fixed at {}x{}".format(*loaded.input_size)
    log.info(f"wrote {out} ({form}; batch size dynamic, image size {size})")
    return {"format": form, "path": str(out), "outputs": list(differences), "dynamic_size": dynamic,
            "max_abs_diff": differences, "verified_on": source}


def require_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"format=onnx needs {module}, which is not installed: {EXTRA}") from None


def sample_images(loaded: Loaded) -> tuple[torch.Tensor, str]:
    """Up to 4 images of the checkpoint's data split (data.split), as its loader gives them to the model; random
    images of the trained size when that data cannot be read."""
    split = str(loaded.cfg.data.get("split", "val"))
    try:
        batch = next(iter(build_loader(loaded.cfg, build_dataset(loaded.cfg, split))))
        images = batch["image"][:4].float().cpu()
        source = f"{len(images)} images of the {split} split"
    except (UserError, OSError, StopIteration) as e:
        log.warning(f"export: the {split} split cannot be read ({e}); verifying on random images instead")
        images, source = torch.rand(4, 3, *loaded.input_size), "4 random images"
    if len(images) <= EXAMPLE_BATCH:  # the check needs a batch size other than the exported one
        images = images.repeat(EXAMPLE_BATCH + 1, 1, 1, 1)[:EXAMPLE_BATCH + 1]
    return images, source


def exported_program(model: nn.Module, example: torch.Tensor) -> tuple[torch.export.ExportedProgram, bool]:
    """torch.export with a dynamic batch and, where the model allows it, dynamic height and width; whether the
    image size stayed dynamic."""
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 2: torch.export.Dim.AUTO,
                                                                           3: torch.export.Dim.AUTO},), strict=False)
    except Exception as e:  # noqa: BLE001 -- torch.export's many failure types (unsupported op, data-dependent flow)
        raise UserError(f"torch.export cannot capture this model ({type(e).__name__}: {first_line(e)}); "
                        "format=torchscript may still work") from None
    shape = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image").meta["val"].shape
    if not all(isinstance(d, torch.SymInt) for d in shape[2:]):
        return program, False
    # A size the model records as numbers (detection's image_size) stays symbolic in the signature but is pinned
    # by a runtime guard: one image at twice the size tells.
    try:
        with torch.no_grad():
            program.module()(torch.nn.functional.interpolate(example[:1], scale_factor=2))
    except Exception:  # noqa: BLE001 -- the guard's AssertionError, or a shape error further in
        log.info("export: the model fixes its input size (a guard fails at another size); it is exported at "
                 "{}x{}".format(*example.shape[-2:]))
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        return program, False
    return program, True


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> bool:
    import onnx

    program, dynamic = exported_program(model, example)
    names = list(model(example))
    try:
        with quiet("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines narrate the graph passes
            onnx_program = torch.onnx.export(program, (example,), input_names=["image"], output_names=names,
                                             dynamo=True, verbose=False)
    except Exception as e:  # noqa: BLE001 -- an op without an ONNX translation, among others
        raise UserError(f"the ONNX exporter cannot translate this model ({type(e).__name__}: {first_line(e)}); "
                        "format=exported_program or torchscript may still work") from None
    proto = onnx_program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    return dynamic


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> bool:
    log.warning("torch deprecates TorchScript (torch.jit); format=exported_program is its successor")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # said once above
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the Python branches: why the size stays fixed
        traced = torch.jit.trace(model, example, strict=False, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files=metadata)
    return False  # a trace replays the Python branches taken at the traced size


def write_exported_program(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> bool:
    program, dynamic = exported_program(model, example)
    with open(path, "wb") as f:
        torch.export.save(program, f, extra_files=metadata)
    return dynamic


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript, "exported_program": write_exported_program}


def read_onnx(path: Path):
    from mtl_cli.inference.onnx_model import session

    runner = session(path)
    names = [output.name for output in runner.get_outputs()]
    return lambda image: dict(zip(names, (torch.from_numpy(a) for a in runner.run(names, {"image": image.numpy()}))))


def read_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def read_exported_program(path: Path):
    with open(path, "rb") as f:
        return torch.export.load(io.BytesIO(f.read())).module()


READERS = {"onnx": read_onnx, "torchscript": read_torchscript, "exported_program": read_exported_program}


def verify(model: nn.Module, run, images: torch.Tensor, dynamic: bool, form: str, tolerance: float | None,
           source: str) -> dict[str, float]:
    """The largest absolute difference of each output between `model` and the exported `run`, over the inputs
    described in the module docstring; UserError past the tolerance."""
    tolerance = TOLERANCE[form] if tolerance is None else float(tolerance)
    inputs = [images, images[:1]]
    if dynamic:
        inputs.append(torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear", antialias=True))
    largest: dict[str, float] = {}
    worst: dict[str, float] = {}
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
            try:
                got = run(x)
            except Exception as e:  # noqa: BLE001 -- each runtime has its own error types
                raise UserError(f"the exported {form} model fails on a batch of shape {list(x.shape)} "
                                f"({type(e).__name__}: {first_line(e)}); nothing was written") from None
        for name, value in expected.items():
            difference = float((got[name].float() - value.float()).abs().max()) if value.numel() else 0.0
            scale = max(1.0, float(value.float().abs().max())) if value.numel() else 1.0
            largest[name] = max(largest.get(name, 0.0), difference)
            worst[name] = max(worst.get(name, 0.0), difference / scale)
    sizes = ", ".join(f"{len(x)}x{x.shape[-2]}x{x.shape[-1]}" for x in inputs)
    log.info(f"verified against the PyTorch model on {source} (batches {sizes}); largest absolute difference "
             f"(tolerance {tolerance:g} of each output's scale, max(1, |output|)):")
    for task, names in by_task(largest).items():
        keys = [f"{name.split('.', 1)[1]} {largest[name]:.2e}" for name in names if "." in name]
        parts = f" ({', '.join(keys)})" if keys else ""
        log.info(f"  {task:<16} {max(largest[n] for n in names):.2e}{parts}")
    failed = [name for name in worst if worst[name] > tolerance]
    if failed:
        raise UserError(f"the exported {form} model differs from the PyTorch model beyond the tolerance {tolerance:g} "
                        f"in {', '.join(f'{n} ({largest[n]:.2e})' for n in failed)}; nothing was written. Give "
                        "tolerance=<larger> if the difference is acceptable")
    return largest


def by_task(differences: dict[str, float]) -> dict[str, list[str]]:
    tasks: dict[str, list[str]] = {}
    for name in differences:
        tasks.setdefault(name.split(".", 1)[0], []).append(name)
    return tasks


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
