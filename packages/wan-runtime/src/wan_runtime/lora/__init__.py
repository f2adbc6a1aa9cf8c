"""LoRA at inference: read a LoRA file in any common naming (:mod:`.parse`), merge it into a
network's weights and subtract it again (:mod:`.merge`)."""

from .merge import LoraMerge, LoraUpdate, merge_lora, unmerge_lora
from .names import PREFIXES
from .parse import LoraSource, LowRank, ParsedLora, parse_lora

__all__ = ["PREFIXES", "LoraMerge", "LoraSource", "LoraUpdate", "LowRank", "ParsedLora", "merge_lora",
           "parse_lora", "unmerge_lora"]
from .layouts import ARGS_KEY, BASE_KEY, LAYOUTS, export_lora, save_lora  # noqa: E402  (writing: helper X)
__all__ += ["ARGS_KEY", "BASE_KEY", "LAYOUTS", "export_lora", "save_lora"]
