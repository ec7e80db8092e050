"""The training scalars between two log steps: summed on the device (no synchronisation), averaged and written
every logger.log_every steps."""

from __future__ import annotations

import time

import torch


class StepMeter:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.samples, self.started = 0, time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], losses: dict[str, torch.Tensor], samples: int) -> None:
        logs = {**logs, **{f"train/loss/{name}": loss.detach().float() for name, loss in losses.items()}}
        logs["train/loss/total"] = sum(logs[f"train/loss/{name}"] for name in losses)
        for tag, value in logs.items():
            self.sums[tag] = self.sums.get(tag, 0) + value
            self.counts[tag] = self.counts.get(tag, 0) + 1
        self.samples += samples

    def take(self) -> dict[str, float]:
        """The averages since the last take (one synchronisation), with the throughput; then starts afresh."""
        scalars = {tag: float(value) / self.counts[tag] for tag, value in self.sums.items()}
        scalars["perf/samples_per_s"] = self.samples / max(time.perf_counter() - self.started, 1e-9)
        self.__init__()
        return scalars
