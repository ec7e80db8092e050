"""Understanding a trained model or a run: robustness per task under attacks, saliency per task, task affinity."""
