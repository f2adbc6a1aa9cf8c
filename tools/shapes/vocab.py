"""The words of the shapes world: shapes, named colours, directions, backgrounds, and prompts.

Colours are saturated and at least 45 CIELAB units apart from each other, backgrounds neutral, so
that every shape stands out from every background and a measured colour has one clear name.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (25, 105, 235),
    "purple": (160, 40, 185),
}

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")

# Unit motion per direction in image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}

# Background name -> base grey level; "noise" is a lightly textured mid grey (see render.background).
BACKGROUNDS: dict[str, int] = {"white": 255, "black": 0, "gray": 128, "noise": 128}

_BACKGROUND_WORDS = {"white": "a white", "black": "a black", "gray": "a gray", "noise": "a noisy"}


def prompt_for(shape: str, color: str, direction: str, background: str) -> str:
    """The caption of a clip, e.g. ``a red circle moving left on a white background``, ``an orange ...``."""
    for value, known in ((shape, SHAPES), (color, COLORS), (direction, DIRECTIONS), (background, BACKGROUNDS)):
        if value not in known:
            raise ValueError(f"unknown word {value!r}; expected one of {', '.join(known)}")
    motion = "standing still" if direction == "still" else f"moving {direction}"
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} {motion} on {_BACKGROUND_WORDS[background]} background"
