"""Experiments on the built-in tasks: the paper's experiment (`reproduce.py`, `s4bt reproduce`),
the no-retraining comparison of reduction methods (`compare_reductions.py`), and their figures
(`plots.py`). Not part of the remote code of checkpoints."""
