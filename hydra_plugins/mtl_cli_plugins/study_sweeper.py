"""hydra/sweeper=study (configs/hydra/sweeper/study.yaml): mtl_cli.sweeper.Study, under the name Hydra accepts."""

try:
    from mtl_cli.sweeper import Study
except ImportError:  # no hydra-optuna-sweeper: the preset says which extra brings it
    pass
else:
    class StudySweeper(Study):
        pass
