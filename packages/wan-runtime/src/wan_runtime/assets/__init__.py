"""Models shipped inside the package: the embedded tiny-shapes text-to-video model.

``tiny-shapes/`` is a complete Wan 2.1 T2V release (DiT safetensors + ``config.json``, umT5 encoder,
VAE, ``google/umt5-xxl`` tokenizer) at a few MB, trained on procedural videos of one coloured
shape moving over a plain background (see ``docs/tiny_model.md``). It is what ``wan generate``
and ``make demo`` use when no model is named, so that a fresh checkout makes a real video on a CPU.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_SETTINGS", "default_model_dir"]

DEFAULT_MODEL_NAME = "tiny-shapes"

# Generation settings the tiny-shapes model was trained and checked at (docs/tiny_model.md).
DEFAULT_MODEL_SETTINGS = {"height": 64, "width": 64, "frames": 17, "steps": 20, "cfg_scale": 3.0}


def default_model_dir() -> Path:
    """The embedded tiny-shapes model folder (load it like any released model folder)."""
    folder = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"the embedded model is missing from {folder} (an incomplete install?)")
    return folder
