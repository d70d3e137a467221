"""`meteora-jax compile`: programs compiled ahead of time for TPU slices this host does not have."""
