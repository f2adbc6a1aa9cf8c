"""Step-skipping caches for the denoising loop (TeaCache)."""

from .teacache import TEACACHE_COEFFICIENTS, TeaCache

__all__ = ["TEACACHE_COEFFICIENTS", "TeaCache"]
