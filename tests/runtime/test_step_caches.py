"""Step caches through the registry: First Block Cache, request fields and errors, an outside cache, USP.

A tiny random DiT (4 blocks) in float32 on the CPU, with random text embeddings. Its first block's
residual changes by a relative L1 of 0.2-0.5 from step to step (random weights), so the skipping
threshold here is 0.3, far above diffusers' default of 0.05 for real models.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from factories import random_dit
from wan_models import DiTConfig
from wan_runtime import GenerationRequest, WanVideoPipeline
from wan_runtime.caching import (
    STEP_CACHES,
    FirstBlockCache,
    TeaCache,
    register_step_cache,
    requested_step_cache,
)

CONFIG = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=4, text_dim=24, freq_dim=16)
# 48x48 pixels, 9 frames: 3 latent frames of 3x3 patches = 27 tokens (odd: padded on 2 ranks)
CALL = dict(height=48, width=48, num_frames=9, num_inference_steps=12, seed=3, cfg_scale=4.0)
SKIPPING = 0.3  # skips a few of 12 steps on this random DiT (changes measured 0.22-0.49)
CLOSE = 0.25  # relative L2 distance to the uncached latents allowed when skipping (measured 0.17)
TEACACHE = dict(tea_cache_l1_thresh=10.0, tea_cache_model_id="Wan2.1-T2V-1.3B")


def pipeline() -> tuple[WanVideoPipeline, dict[str, torch.Tensor]]:
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.add_model(random_dit(CONFIG, seed=5))
    gen = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 24, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 8, 24, generator=gen))
    return pipe, embeds


def generate(pipe: WanVideoPipeline, embeds: dict, **kwargs: Any) -> torch.Tensor:
    return pipe(**{**CALL, **kwargs}, **embeds, output_type="latent", progress_bar_cmd=lambda x: x)


@pytest.fixture(scope="module")
def tiny() -> tuple[WanVideoPipeline, dict, torch.Tensor]:
    pipe, embeds = pipeline()
    return pipe, embeds, generate(pipe, embeds)


# -- First Block Cache ---------------------------------------------------------------------------

def test_first_block_cache_skips_and_stays_close(tiny) -> None:
    pipe, embeds, plain = tiny
    cached = generate(pipe, embeds, step_cache="first_block", step_cache_options={"threshold": SKIPPING})
    skipped = [sum(s) for s in pipe.step_cache_skips]
    assert all(n > 0 for n in skipped) and all(not s[0] for s in pipe.step_cache_skips), pipe.step_cache_skips
    assert not torch.equal(cached, plain)
    assert (cached - plain).norm() / plain.norm() < CLOSE


def test_first_block_cache_threshold_zero_is_the_plain_path_exactly(tiny) -> None:
    pipe, embeds, plain = tiny
    cached = generate(pipe, embeds, step_cache="first_block", step_cache_options={"threshold": 0.0})
    assert pipe.step_cache_skips == [[False] * CALL["num_inference_steps"]] * 2
    assert torch.equal(cached, plain)


def test_first_block_cache_default_threshold_and_merged_branches(tiny) -> None:
    pipe, embeds, plain = tiny
    generate(pipe, embeds, step_cache="first_block")
    assert not any(map(any, pipe.step_cache_skips))  # 0.05 is far below this random DiT's changes
    merged = generate(pipe, embeds, cfg_merge=True, step_cache="first_block", step_cache_options={"threshold": SKIPPING})
    first, second = pipe.step_cache_skips
    assert first is second and any(first)  # one cache decides for the batch of both branches
    assert (merged - plain).norm() / plain.norm() < CLOSE


def test_run_blocks_range_composes_to_all_blocks() -> None:
    dit = random_dit(CONFIG, seed=5)
    gen = torch.Generator().manual_seed(2)
    prepared = dit.prepare(torch.randn(1, 16, 2, 4, 4, generator=gen), torch.tensor([700.0]),
                           torch.randn(1, 8, 24, generator=gen))
    whole = dit.run_blocks(prepared)
    assert torch.equal(dit.run_blocks(prepared, dit.run_blocks(prepared, end=1), start=1), whole)
    assert torch.equal(dit.run_blocks(prepared, start=2, end=2), prepared.tokens)
    with pytest.raises(ValueError, match="start=3, end=1 must satisfy 0 <= start <= end <= 4"):
        dit.run_blocks(prepared, start=3, end=1)


# -- the request fields and the registry ---------------------------------------------------------

def test_old_fields_map_onto_the_registry(tiny) -> None:
    entry, options, source = requested_step_cache(GenerationRequest(**TEACACHE))
    assert (entry.name, options, source) == ("teacache", {"threshold": 10.0, "model_id": "Wan2.1-T2V-1.3B"},
                                             "tea_cache_l1_thresh")
    entry, options, _ = requested_step_cache(GenerationRequest(mag_cache_thresh=0.1, mag_cache_ratios=[1.0, 0.9]))
    assert entry.name == "magcache" and options == {"threshold": 0.1, "ratios": [1.0, 0.9], "max_skip_steps": 2,
                                                    "retention_ratio": 0.2}
    pipe, embeds, _ = tiny
    old = generate(pipe, embeds, num_inference_steps=5, **TEACACHE)
    old_skips = pipe.step_cache_skips
    new = generate(pipe, embeds, num_inference_steps=5, step_cache="teacache",
                   step_cache_options={"threshold": 10.0, "model_id": "Wan2.1-T2V-1.3B"})
    assert torch.equal(old, new) and pipe.step_cache_skips == old_skips and any(old_skips[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(step_cache="fastcache"), r"step_cache='fastcache' is not a registered step cache; choose one of "
                                   r"first_block, magcache, teacache"),
    (dict(step_cache_options={"threshold": 0.1}), "step_cache_options .* given without step_cache"),
    (dict(step_cache="first_block", step_cache_options={"thresh": 0.1}),
     r"step_cache_options \['thresh'\] are not options of step cache 'first_block'; it takes \['threshold'\]"),
    (dict(step_cache="first_block", step_cache_options={"threshold": float("nan")}),
     r"step_cache_options\['threshold'\] must be a finite number, got nan"),
    (dict(step_cache="first_block", step_cache_options={"threshold": "high"}),
     r"step_cache_options\['threshold'\] of 'first_block' must be a finite number, got 'high'"),
    (dict(step_cache="teacache"), r"step cache 'teacache' needs step_cache_options \['threshold'\]"),
    (dict(step_cache="first_block", **TEACACHE),
     "choose one step cache: step_cache='first_block' or tea_cache_l1_thresh, not both"),
    (dict(step_cache=3), "step_cache must be a str .* got int 3"),
    (dict(step_cache="first_block", num_frames=9, sliding_window_size=2, sliding_window_stride=1),
     r"step caches \(step_cache='first_block'\) and sliding windows cannot be combined"),
])
def test_bad_cache_requests_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**kwargs)


def test_bad_option_values_fail_when_the_cache_is_built(tiny) -> None:
    pipe, embeds, _ = tiny
    with pytest.raises(ValueError, match=r"step_cache_options\['threshold'\] of 'first_block' must be in \[0, inf\]"):
        generate(pipe, embeds, step_cache="first_block", step_cache_options={"threshold": -1.0})
    with pytest.raises(ValueError, match="no TeaCache coefficients for model id 'nope'"):
        generate(pipe, embeds, step_cache="teacache", step_cache_options={"threshold": 0.1, "model_id": "nope"})


def test_registering_twice_or_options_missing_is_an_error() -> None:
    with pytest.raises(ValueError, match="'first_block' is already registered"):
        register_step_cache("first_block", lambda options, steps, branch: FirstBlockCache())
    with pytest.raises(ValueError, match=r"fields map onto options \['speed'\] that are not in options \[\]"):
        register_step_cache("broken", lambda options, steps, branch: FirstBlockCache(), fields={"seed": "speed"})
    assert "broken" not in STEP_CACHES


def test_cfg_merge_with_separate_caches_is_a_clear_error(tiny) -> None:
    pipe, embeds, _ = tiny
    request = GenerationRequest(**CALL, cfg_merge=True, extra=embeds)
    with torch.no_grad(), pytest.raises(ValueError, match="cfg_merge=True runs both CFG branches as one batch"):
        pipe.denoise(request, pipe.prepare(request), progress_bar_cmd=lambda x: x,
                     caches=[TeaCache(12, 0.1, "Wan2.1-T2V-1.3B"), TeaCache(12, 0.1, "Wan2.1-T2V-1.3B")])


# -- a cache plugged in from outside the package -------------------------------------------------

class EveryOtherStep:
    """Computes even steps and reuses the last residual on odd ones (after ``warmup`` computed steps)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.residual, self.skipped = warmup, None, []

    def run(self, dit: Any, inputs: Any) -> torch.Tensor:
        step = len(self.skipped)
        skip = step >= self.warmup and step % 2 == 1
        self.skipped.append(skip)
        if skip:
            return inputs.tokens + self.residual
        tokens = dit.run_blocks(inputs)
        self.residual = tokens - inputs.tokens
        return tokens


@pytest.fixture
def every_other_step():
    built: list[tuple[int, int]] = []

    def factory(options: dict, steps: int, branch: int) -> EveryOtherStep:
        built.append((steps, branch))
        return EveryOtherStep(options["warmup"])

    register_step_cache("every_other_step", factory, options={"warmup": 2})
    yield built
    del STEP_CACHES["every_other_step"]


def test_a_cache_registered_outside_the_package_runs_from_the_request(tiny, every_other_step) -> None:
    pipe, embeds, plain = tiny
    cached = generate(pipe, embeds, num_inference_steps=6, step_cache="every_other_step",
                      step_cache_options={"warmup": 3})
    assert every_other_step == [(6, 0), (6, 1)]
    assert pipe.step_cache_skips == [[False, False, False, True, False, True]] * 2
    assert torch.equal(generate(pipe, embeds, num_inference_steps=6, step_cache="every_other_step",
                                step_cache_options={"warmup": 6}), generate(pipe, embeds, num_inference_steps=6))
    assert not torch.equal(cached, generate(pipe, embeds, num_inference_steps=6))


def test_a_factory_returning_no_cache_is_a_clear_error(tiny) -> None:
    register_step_cache("not_a_cache", lambda options, steps, branch: object())
    try:
        with pytest.raises(TypeError, match="'not_a_cache' returned a object, which lacks run"):
            generate(tiny[0], tiny[1], step_cache="not_a_cache")
    finally:
        del STEP_CACHES["not_a_cache"]


# -- sequence parallel: every rank takes the same decision ----------------------------------------

def _worker(out: Path) -> None:
    """One rank: First Block Cache sequence-parallel and in one process; writes ``rank<N>.json``."""
    import torch.distributed as dist

    from wan_runtime.parallel import enable_usp, init_process_group

    torch.set_num_threads(1)
    init_process_group("cpu")
    pipe, embeds = pipeline()
    parallel = enable_usp(pipe)
    results = {}
    with torch.no_grad():
        sharded = generate(pipe, embeds, step_cache="first_block", step_cache_options={"threshold": SKIPPING})
        results["parallel"] = pipe.step_cache_skips
        pipe.sequence_parallel = None
        single = generate(pipe, embeds, step_cache="first_block", step_cache_options={"threshold": SKIPPING})
        results["single"] = pipe.step_cache_skips
        results["max_diff"] = (sharded - single).abs().max().item()
        pipe.sequence_parallel = parallel
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def test_sequence_parallel_ranks_skip_the_same_steps_as_one_process(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)],
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    try:
        logs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), [log[-2000:] for log in logs]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    assert ranks[0]["parallel"] == ranks[1]["parallel"] == ranks[0]["single"]
    assert any(map(any, ranks[0]["parallel"]))
    assert max(r["max_diff"] for r in ranks) <= 1e-5  # float32 rounding, as in test_usp.py


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
