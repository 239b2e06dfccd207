"""Datasets fastdiff generates itself (nothing is downloaded)."""
from .shapes import COLORS, SHAPES, draw_shape, shapes_dataset

__all__ = ["COLORS", "SHAPES", "draw_shape", "shapes_dataset"]
