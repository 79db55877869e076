"""Studies built on the training, sampling and evaluation code (see tools/ for their commands)."""
