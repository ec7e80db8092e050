"""Where the run's scalars, text and images go: one class per tool (TensorBoard, MLflow, W&B, a CSV file), each an
option of the `logger` config group. engine/logger.py hands every call to each selected sink; a tracker's package is
imported only when its sink is chosen."""
