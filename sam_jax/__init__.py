"""Segment Anything in JAX/Flax."""
