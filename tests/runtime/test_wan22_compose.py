"""Wan 2.2 with the rest of the runtime: MagCache calibrated per expert of an A14B pair, TeaCache only
where Wan 2.2 coefficients are published (TI2V-5B), and VRAM management switching experts once per
generation with its cost recorded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from wan_models.configs import VAE22_FILE
from wan_runtime import WanVideoPipeline
from wan_runtime.caching import TEACACHE_COEFFICIENTS, calibrate_magcache

from factories import load_tiny_pipeline as load, one_thread_fixture, tiny_releases

one_thread = one_thread_fixture("module")
SIZE = dict(height=32, width=32, num_frames=5)
A14B, TI2V = "Wan2.2-T2V-A14B", "Wan2.2-TI2V-5B"
STEPS, BOUNDARY = 10, 0.6


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    return tiny_releases(tmp_path_factory, A14B, TI2V)




def load_pair(releases: Path) -> WanVideoPipeline:
    folder = releases / "Wan-AI" / A14B
    return load(folder, [folder / "high_noise_model", folder / "low_noise_model"])


@pytest.fixture(scope="module")
def pair(releases) -> WanVideoPipeline:
    return load_pair(releases)


@pytest.fixture(scope="module")
def ti2v(releases) -> WanVideoPipeline:
    return load(releases / "Wan-AI" / TI2V, [releases / "Wan-AI" / TI2V], vae=VAE22_FILE)


ARGS = dict(prompt="a red cat", negative_prompt="blurry", seed=3, num_inference_steps=STEPS, sampler="euler",
            sigma_shift=1.0, cfg_scale=5.0, switch_DiT_boundary=BOUNDARY, **SIZE)


def call(pipe: WanVideoPipeline, **kwargs) -> torch.Tensor:
    args = {**ARGS, **({} if pipe.dit2 is not None else {"switch_DiT_boundary": None})}
    return pipe(**{**args, **kwargs}, progress_bar_cmd=lambda x: x, output_type="latent")


def high_steps(pipe: WanVideoPipeline) -> int:
    return sum(float(t) >= BOUNDARY * 1000 for t in pipe.scheduler.timesteps)


# ---- MagCache per expert ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ratios(pair) -> dict[str, list[list[float]]]:
    return calibrate_magcache(pair, **ARGS)


def test_magcache_is_calibrated_per_expert(pair, ratios) -> None:
    high = high_steps(pair)
    assert 3 <= high <= STEPS - 3  # both experts serve several steps
    assert set(ratios) == {"dit", "dit2"}
    for name, steps in (("dit", high), ("dit2", STEPS - high)):
        assert len(ratios[name]) == 2 and all(len(row) == steps for row in ratios[name])  # two CFG branches
        assert all(row[0] == 1.0 for row in ratios[name])  # each expert's first step has no previous residual


def test_magcache_skips_per_expert_and_stays_close(pair, ratios) -> None:
    plain = call(pair)
    # Any ratio passes the threshold, no retained steps, at most one skip in a row: the pattern is fixed.
    options = {"threshold": 1.0, "ratios": ratios, "max_skip_steps": 1, "retention_ratio": 0.0}
    cached = call(pair, step_cache="magcache", step_cache_options=options)
    high = high_steps(pair)

    def pattern(steps: int) -> list[bool]:  # compute, skip, compute, ..., and the expert's last step computes
        return [i % 2 == 1 and i < steps - 1 for i in range(steps)]

    for branch in pair.step_cache_skips:  # each expert starts afresh at the switch: its first step computes
        assert branch == pattern(high) + pattern(STEPS - high)
    assert not torch.equal(cached, plain)
    # Reusing residuals on every other step moves the result of this random tiny pair a little, not a lot.
    assert float((cached - plain).norm() / plain.norm()) < 0.25
    # The seed's fields take the per-expert ratios too.
    seed_fields = call(pair, mag_cache_thresh=1.0, mag_cache_ratios=ratios, mag_cache_max_skip_steps=1,
                       mag_cache_retention_ratio=0.0)
    assert torch.equal(seed_fields, cached)


def test_magcache_ratios_that_do_not_fit_are_clear_errors(pair, ratios, ti2v) -> None:
    def magcache(pipe: WanVideoPipeline, given) -> torch.Tensor:
        return call(pipe, step_cache="magcache", step_cache_options={"threshold": 0.1, "ratios": given})

    with pytest.raises(ValueError, match=r"one list \(or one per CFG branch\), but the pipeline holds an expert pair"):
        magcache(pair, ratios["dit"])
    with pytest.raises(ValueError, match="one list .* expert pair"):
        magcache(pair, ratios["dit"][0])
    with pytest.raises(ValueError, match=r"no entry for expert 'dit2' \(got \['dit'\]\)"):
        magcache(pair, {"dit": ratios["dit"]})
    with pytest.raises(ValueError, match=f"expert 'dit' hold {high_steps(pair)} steps, but it serves"):
        call(pair, num_inference_steps=STEPS + 4, step_cache="magcache",
             step_cache_options={"threshold": 0.1, "ratios": ratios})
    with pytest.raises(ValueError, match=r"given per expert \(\['dit', 'dit2'\]\), but the pipeline holds one DiT"):
        magcache(ti2v, ratios)
    with pytest.raises(ValueError, match="must have str keys"):
        magcache(pair, {0: ratios["dit"]})


# ---- TeaCache on Wan 2.2 ------------------------------------------------------------------------

def test_teacache_has_no_coefficients_for_the_a14b_experts(pair) -> None:
    with pytest.raises(ValueError, match="no published TeaCache coefficients for 'Wan2.2-T2V-A14B'.*first_block.*"
                                         "magcache"):
        call(pair, tea_cache_l1_thresh=0.1, tea_cache_model_id=A14B)
    # Wan 2.1 (or TI2V) coefficients never apply silently to an A14B expert.
    for model_id in ("Wan2.1-T2V-14B", TI2V):
        with pytest.raises(ValueError, match=f"coefficients of '{model_id}' were fitted on .* but this DiT is "
                                             "wan2.2 wan2.2-t2v.*first_block.*magcache"):
            call(pair, tea_cache_l1_thresh=0.1, tea_cache_model_id=model_id)


def test_teacache_on_ti2v_uses_its_published_coefficients(ti2v) -> None:
    assert len(TEACACHE_COEFFICIENTS[TI2V]) == 6  # LightX2V's fifth-degree polynomial
    with pytest.raises(ValueError, match="this DiT is wan2.2 wan2.2-ti2v.*own .*'Wan2.2-TI2V-5B'"):
        call(ti2v, tea_cache_l1_thresh=0.1, tea_cache_model_id="Wan2.1-T2V-1.3B")
    plain = call(ti2v, num_inference_steps=6)
    cached = call(ti2v, num_inference_steps=6, step_cache="teacache",
                  step_cache_options={"threshold": 1e9, "model_id": TI2V})
    assert all(branch == [False] + [True] * 4 + [False] for branch in ti2v.step_cache_skips)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    # A threshold of 0 never skips: exactly the uncached result.
    torch.testing.assert_close(call(ti2v, num_inference_steps=6, tea_cache_l1_thresh=0.0, tea_cache_model_id=TI2V),
                               plain, rtol=0, atol=0)


# ---- VRAM management across the switch ----------------------------------------------------------

@pytest.mark.parametrize("resident", [None, 0], ids=["all-resident", "streamed"])
def test_vram_management_switches_experts_once_per_generation(releases, resident, caplog) -> None:
    pipe = load_pair(releases)
    plain = call(pipe)
    vram = pipe.enable_vram_management(num_persistent_param_in_dit=resident)
    seen: list[bool] = []

    def loaded(name: str) -> bool:  # whether any of the network's weights are on the compute side
        network = vram.networks[name]
        return any(u.loaded for u in [network.root, *network.units] if u is not None)

    def only_dit2_on_device(module, args) -> None:  # while the low-noise expert runs, the other is offloaded
        seen.append(loaded("dit2") and not loaded("dit"))

    handle = pipe.dit2.blocks[0].register_forward_pre_hook(only_dit2_on_device)
    try:
        with caplog.at_level(logging.INFO, logger="wan_runtime.memory.offload"):
            managed = call(pipe)
    finally:
        handle.remove()
    torch.testing.assert_close(managed, plain, rtol=0, atol=1e-6)
    assert seen and all(seen)
    assert len(vram.switches) == 1
    switch = vram.switches[0]
    assert (switch.source, switch.target) == ("dit", "dit2") and switch.seconds >= 0
    assert switch.nbytes == vram.networks["dit2"].resident_bytes  # streamed layers come over as they run
    if resident is None:  # everything resident: the whole low-noise expert comes over at the switch
        assert switch.nbytes == sum(p.numel() * p.element_size() for p in pipe.dit2.parameters()) > 0
    assert "expert switch dit -> dit2" in caplog.text
    call(pipe)
    assert [(s.source, s.target) for s in vram.switches] == [("dit", "dit2")] * 2  # once per generation
    assert vram.active is None and not loaded("dit") and not loaded("dit2")  # between calls: all in storage
