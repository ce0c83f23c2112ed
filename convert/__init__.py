"""Checkpoint conversion between the official PyTorch SAM, Hugging Face SAM and sam-jax."""
