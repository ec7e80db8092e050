"""mtl eval: score a checkpoint on a split, with the batch loop that validates during training (so both agree)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtl_cli import launch
from mtl_cli.analysis.robustness import Attack, robustness_table, under_attack
from mtl_cli.build import build_dataset, build_delta, build_loader, resolve_data
from mtl_cli.engine import distributed
from mtl_cli.engine.batches import evaluate, limited
from mtl_cli.engine.records import eval_record, write_record
from mtl_cli.engine.report import metrics_table
from mtl_cli.engine.state import HydraValues, load_run, trained_model
from mtl_cli.runtime import pick_device

log = logging.getLogger("mtl")


def evaluate_checkpoint(composed: DictConfig, run_dir: Path, hydra: HydraValues) -> dict:
    """`mtl eval`: scores composed.ckpt (its config + this command line's overrides) on data.split and writes
    <run_dir>/eval.json."""
    cfg, checkpoint = load_run(composed.ckpt, composed, "eval", hydra)
    attack_of(cfg)  # a bad robustness setting is said before any process starts
    processes = launch.processes(cfg)
    if processes:
        return launch.distributed(launch.Job("eval", OmegaConf.to_yaml(cfg), str(run_dir), str(cfg.ckpt)), processes)
    return evaluate_config(cfg, run_dir, checkpoint)


def evaluate_config(cfg: DictConfig, run_dir: Path, checkpoint: dict) -> dict:
    """Scores the model of `checkpoint` as `cfg` says; on several processes each scores its shard of every batch
    and rank 0 writes eval.json. With a `robustness` node (+robustness=pgd), every task is then also scored
    under attacks on each task's loss and on the joint loss (analysis/robustness.py), into eval.json's
    "robustness"."""
    ranks = distributed.ranks()
    attack = attack_of(cfg)
    cfg = resolve_data(cfg)
    device = pick_device(cfg.trainer.device)
    tasks, model = trained_model(cfg, checkpoint, device)
    split = cfg.data.split
    loader = build_loader(cfg, build_dataset(cfg, split), pin=device.type == "cuda", shard=(ranks.rank, ranks.world))
    log.info(f"evaluating {cfg.ckpt} (epoch {checkpoint['epoch']}, step {checkpoint['step']}) on split {split!r}")
    results = evaluate(model, tasks, limited(loader, cfg.trainer.limit_val_batches), device, cfg.trainer.precision,
                       delta_m=build_delta(cfg, tasks), ranks=ranks)
    directions = {name: task.directions() for name, task in tasks.items()}
    log.info(metrics_table({"value": results}, directions, title=f"{split} metrics"))
    record = eval_record(Path(cfg.ckpt), split, checkpoint, results, tasks)
    if attack is not None:
        log.info(f"attacking every task's loss and their sum: {attack.describe()}")
        attacked = under_attack(model, tasks, limited(loader, cfg.trainer.limit_val_batches), device, attack,
                                cfg.trainer.precision, seed=int(cfg.get("seed") or 0), ranks=ranks)
        log.info(robustness_table(results["metrics"], attacked, directions,
                                  title=f"{split} metrics under attack ({attack.describe()})"))
        record["robustness"] = {"attack": attack.settings(), "eps": attacked}
    if not ranks.main:
        return record
    write_record(run_dir / "eval.json", record)
    log.info(f"wrote {run_dir / 'eval.json'}")
    return record


def attack_of(cfg: DictConfig) -> Attack | None:
    """The attack of cfg.robustness (+robustness=fgsm | pgd), or None without one."""
    node = cfg.get("robustness")
    return None if node is None else Attack.of(node)
