"""Builds the run's parts from the composed config with hydra.utils.instantiate: Hydra's `_target_` is the registry."""

from __future__ import annotations

from typing import Any

import hydra.utils
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from mtl_cli.data.checks import CheckedSamples, label_ranges
from mtl_cli.data.collate import collate
from mtl_cli.data.files import SkipBad
from mtl_cli.data.folds import Folds
from mtl_cli.data.held_out import HeldOut
from mtl_cli.data.seeding import SeededBatches, SeededSamples, ShardedBatches
from mtl_cli.engine.signals import ignore_stop_requests
from mtl_cli.data.transforms import compose, split_transforms
from mtl_cli.errors import UserError
from mtl_cli.metrics.delta_m import DeltaM, build_delta_m
from mtl_cli.models.base import MultiTaskModel
from mtl_cli.tasks import Task
from mtl_cli.weighting.base import Weighting


def instantiate(cfg: Any, where: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with the user's mistakes turned into one clear UserError naming `where`. Every
    component is a mapping that names its class; only a list of transforms is a list (of such mappings)."""
    if ".transforms." not in where and not (isinstance(cfg, DictConfig) and "_target_" in cfg):
        kind = "a list" if OmegaConf.is_list(cfg) else "a mapping without _target_" if OmegaConf.is_dict(cfg) else (
            repr(cfg))
        raise UserError(f"the config of {where} is {kind}: a component's config names the class to build, e.g. "
                        f"`_target_: torch.optim.AdamW` with its arguments (see configs/ for examples)")
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError) or "Error locating target" in str(e):
            lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("full_key")]
            raise UserError(f"the config of {where} cannot be built: {' '.join(lines)}") from None
        raise


def call(build: Any, where: str, *args: Any, **kwargs: Any) -> Any:
    """Calls a `_partial_` built from the config; a keyword the target does not take is the user's to fix."""
    try:
        return build(*args, **kwargs)
    except (TypeError, ValueError) as e:  # an unknown keyword, or a value the constructor refuses (lr=-1)
        if isinstance(e, TypeError) and "argument" not in str(e):
            raise
        raise UserError(f"the config of {where} does not fit {getattr(build, 'func', build).__name__}: {e}") from None


def build_tasks(cfg: DictConfig) -> dict[str, Task]:
    """One Task per entry of cfg.tasks, checked against the targets that cfg.data provides."""
    if not cfg.get("tasks"):
        raise UserError("no task selected: choose some, e.g. tasks=[segmentation,depth]")
    tasks = {}
    for name in cfg.tasks:
        if "_target_" not in cfg.tasks[name]:
            raise UserError(f"tasks.{name} has settings but no task config (a preset sets it, and tasks=[...] left the "
                            f"task out): drop them too with ~tasks.{name}, or select the task")
        try:
            OmegaConf.to_container(cfg.tasks[name], resolve=True)
        except (InterpolationKeyError, InterpolationResolutionError) as e:
            provided = ", ".join(cfg.data.get("targets", {})) or "none"
            raise UserError(f"task {name!r} needs a target that data {cfg.data.get('name', '?')!r} does not "
                            f"provide ({str(e).splitlines()[0]}). The data provides: {provided}") from None
        tasks[name] = instantiate(cfg.tasks[name], f"tasks.{name}", name=name)
    return tasks


def build_model(cfg: DictConfig, tasks: dict[str, Task]) -> MultiTaskModel:
    """architecture(backbone builder, head builders) -> the multi-task model, its contract checked (models/base.py)."""
    backbone = instantiate(cfg.backbone, "backbone")
    architecture = instantiate(cfg.architecture, "architecture")
    model = call(architecture, "architecture/backbone/heads", backbone=backbone,
                 heads={name: task.head for name, task in tasks.items()})
    if not isinstance(model, MultiTaskModel):
        raise UserError(f"architecture {cfg.architecture.get('_target_')} builds {type(model).__name__}, not a "
                        "mtl_cli.models.base.MultiTaskModel: subclass it (README, Extending)")
    model.check_contract()
    return model


def build_weighting(cfg: DictConfig, tasks: dict[str, Task], model: nn.Module | None = None) -> Weighting:
    """The weighting of `cfg`; `weighting.groups` (gradient methods) splits `model`'s shared parameters into the
    groups it aggregates separately."""
    options, groups = cfg.weighting, "whole"
    if isinstance(options, DictConfig) and "groups" in options:
        groups = str(options.groups)
        options = OmegaConf.masked_copy(options, [key for key in options if key != "groups"])
    weighting = instantiate(options, "weighting", tasks=list(tasks))
    if groups != "whole" or model is not None:
        weighting.group_by(groups, model)
    return weighting


def build_optimizer(cfg: DictConfig, model: nn.Module, weighting: Weighting) -> torch.optim.Optimizer:
    """One optimizer over the model and the weighting's own learnable parameters (if any)."""
    params = [p for p in list(model.parameters()) + list(weighting.parameters()) if p.requires_grad]
    return call(instantiate(cfg.optimizer, "optimizer"), "optimizer", params)


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    return call(instantiate(cfg.scheduler, "scheduler"), "scheduler", optimizer)


def build_delta(cfg: DictConfig, tasks: dict[str, Task]) -> DeltaM | None:
    """val/delta_m against the single-task baselines of the config, if any are given."""
    baselines = cfg.get("baselines")
    baselines = OmegaConf.to_container(baselines, resolve=True) if OmegaConf.is_config(baselines) else baselines
    runs = list(cfg.get("baselines_from") or [])
    directions = {name: task.directions() for name, task in tasks.items()}
    return build_delta_m(baselines, runs, directions, str(cfg.get("delta_m_average", "metrics")))


def build_dataset(cfg: DictConfig, split: str) -> Dataset:
    """The dataset of `split`, with the joint transforms declared for that split (`data.transforms.<split>`); each
    sample is checked as it is read against the tasks' class counts (data/checks.py). With `data.folds`, train and
    val are parts of the train split (data/folds.py); with data=multi each member's train split is folded. A
    weighting that learns on held-out data gets the `held_out` split, which train then lacks (data/held_out.py)."""
    folds, held_out = Folds.of(cfg.data), HeldOut.of(cfg)
    source = held_out.source(split) if held_out else split
    if cfg.data.get("members") is not None:
        dataset = build_multi(cfg, source, folds)
    else:
        dataset = build_one(cfg.data, source, folds=folds)
    if held_out:
        dataset = held_out.select(dataset, split)
    return CheckedSamples(dataset, split, label_ranges(cfg))


def build_one(data: DictConfig, split: str, where: str = "data", folds: Folds | None = None) -> Dataset:
    if OmegaConf.is_missing(data, "root"):
        raise UserError(f"{where}.root is not set: give the folder that holds the {data.get('name', '?')} data, e.g. "
                        f"{where}.root=/data/{data.get('name', 'dataset')} (the README's Datasets section shows "
                        "each layout)")
    kwargs = {"split": folds.source(split) if folds else split}
    if data.get("transforms"):  # those of `split`: the held-out fold takes val's
        declared = split_transforms(data.transforms, split)
        kwargs["transforms"] = compose(instantiate(declared, f"{where}.transforms.{split}"))
    dataset = call(instantiate(data.dataset, f"{where}.dataset"), f"{where}.dataset", **kwargs)
    dataset = SkipBad(dataset) if data.get("skip_bad") else dataset
    if folds is None:
        return dataset
    return folds.select(dataset, split, "the train split" + ("" if where == "data" else f" of {where}"))


def build_multi(cfg: DictConfig, split: str, folds: Folds | None = None) -> Dataset:
    """`data: multi`: one dataset per member, each giving the targets of the tasks assigned to it. `folds` (the
    top-level data.folds) folds each member's train split on its own."""
    views = {name: member_view(cfg, name).data for name in cfg.data.members}
    for name, view in views.items():
        if view.get("folds") is not None:
            raise UserError(f"data.members.{name}.folds={view.folds}: with data=multi, data.folds folds every member "
                            f"(each on its own); set data.folds={view.folds} data.fold=... instead")
    members = {name: build_one(view, split, f"data.members.{name}", folds) for name, view in views.items()}
    keys = {name: target_keys(views[name].targets, tasks) for name, tasks in cfg.data.tasks.items()}
    return call(instantiate(cfg.data.dataset, "data.dataset"), "data.dataset", members=members, keys=keys)


def member_view(cfg: DictConfig, member: str, tasks=None) -> DictConfig:
    """The config as member `member` of data=multi sees it: its data config in the place of `data` (so that its
    own interpolations, `${data.root}`, `${data.image_size}`, read the member's values) and, given `tasks`, only
    those tasks in `tasks`."""
    view = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    view.data = OmegaConf.to_container(cfg.data.members[member], resolve=False)
    if tasks is not None:
        view.tasks = {task: OmegaConf.to_container(cfg.tasks[task], resolve=False) for task in tasks
                      if task in cfg.get("tasks", {})}
    return view


def target_keys(targets: DictConfig, tasks) -> list[str]:
    """The batch keys the targets of `tasks` are read from (`key`, and `labels_key` and the like)."""
    return sorted({str(value) for task in tasks for field, value in targets[task].items()
                   if field == "key" or field.endswith("_key")})


def resolve_data(cfg: DictConfig) -> DictConfig:
    """`data: multi`: each member's config is resolved in its own place (see member_view), and data.targets
    becomes the targets each task's member provides (data.tasks says which member serves which task), so that
    the task configs read them as they read any dataset's."""
    data = cfg.data
    if data.get("members") is None:
        return cfg
    if not data.get("members") or not data.get("tasks"):
        raise UserError("data=multi needs members and the tasks each serves, e.g. +data@data.members.faces=celeba "
                        "data.members.faces.root=/data/celeba +data.tasks.faces=[attributes]")
    idle = [member for member in data.members if member not in data.tasks]
    if idle:
        raise UserError(f"data member {idle[0]!r} serves no task: give it some (+data.tasks.{idle[0]}=[...]) or "
                        f"remove it (~data.members.{idle[0]})")
    targets, owners = {}, {}
    for member, tasks in data.tasks.items():
        if member not in data.members:
            raise UserError(f"data.tasks names the member {member!r}, which data.members lacks (it has: "
                            f"{', '.join(data.members)})")
        try:
            resolved = OmegaConf.to_container(member_view(cfg, member, tasks).data, resolve=True)
        except (InterpolationKeyError, InterpolationResolutionError) as e:
            raise UserError(f"data member {member!r}: {str(e).splitlines()[0]}") from None
        provided = resolved.get("targets") or {}
        for task in tasks:
            if task not in provided:
                raise UserError(f"data.tasks assigns task {task!r} to member {member!r}, whose data "
                                f"{resolved.get('name', '?')!r} does not provide it (it provides: "
                                f"{', '.join(provided)})")
            if task in targets:
                raise UserError(f"data.tasks assigns task {task!r} to two members; give each task one member")
            targets[task] = provided[task]
        for key in target_keys(provided, tasks):
            if owners.setdefault(key, member) != member:
                raise UserError(f"members {owners[key]!r} and {member!r} both give their tasks the batch entry "
                                f"{key!r}, so each would train the other's task: give each task one member")
        with open_dict(cfg):
            cfg.data.members[member] = resolved
    if sorted(cfg.get("tasks") or {}) != sorted(targets):  # Hydra cannot default the task list to the members'
        raise UserError(f"data=multi: the tasks selected ({', '.join(cfg.get('tasks') or {}) or 'none'}) are not the "
                        f"tasks the members serve (data.tasks): add tasks=[{','.join(targets)}]")
    with open_dict(cfg):
        cfg.data.targets = targets
    return cfg


def build_loader(cfg: DictConfig, dataset: Dataset, train: bool = False, pin: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> DataLoader:
    """Batches of `dataset`: in order, or for training shuffled, full batches only.

    A training loader's batch sampler is a SeededBatches: `loader.batch_sampler.set_epoch(e)` makes the order of
    epoch e and the random augmentation of each of its samples depend on (cfg.seed, e) alone, not on which worker
    loads a sample or what it loaded before, and `skip(k)` starts the next pass after k batches: a resume is exact,
    also in the middle of an epoch, with workers and random transforms. `shard=(rank, world)`: this process's
    part of every batch (data.batch_size is the global batch of all processes)."""
    workers, batch_size = int(cfg.data.num_workers), int(cfg.data.batch_size)
    loader = {"num_workers": workers, "collate_fn": collate, "persistent_workers": workers > 0, "pin_memory": pin,
              "generator": torch.Generator().manual_seed(int(cfg.seed)), "worker_init_fn": ignore_stop_requests}
    several = hasattr(dataset, "batch_sampler")  # several datasets: each batch from one of them
    if not train:
        batches = dataset.batch_sampler(batch_size, None) if several else BatchSampler(
            SequentialSampler(dataset), batch_size, drop_last=False)
        return DataLoader(dataset, batch_sampler=ShardedBatches(batches, *shard) if shard[1] > 1 else batches,
                          **loader)
    shuffle = torch.Generator()
    if several:
        batches = dataset.batch_sampler(batch_size, shuffle)
    else:
        batches = BatchSampler(RandomSampler(dataset, generator=shuffle), batch_size, drop_last=True)
    return DataLoader(SeededSamples(dataset), batch_sampler=SeededBatches(batches, shuffle, int(cfg.seed), shard),
                      **loader)


def adopt_facts(cfg: DictConfig, dataset: Dataset) -> DictConfig:
    """Facts the train split decides (the class maps of a folder dataset) join cfg.data, so that the tasks are
    built with them and the checkpoint's config carries them to mtl eval and to a resume."""
    facts = getattr(dataset, "facts", None)
    if facts:
        with open_dict(cfg):
            cfg.data = OmegaConf.merge(cfg.data, facts)
    return resolve_data(cfg)
