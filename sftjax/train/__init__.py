"""Training: state, step, optimizer, loop, checkpoints and metrics."""
