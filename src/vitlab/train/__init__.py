"""Training: the loop (engine.py), optimiser and schedule (optim.py), losses,
checkpoints and multi-process helpers."""
