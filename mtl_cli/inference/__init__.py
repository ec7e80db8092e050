"""Using a trained model on images without labels: the model of a checkpoint with its own preprocessing
(loaded.py), the images a command line names (inputs.py), and the commands built on them (predict, export)."""
