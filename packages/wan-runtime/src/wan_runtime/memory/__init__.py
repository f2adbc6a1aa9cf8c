"""VRAM management: networks stored off the GPU (or in float8) and streamed layer by layer.

``pipe.enable_vram_management(...)`` is the entry point; :class:`VramManager` works on any network
(see :mod:`wan_runtime.memory.offload` and ``docs/vram_management.md``).
"""

from wan_runtime.memory.offload import (
    GIB,
    Accountant,
    NetworkOffloader,
    Transfer,
    Unit,
    VramManager,
    format_bytes,
    manage_pipeline,
)

__all__ = ["GIB", "Accountant", "NetworkOffloader", "Transfer", "Unit", "VramManager", "format_bytes",
           "manage_pipeline"]
