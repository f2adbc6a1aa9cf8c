"""Procedural videos of one moving shape, and measurement of what a video shows.

The embedded tiny model is trained on these clips (:mod:`.dataset`, :mod:`.render`) and judged by
measuring its outputs (:mod:`.measure`) against the words of the prompt (:mod:`.vocab`).
"""

from .dataset import sample_spec, sample_specs, write_dataset
from .measure import Measurement, measure_clip, nearest_color
from .render import ClipSpec, render_clip
from .vocab import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, prompt_for

__all__ = ["BACKGROUNDS", "COLORS", "DIRECTIONS", "SHAPES", "ClipSpec", "Measurement", "measure_clip",
           "nearest_color", "prompt_for", "render_clip", "sample_spec", "sample_specs", "write_dataset"]
