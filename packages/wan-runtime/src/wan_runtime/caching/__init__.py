"""Step-skipping caches for the denoising loop: TeaCache and MagCache.

Both reuse the blocks' residual from the last computed step; they differ in how they decide.
"""

from .magcache import MagCache, calibrate_magcache
from .teacache import TEACACHE_COEFFICIENTS, TeaCache

__all__ = ["TEACACHE_COEFFICIENTS", "MagCache", "TeaCache", "calibrate_magcache"]
