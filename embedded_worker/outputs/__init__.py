"""Pixels out: the output store (numpy buffers), files, postprocessing."""
