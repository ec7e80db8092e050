"""hydra/launcher=slurm (configs/hydra/launcher/slurm.yaml): mtl_cli.launchers.Requeued, under the name Hydra
accepts."""

try:
    from mtl_cli.launchers import Requeued
except ImportError:  # no hydra-submitit-launcher: the preset says which extra brings it
    pass
else:
    class SlurmLauncher(Requeued):
        pass
