"""MagCache: calibration, skip rule, and generation close to the uncached result."""

from __future__ import annotations

import pytest
import torch

from factories import random_dit
from wan_models import DiTConfig
from wan_runtime import WanVideoPipeline
from wan_runtime.caching import MagCache, calibrate_magcache
from wan_runtime.caching.magcache import resample_ratios

CONFIG = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=24, freq_dim=16)
CALL = dict(height=32, width=48, num_frames=5, num_inference_steps=12, seed=3, cfg_scale=4.0)


def pipeline() -> tuple[WanVideoPipeline, dict]:
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.add_model(random_dit(CONFIG, seed=5))
    gen = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 24, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 8, 24, generator=gen))
    return pipe, embeds


def test_skip_rule_follows_accumulated_ratio_error() -> None:
    # Ratios drifting 1% per step: error after k skipped steps = sum |1 - 0.99^i|.
    cache = MagCache(10, [0.99] * 10, threshold=0.04, max_skip_steps=3, retention_ratio=0.2)
    cache.residual = torch.zeros(1)
    decisions = [cache.should_skip() for _ in range(10)]
    # steps 0-1 retained, then runs of skips: 0.01 ok, 0.0299 ok, 0.0596 > 0.04 -> compute, ...
    assert decisions == [False, False, True, True, False, True, True, False, True, False]


def test_resample_ratios() -> None:
    assert resample_ratios([1.0, 0.5, 0.25], 5) == [1.0, 0.5, 0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="calibrate_magcache"):
        resample_ratios([], 4)


def test_calibrated_generation_skips_and_stays_close() -> None:
    pipe, embeds = pipeline()
    ratios = calibrate_magcache(pipe, **CALL, **embeds)
    assert len(ratios) == 2 and len(ratios[0]) == CALL["num_inference_steps"] and ratios[0][0] == 1.0
    plain = pipe(**CALL, **embeds, output_type="latent", progress_bar_cmd=lambda x: x)
    cached = pipe(**CALL, **embeds, output_type="latent", progress_bar_cmd=lambda x: x,
                  mag_cache_thresh=0.3, mag_cache_ratios=ratios, mag_cache_max_skip_steps=3)
    skipped = [sum(s) for s in pipe.step_cache_skips]
    assert all(n > 0 for n in skipped), skipped
    assert not torch.equal(cached, plain)
    # Reusing residuals on a few steps moves the result a little, not a lot (random tiny DiT).
    assert (cached - plain).norm() / plain.norm() < 0.25


def test_magcache_needs_ratios_and_excludes_teacache() -> None:
    pipe, embeds = pipeline()
    with pytest.raises(ValueError, match="calibrate_magcache"):
        pipe(**CALL, **embeds, output_type="latent", mag_cache_thresh=0.1)
    with pytest.raises(ValueError, match="not both"):
        pipe(**CALL, **embeds, output_type="latent", mag_cache_thresh=0.1, mag_cache_ratios=[1.0],
             tea_cache_l1_thresh=0.1, tea_cache_model_id="Wan2.1-T2V-1.3B")
