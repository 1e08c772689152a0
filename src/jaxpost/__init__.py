"""jaxpost: JAX-native RL post-training (GRPO) for language models that show their work."""

__version__ = "0.1.0"
