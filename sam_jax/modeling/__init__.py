"""Flax modules mirroring segment_anything/modeling."""
