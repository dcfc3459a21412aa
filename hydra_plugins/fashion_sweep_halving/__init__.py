"""fashion-sweep's Hydra plugins: `hydra/sweeper=halving` (successive halving)."""
