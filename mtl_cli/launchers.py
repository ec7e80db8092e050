"""`hydra/launcher=slurm`: Hydra's submitit launcher (pip install "mtl-cli[sweep]") with each job told to continue
its own run directory. submitit requeues a job that Slurm preempts or times out, with the same overrides; with
`resume=auto` the requeued job continues from the last.pt the stopped one saved (engine/signals.py) instead of
starting over in the same directory."""

from __future__ import annotations

from collections.abc import Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurm


class Requeued(SubmititSlurm):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        return super().launch([continuing(overrides) for overrides in job_overrides], initial_job_idx)


def continuing(overrides: Sequence[str]) -> list[str]:
    """The job's overrides plus resume=auto, unless they say how to resume already."""
    named = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    return list(overrides) if "resume" in named else [*overrides, "resume=auto"]
