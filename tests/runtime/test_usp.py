"""Unified sequence parallel on 2 and 3 gloo processes (CPU) against the single-process results.

The fixture launches this file once per world size the way torchrun does (one process per rank,
``env://`` variables). Each rank runs every case below both sequence-parallel and in one process,
and writes what it measured; the tests check it. float32 throughout: outputs must agree to 1e-5.
The DiT cases use 175 video tokens, which neither 2 nor 3 divides, so padding is always exercised.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from wan_models import DiTConfig
from wan_models.attention import get_attention_backend, sdpa_attention, set_attention_backend
from wan_runtime import ModelConfig, WanVideoPipeline, tiny_release
from wan_runtime.parallel import head_split, init_process_group

logger = logging.getLogger(__name__)

TOLERANCE = 1e-5  # float32 rounding; the measured differences are 0 or a few ulp
WORLD_SIZES = (2, 3)
MODEL_ID = "Wan-AI/Wan2.1-T2V-1.3B"  # its tiny DiT has 2 heads: even on 2 ranks, uneven on 3
LATENT_GRID = (5, 10, 14)  # 5 * 5 * 7 = 175 tokens
PIPELINE_CASES = ("pipeline", "pipeline-teacache", "pipeline-windows", "pipeline-ti2v-image", "pipeline-a14b-pair")
DIT_CASES = ("dit-ulysses", "dit-uneven-heads", "dit-vace", "dit-reference", "dit-per-token")


# -- what each rank runs -------------------------------------------------------------------------

def _tiny_config(heads: int, **changes: Any) -> DiTConfig:
    return DiTConfig(dim=16 * heads, ffn_dim=64, num_heads=heads, num_layers=2, text_dim=24, freq_dim=16,
                     text_len=8, **changes)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _dit_cases(world: int) -> dict[str, Callable[[], tuple[Any, tuple, dict]]]:
    """Case name -> (DiT, positional inputs, keyword inputs)."""
    from factories import dit_inputs, random_dit

    def case(config: DiTConfig, batch: int = 1, grid: tuple[int, int, int] = LATENT_GRID, **extra: torch.Tensor):
        return lambda: (random_dit(config), dit_inputs(config, batch=batch, grid=grid), extra)

    def per_token(config: DiTConfig):
        """Wan 2.2 TI2V-style timesteps [B, L]: row 0 has its first latent frame's tokens at t = 0."""
        def make():
            x, t, context = dit_inputs(config, batch=2, grid=LATENT_GRID)
            tokens = t[:, None].repeat(1, math.prod(LATENT_GRID) // 4)
            tokens[0, :LATENT_GRID[1] * LATENT_GRID[2] // 4] = 0
            return random_dit(config), (x, tokens, context), {}
        return make

    gen = torch.Generator().manual_seed(5)
    uneven = 3 if world == 2 else 2
    return {
        "dit-ulysses": case(_tiny_config(world), batch=2),
        "dit-uneven-heads": case(_tiny_config(uneven), batch=2),
        "dit-vace": case(_tiny_config(uneven, vace_layers=(0, 1)),
                         vace_context=torch.randn(1, 96, *LATENT_GRID, generator=gen)),
        # 4 frames + 1 reference frame of 5 * 7 tokens = 175 tokens
        "dit-reference": case(_tiny_config(uneven, ref_conv=True), grid=(4, 10, 14),
                              reference_latents=torch.randn(1, 16, 1, 10, 14, generator=gen)),
        # 175 tokens on 2 or 3 ranks: the per-token e0 is split (and padded) with the tokens
        "dit-per-token": per_token(_tiny_config(uneven, in_dim=48, out_dim=48, family="wan2.2")),
    }


def _generate(pipe: WanVideoPipeline, **kwargs: Any) -> torch.Tensor:
    config = pipe.dit.config
    gen = torch.Generator().manual_seed(3)
    embeds = [torch.randn(1, config.text_len, config.text_dim, generator=gen) for _ in range(2)]
    settings = dict(height=80, width=112, num_frames=9, num_inference_steps=2, seed=0, cfg_scale=5.0,
                    prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], output_type="latent",
                    progress_bar_cmd=lambda steps: steps)
    return pipe(**{**settings, **kwargs})


def _worker(out: Path, models: Path) -> None:
    """One rank: every case sequence-parallel and single-process; writes ``rank<N>.json``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    pipe = WanVideoPipeline.from_pretrained(  # joins the group from the torchrun variables
        torch_dtype=torch.float32, device="cpu", use_usp=True, local_model_path=str(models), skip_download=True,
        model_configs=[ModelConfig(model_id=MODEL_ID, origin_file_pattern="diffusion_pytorch_model*.safetensors")])
    parallel = pipe.sequence_parallel
    pipeline_kwargs = {
        "pipeline": {},
        "pipeline-teacache": dict(num_inference_steps=4, tea_cache_l1_thresh=10.0, tea_cache_model_id="Wan2.1-T2V-1.3B"),
        "pipeline-windows": dict(sliding_window_size=2, sliding_window_stride=1),
    }
    block_runs: list[int] = []  # the first block's calls: fewer than steps x branches when a cache skips
    pipe.dit.blocks[0].register_forward_pre_hook(lambda module, args: block_runs.append(1))
    with torch.no_grad():
        for name, kwargs in pipeline_kwargs.items():
            block_runs.clear()
            pipe.sequence_parallel = parallel
            sequence_parallel = _generate(pipe, **kwargs)
            runs = len(block_runs)
            pipe.sequence_parallel = None
            results[name] = _max_diff(sequence_parallel, _generate(pipe, **kwargs))
            results[f"{name}-block-runs"] = [runs, len(block_runs) - runs]
        pipe.sequence_parallel = parallel
        unseeded = _generate(pipe, seed=None)
        first = unseeded.clone()
        dist.broadcast(first, src=0)
        results["unseeded-vs-rank-0"] = _max_diff(unseeded, first)

        for name, make in _dit_cases(dist.get_world_size()).items():
            dit, args, kwargs = make()
            results[name] = _max_diff(parallel.wrap(dit)(*args, **kwargs), dit(*args, **kwargs))

        dit, args, kwargs = _dit_cases(dist.get_world_size())["dit-uneven-heads"]()
        lengths = []

        def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            lengths.append((q.shape[1], k.shape[1]))
            return sdpa_attention(q, k, v)

        previous = set_attention_backend(counting)
        try:
            parallel.wrap(dit)(*args, **kwargs)
            results["backend_restored"] = get_attention_backend() is counting
        finally:
            set_attention_backend(previous)
        results["local_attention_lengths"] = sorted(set(lengths))
    results.update(_wan22_cases(models))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _wan22_cases(models: Path) -> dict[str, float]:
    """Wan 2.2 under sequence parallel: TI2V image-to-video (per-token timesteps, 0 on the image's
    tokens, split with the tokens) and the A14B expert pair (both experts wrapped)."""
    from PIL import Image

    def load(folder: Path, files: list[str]) -> WanVideoPipeline:
        return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", use_usp=True,
                                                skip_download=True, local_model_path=str(models),
                                                model_configs=[ModelConfig(path=str(folder / f)) for f in files])

    image = Image.new("RGB", (96, 64), (200, 40, 90))
    settings = dict(height=64, width=96, num_frames=5, num_inference_steps=3, sampler="euler", sigma_shift=5.0)
    ti2v = load(models / "Wan-AI" / "Wan2.2-TI2V-5B", ["diffusion_pytorch_model.safetensors", "Wan2.2_VAE.pth"])
    pair = load(models / "Wan-AI" / "Wan2.2-T2V-A14B", ["high_noise_model", "low_noise_model"])
    out = {}
    with torch.no_grad():
        for name, pipe, kwargs in (("pipeline-ti2v-image", ti2v, dict(input_image=image)),
                                   ("pipeline-a14b-pair", pair, dict(cfg_scale_2=3.0, switch_DiT_boundary=0.6))):
            parallel = pipe.sequence_parallel
            split = _generate(pipe, **settings, **kwargs)
            pipe.sequence_parallel = None
            out[name] = _max_diff(split, _generate(pipe, **settings, **kwargs))
            pipe.sequence_parallel = parallel
    return out


# -- launching -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out: Path, models: Path) -> list[dict[str, Any]]:
    """Run :func:`_worker` on ``world`` processes with torchrun's variables; every rank's results."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(out), str(models)],
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, proc.returncode, log[-3000:]) for rank, (proc, log) in enumerate(zip(procs, logs))
              if proc.returncode]
    assert not failed, f"ranks failed: {failed}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_release.write_dit(root / MODEL_ID, tiny_release.tiny_dit_config())
    for name in ("Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B"):
        tiny_release.write_release(root, name)
    return root


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda world: f"{world}ranks")
def ranks(request, models, tmp_path_factory) -> list[dict[str, Any]]:
    results = _launch(request.param, tmp_path_factory.mktemp(f"usp{request.param}"), models)
    logger.info("USP on %d ranks, max |parallel - single| per rank: %s", request.param,
                [{k: v for k, v in r.items() if isinstance(v, float)} for r in results])
    return results


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", PIPELINE_CASES + DIT_CASES)
def test_sequence_parallel_equals_single_process(ranks, case) -> None:
    diffs = [r[case] for r in ranks]
    assert max(diffs) <= TOLERANCE, f"{case}: max |parallel - single| per rank {diffs}"


def test_teacache_skips_the_same_steps_on_slices(ranks) -> None:
    for r in ranks:
        parallel, single = r["pipeline-teacache-block-runs"]
        assert parallel == single < 4 * 2  # 4 steps x 2 CFG branches without skipping


def test_unseeded_noise_is_the_same_on_every_rank(ranks) -> None:
    assert all(r["unseeded-vs-rank-0"] == 0 for r in ranks)


def test_installed_backend_does_the_local_attention(ranks) -> None:
    """Self-attention reaches the backend as whole sequences (175), cross-attention as slices (text: 8)."""
    world = len(ranks)
    per_rank = -(-175 // world)
    for rank, r in enumerate(ranks):
        assert r["backend_restored"]
        heads = head_split(3 if world == 2 else 2, world)[rank]
        assert sorted(map(tuple, r["local_attention_lengths"])) == sorted(
            {(per_rank, 8)} | ({(175, 175)} if heads else set()))


def test_head_split_covers_every_head() -> None:
    assert head_split(12, 8) == [2, 2, 2, 2, 1, 1, 1, 1]
    assert head_split(2, 3) == [1, 1, 0]
    assert head_split(40, 8) == [5] * 8


def test_use_usp_outside_torchrun_is_a_clear_error(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_process_group("cpu")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
