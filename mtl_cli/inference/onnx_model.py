"""A model.onnx written by mtl export, run through onnxruntime on the CPU, as a Loaded (inference/loaded.py) whose
model returns what the PyTorch model returns: `mtl predict ckpt=model.onnx` then needs no PyTorch weights.

The file's metadata_props (see inference/export.py) give the checkpoint's config, to which this command line's
overrides apply as they do on a checkpoint (engine/state.py's config_from_checkpoint, with the same refusal of
classes this installation does not name), the input size, and how the flat outputs (`task`, `task.key`) fold
back into each task's tensor or dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from mtl_cli.build import build_tasks, instantiate, resolve_data
from mtl_cli.data.transforms import compose, split_transforms
from mtl_cli.engine.state import HydraValues
from mtl_cli.errors import UserError
from mtl_cli.inference.loaded import Loaded
from mtl_cli.runtime import config_from_checkpoint
from mtl_cli.schema import check_config

EXTRA = 'pip install "mtl-cli[export]"'
KEYS = ("mtl.config", "mtl.input_size", "mtl.tasks", "mtl.outputs")


def session(path: str | Path):
    """An onnxruntime session on the CPU, with as many threads as torch uses."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running an ONNX model needs onnxruntime, which is not installed: {EXTRA}") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types for a bad file
        raise UserError(f"{str(path)!r} is not a readable ONNX model ({str(e).strip().splitlines()[0][:200]}): "
                        "give a model.onnx written by mtl export") from None


class OnnxModel:
    """Callable on a float image batch [B, 3, H, W]: {task: tensor, or {key: tensor}}, CPU tensors."""

    def __init__(self, runner, outputs: dict[str, list[str] | None]):
        self.runner, self.outputs = runner, outputs
        self.names = [output.name for output in runner.get_outputs()]

    def __call__(self, image: torch.Tensor) -> dict:
        arrays = self.runner.run(self.names, {"image": image.detach().float().cpu().contiguous().numpy()})
        flat = {name: torch.from_numpy(array) for name, array in zip(self.names, arrays)}
        return {task: flat[task] if keys is None else {key: flat[f"{task}.{key}"] for key in keys}
                for task, keys in self.outputs.items()}

    def eval(self) -> OnnxModel:
        return self


def load_onnx(composed: DictConfig, hydra: HydraValues) -> Loaded:
    """The model.onnx at composed.ckpt with its config (this command line's overrides on top) and tasks."""
    path = Path(str(composed.ckpt)).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt={str(path)!r}: the file does not exist. Give a model.onnx written by mtl export")
    runner = session(path)
    metadata = runner.get_modelmeta().custom_metadata_map
    missing = [key for key in KEYS if key not in metadata]
    if missing:
        raise UserError(f"{str(path)!r} lacks the metadata mtl export writes ({', '.join(missing)}): export it "
                        "with mtl export ckpt=<best.pt> format=onnx")
    stored = {"config": metadata["mtl.config"]}
    cfg = config_from_checkpoint(stored, composed, typed=hydra.typed, groups=hydra.groups,
                                 config_sources=hydra.config_sources)
    check_config(cfg)
    cfg = resolve_data(cfg)
    tasks = build_tasks(cfg)
    declared = split_transforms(cfg.data.get("transforms"), "val")
    transforms = compose(instantiate(declared, "data.transforms.val")) if declared else None
    height, width = json.loads(metadata["mtl.input_size"])
    checkpoint = {"config": metadata["mtl.config"], "input_size": [height, width], "onnx": str(path),
                  "mtl_version": metadata.get("mtl.version")}
    model = OnnxModel(runner, json.loads(metadata["mtl.outputs"]))
    return Loaded(cfg, checkpoint, tasks, model, torch.device("cpu"), (int(height), int(width)), transforms)
