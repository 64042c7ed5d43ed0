"""pr1_jax: pure-JAX Perception-R1 GRPO trainer for Qwen2-VL."""
