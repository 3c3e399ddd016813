"""Turning text into batches: tokenizers, the built-in world, packing."""
