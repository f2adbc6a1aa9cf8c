"""torch ``scaled_dot_product_attention``: runs everywhere, the last resort of every chain."""

from __future__ import annotations

from wan_models.attention import sdpa_attention

from .checks import layout_check
from .registry import Backend

SDPA = Backend(
    name="sdpa",
    fn=sdpa_attention,
    priority=100,
    check=layout_check,
    description="torch scaled_dot_product_attention (the wan_models default); any device and dtype",
)
