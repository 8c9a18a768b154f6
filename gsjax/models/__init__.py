"""Model definitions (pure JAX/Flax) and checkpoint I/O."""
