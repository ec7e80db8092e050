"""Task weighting: how the task losses (and, for gradient methods, the task gradients) become one update."""
