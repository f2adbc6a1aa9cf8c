"""Step-skipping caches for the denoising loop, built through one registry (see docs/step_caches.md).

TeaCache, MagCache and First Block Cache all reuse the blocks' residual from the last computed step;
they differ in how they decide. Importing a cache module registers it.
"""

from .registry import (
    REQUIRED,
    STEP_CACHES,
    StepCache,
    StepCacheEntry,
    make_step_caches,
    option_number,
    register_step_cache,
    requested_step_cache,
)
from .first_block import FirstBlockCache
from .magcache import MagCache, calibrate_magcache
from .teacache import TEACACHE_COEFFICIENTS, TeaCache

__all__ = ["REQUIRED", "STEP_CACHES", "TEACACHE_COEFFICIENTS", "FirstBlockCache", "MagCache", "StepCache",
           "StepCacheEntry", "TeaCache", "calibrate_magcache", "make_step_caches", "option_number",
           "register_step_cache", "requested_step_cache"]
