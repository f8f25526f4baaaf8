"""Training: the loop, optimizers, noise/targets, state."""
