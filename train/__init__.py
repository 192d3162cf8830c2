"""Fine-tuning with optax and orbax (installed as `ettin_jax.train`); see the fine-tuning issue."""
