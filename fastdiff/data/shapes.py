"""Procedural images of coloured shapes with captions made from the same attributes."""
from __future__ import annotations

import torch

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.75),
}


def draw_shape(shape: str, color: str, size: int = 32, cx: float = 0.5, cy: float = 0.5,
               radius: float = 0.3, background: float = 0.95) -> torch.Tensor:
    """One [3, size, size] image in [-1, 1]: a filled shape on a light background."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; valid: {', '.join(COLORS)}")
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        mask = (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    else:  # upward triangle: below the two slanted edges, above the base
        mask = (dy <= radius * 0.8) & (dy >= -radius) & (dx.abs() <= (dy + radius) * 0.6)
    img = torch.full((3, size, size), background)
    rgb = torch.tensor(COLORS[color]).view(3, 1, 1)
    img = torch.where(mask, rgb.expand(3, size, size), img)
    return img * 2 - 1


def shapes_dataset(size: int = 32, jitter: int = 3, seed: int = 0):
    """(images [N, 3, size, size], captions) for every shape x colour, a few positions each."""
    gen = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for shape in SHAPES:
        for color in COLORS:
            for _ in range(jitter):
                cx, cy = (0.5 + 0.12 * (torch.rand(2, generator=gen) - 0.5)).tolist()
                r = 0.25 + 0.08 * torch.rand(1, generator=gen).item()
                images.append(draw_shape(shape, color, size, cx, cy, r))
                captions.append(f"a {color} {shape}")
    return torch.stack(images), captions
