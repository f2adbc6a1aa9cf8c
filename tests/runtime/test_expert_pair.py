"""Several DiTs and a step composed of parts: the Wan2.2-A14B expert pair switching at a boundary end
to end (against a loop written out here), roles from folders or from the order given, per-expert step
caches, per-token timesteps for TI2V, and parts replaced without touching the loop."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_models.configs import VAE22_FILE
from wan_runtime import WanVideoPipeline
from wan_runtime.memory import Accountant
from wan_runtime.request import GenerationRequest
from wan_runtime.step import StepPlan, expert_part, timestep_part

from factories import load_tiny_pipeline as load, one_thread_fixture, tiny_releases

one_thread = one_thread_fixture("module")
SIZE = dict(height=32, width=32, num_frames=5)
A14B, TI2V = "Wan2.2-T2V-A14B", "Wan2.2-TI2V-5B"


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    return tiny_releases(tmp_path_factory, A14B, TI2V)




@pytest.fixture(scope="module")
def pair(releases) -> WanVideoPipeline:
    folder = releases / "Wan-AI" / A14B
    # Low-noise first: the folders, not the order, decide the roles.
    return load(folder, [folder / "low_noise_model", folder / "high_noise_model"])


def call(pipe: WanVideoPipeline, **kwargs):
    # Explicit settings: what a Wan 2.2 pipeline would otherwise take from the registry (test_model_defaults.py).
    args = dict(prompt="a red cat", negative_prompt="blurry", seed=3, num_inference_steps=6, sampler="euler",
                sigma_shift=5.0, cfg_scale=5.0, progress_bar_cmd=lambda x: x, output_type="latent", **SIZE)
    return pipe(**{**args, **kwargs})


def test_roles_come_from_the_folders(pair) -> None:
    assert pair.dit.identity.expert == "high" and pair.dit2.identity.expert == "low"
    assert pair.dits == [pair.dit, pair.dit2]


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_experts_switch_at_the_boundary_with_their_own_guidance(pair, sampler: str) -> None:
    """The loop written out: high-noise expert with cfg_scale while t >= boundary*1000, then the
    low-noise one with cfg_scale_2, one solver across the switch."""
    kwargs = dict(sampler=sampler, cfg_scale=4.0, cfg_scale_2=2.5, switch_DiT_boundary=0.6, sigma_shift=3.0)
    out = call(pair, **kwargs)
    request = GenerationRequest(prompt="a red cat", negative_prompt="blurry", seed=3, num_inference_steps=6,
                                **SIZE, **kwargs)
    cond = pair.prepare(request)
    latents, used = cond.latents, []
    with torch.no_grad():
        for t in pair.scheduler.timesteps:
            high = float(t) >= 600
            dit, scale = (pair.dit, 4.0) if high else (pair.dit2, 2.5)
            used.append("high" if high else "low")
            timestep = t.reshape(1).float()
            pos = dit(latents, timestep, **cond.shared, **cond.positive)
            neg = dit(latents, timestep, **cond.shared, **cond.negative)
            latents = pair.scheduler.step(neg + scale * (pos - neg), t, latents)
    assert "high" in used and "low" in used
    torch.testing.assert_close(out, latents, rtol=0, atol=1e-6)
    # The switch matters: a pipeline with the low-noise expert everywhere gives something else.
    assert not torch.allclose(out, call(pair, **{**kwargs, "switch_DiT_boundary": 1.0}), atol=1e-4)


def test_each_expert_gets_its_own_step_caches(pair) -> None:
    call(pair, step_cache="first_block", step_cache_options={"threshold": 10.0}, switch_DiT_boundary=0.6)
    skips = pair.step_cache_skips
    assert len(skips) == 2 and all(len(branch) == 6 for branch in skips)
    high_steps = sum(float(t) >= 600 for t in pair.scheduler.timesteps)
    for branch in skips:  # each expert computes its first step, then (huge threshold) skips the rest
        assert branch[0] is False and branch[high_steps] is False
        assert all(branch[1:high_steps]) and all(branch[high_steps + 1:])


def test_an_expert_needs_its_partner_and_expert_fields_need_a_pair(releases) -> None:
    folder = releases / "Wan-AI" / A14B
    single = load(folder, [folder / "high_noise_model"])
    assert single.dit2 is None
    with pytest.raises(ValueError, match="the high-noise expert of a Wan 2.2 pair, and the low-noise expert is "
                                         "missing: load it too \\(its low_noise_model/ folder\\)"):
        call(single)
    ti2v = load(releases / "Wan-AI" / TI2V, [releases / "Wan-AI" / TI2V], vae=VAE22_FILE)
    for field, value in (("cfg_scale_2", 3.0), ("switch_DiT_boundary", 0.9)):
        with pytest.raises(ValueError, match=f"{field} set, but the pipeline holds one DiT"):
            call(ti2v, **{field: value})
    with pytest.raises(ValueError, match="switch_DiT_boundary must be"):
        GenerationRequest(switch_DiT_boundary=1.5)


def test_without_roles_the_order_decides_with_a_log_line(releases, tmp_path, caplog) -> None:
    folder = releases / "Wan-AI" / A14B
    for name in ("first", "second"):
        source = "high_noise_model" if name == "second" else "low_noise_model"
        shutil.copy(folder / source / "diffusion_pytorch_model.safetensors", tmp_path / f"{name}.safetensors")
    with caplog.at_level(logging.INFO, logger="wan_runtime.pipeline"):
        pipe = load(folder, [tmp_path / "first.safetensors", tmp_path / "second.safetensors"])
    assert "taking the order given: first high-noise" in caplog.text
    assert pipe.dit.identity.expert is None
    low_weights = next(iter(load(folder, [folder / "low_noise_model"]).dit.parameters()))
    assert torch.equal(next(iter(pipe.dit.parameters())), low_weights)  # "first" holds the low-noise weights


def test_bad_expert_pairs_are_refused(releases, pair) -> None:
    folder = releases / "Wan-AI" / A14B
    with pytest.raises(ValueError, match="both DiTs are high-noise experts"):
        load(folder, [folder / "high_noise_model", folder / "high_noise_model"])
    with pytest.raises(ValueError, match="three DiTs given"):
        pair.add_model(pair.dit)
    ti2v = load(releases / "Wan-AI" / TI2V, [releases / "Wan-AI" / TI2V], vae=VAE22_FILE)
    with pytest.raises(ValueError, match=r"different architectures \(wan2.2-t2v, wan2.2-ti2v\)"):
        pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
        pipe.add_model(pair.dit)
        pipe.add_model(ti2v.dit)


class Recorder(Accountant):
    """Which network's weights come to the compute side, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.networks: list[str] = []

    def add(self, nbytes: int, name: str) -> None:
        super().add(nbytes, name)
        self.networks.append(name.split(":", 1)[0])


def test_vram_management_with_two_experts_gives_the_same_latents(releases) -> None:
    folder = releases / "Wan-AI" / A14B
    pipe = load(folder, [folder / "high_noise_model", folder / "low_noise_model"])
    plain = call(pipe, switch_DiT_boundary=0.6)
    pipe.enable_vram_management(num_persistent_param_in_dit=0)
    assert {"dit", "dit2"} <= set(pipe.vram.networks)
    torch.testing.assert_close(call(pipe, switch_DiT_boundary=0.6), plain, rtol=0, atol=1e-6)
    # Everything resident: each expert's weights come over once, at the switch, not every step.
    recorder = Recorder()
    pipe.enable_vram_management(accountant=recorder)
    torch.testing.assert_close(call(pipe, switch_DiT_boundary=0.6), plain, rtol=0, atol=1e-6)
    runs = [name for i, name in enumerate(recorder.networks) if i == 0 or recorder.networks[i - 1] != name]
    assert runs.count("dit") == 1 and runs.count("dit2") == 1 and runs.index("dit") < runs.index("dit2")


# ---- the step's parts ---------------------------------------------------------------------------

def test_ti2v_gets_per_token_timesteps_and_parts_can_be_replaced(releases) -> None:
    pipe = load(releases / "Wan-AI" / TI2V, [releases / "Wan-AI" / TI2V], vae=VAE22_FILE)
    assert pipe.dit.config.per_token_timesteps and pipe.shape_multiples == (32, 4)
    seen: list[torch.Tensor] = []

    def recording(p, request, cond, plan: StepPlan) -> None:
        timestep_part(p, request, cond, plan)
        inner = plan.timestep
        plan.timestep = lambda t: seen.append(inner(t)) or seen[-1]

    pipe.step_hooks[0] = recording
    per_token = call(pipe, num_inference_steps=3)
    tokens = (5 - 1) // 4 + 1  # latent frames x (32 / 16 / 2)^2 tokens per frame
    assert all(t.shape == (1, tokens) and bool((t == t[0, 0]).all()) for t in seen)

    def scalar(p, request, cond, plan: StepPlan) -> None:  # the Wan 2.1 part: one timestep per video
        plan.timestep = lambda t: t.reshape(1).float()

    pipe.step_hooks[0] = scalar
    # Equal timesteps on every token are the scalar path (to float32 rounding of the time MLP).
    torch.testing.assert_close(call(pipe, num_inference_steps=3), per_token, rtol=1e-5, atol=1e-5)


def test_a_fixup_from_a_unit_runs_after_every_step(releases) -> None:
    pipe = load(releases / "Wan-AI" / TI2V, [releases / "Wan-AI" / TI2V], vae=VAE22_FILE)
    fixed = torch.randn(1, 48, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    steps = []

    def frame0(p, request, cond) -> None:
        def put_back(latents: torch.Tensor) -> torch.Tensor:
            steps.append(1)
            return torch.cat([fixed, latents[:, :, 1:]], dim=2)
        cond.step_fixups.append(put_back)

    pipe.units.append(frame0)
    out = call(pipe, num_inference_steps=3, num_frames=9)
    assert len(steps) == 3 and torch.equal(out[:, :, :1], fixed)


def test_a_plan_without_a_route_is_a_clear_error(pair) -> None:
    pair.step_hooks.remove(expert_part)
    try:
        with pytest.raises(ValueError, match="set no route part"):
            call(pair)
    finally:
        pair.step_hooks.insert(1, expert_part)


def test_a_lora_merges_into_one_expert_only(releases, tmp_path) -> None:
    folder = releases / "Wan-AI" / A14B
    pipe = load(folder, [folder / "high_noise_model", folder / "low_noise_model"])
    before = call(pipe, switch_DiT_boundary=0.6)
    high_weights = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    q = pipe.dit2.blocks[0].self_attn.q.weight
    gen = torch.Generator().manual_seed(4)
    lora = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, q.shape[1], generator=gen),
            "blocks.0.self_attn.q.lora_B.weight": torch.randn(q.shape[0], 2, generator=gen)}
    path = tmp_path / "low_noise_lora.safetensors"
    save_file(lora, path)
    expected = q + lora["blocks.0.self_attn.q.lora_B.weight"] @ lora["blocks.0.self_attn.q.lora_A.weight"]
    merge = pipe.load_lora(pipe.dit2, path)
    torch.testing.assert_close(pipe.dit2.blocks[0].self_attn.q.weight, expected)
    assert all(torch.equal(v, high_weights[k]) for k, v in pipe.dit.state_dict().items())
    assert not torch.allclose(call(pipe, switch_DiT_boundary=0.6), before, atol=1e-4)
    # Unloaded: the result before, to float32 rounding of the merge's add and subtract.
    pipe.unload_lora(merge)
    torch.testing.assert_close(call(pipe, switch_DiT_boundary=0.6), before, rtol=1e-4, atol=1e-5)


def test_ti2v_initial_noise_is_diffsynths(releases) -> None:
    """DiffSynth draws ``randn((1, z_dim, (T-1)/4+1, H/16, W/16))`` from ``Generator(rand_device).manual_seed``
    for the 48-channel Wan2.2-VAE latents; the same seed gives the same noise here."""
    pipe = load(releases / "Wan-AI" / TI2V, [releases / "Wan-AI" / TI2V], vae=VAE22_FILE)
    request = GenerationRequest(prompt="a cat", seed=11, height=64, width=96, num_frames=9,
                                shape_multiples=pipe.shape_multiples)
    cond = pipe.prepare(request)
    expected = torch.randn((1, 48, 3, 4, 6), generator=torch.Generator("cpu").manual_seed(11))
    assert torch.equal(cond.noise, expected)


def test_the_pipeline_follows_the_pinned_expert_rule(pair) -> None:
    """For every setting of the ``wan22_moe_switch`` case, a run of the tiny pair uses the expert and the
    guidance scale the reference recorded at every step of the same schedule."""
    from parity_support import ParityCase

    case = ParityCase.load("wan22_moe_switch", family="wan22")
    routes: list[tuple[str, float]] = []

    def record(p, request, cond, plan: StepPlan) -> None:  # a part that wraps the expert route
        route = plan.route

        def recorded(t):
            chosen = route(t)
            routes.append((chosen.name, chosen.cfg_scale))
            return chosen
        plan.route = recorded

    pair.step_hooks.append(record)
    try:
        for i, setting in enumerate(case.literal_args["settings"]):
            routes.clear()
            seen: list[float] = []
            low, high = setting["sample_guide_scale"]
            call(pair, sampler={"dpm++": "dpmpp"}.get(setting["solver"], setting["solver"]),
                 num_inference_steps=setting["sample_steps"], sigma_shift=setting["sample_shift"],
                 switch_DiT_boundary=setting["boundary"], cfg_scale=high, cfg_scale_2=low,
                 step_callback=lambda step, t, latents: seen.append(float(t)))
            expected = case.expected
            torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64),
                                       expected[f"timesteps_{i}"].to(torch.float64), rtol=0, atol=1e-3)
            experts = [int(name == "dit") for name, _ in routes]
            assert experts == expected[f"expert_{i}"].tolist(), setting
            assert [scale for _, scale in routes] == pytest.approx(expected[f"guide_scale_{i}"].tolist()), setting
    finally:
        pair.step_hooks.remove(record)


def test_fp8_storage_covers_both_experts(releases) -> None:
    folder = releases / "Wan-AI" / A14B
    pipe = load(folder, [folder / "high_noise_model", folder / "low_noise_model"])
    plain = call(pipe, switch_DiT_boundary=0.6)
    reports = pipe.quantize_fp8()
    assert isinstance(reports, list) and len(reports) == 2
    for dit in pipe.dits:
        assert any(p.dtype == torch.float8_e4m3fn for p in dit.blocks.parameters()) or any(
            b.dtype == torch.float8_e4m3fn for b in dit.blocks.buffers())
    quantized = call(pipe, switch_DiT_boundary=0.6)
    # float8 weights: a few percent of the latents' scale on this random tiny pair.
    assert float((quantized - plain).norm() / plain.norm()) < 0.1


def test_compile_covers_both_experts(releases) -> None:
    from wan_runtime.compile import is_compiled

    folder = releases / "Wan-AI" / A14B
    pipe = load(folder, [folder / "high_noise_model", folder / "low_noise_model"])
    plain = call(pipe, switch_DiT_boundary=0.6)
    pipe.compile(backend="eager")  # dynamo's graph capture without code generation: the composition is tested
    assert all(is_compiled(dit) for dit in pipe.dits)
    torch.testing.assert_close(call(pipe, switch_DiT_boundary=0.6), plain, rtol=1e-5, atol=1e-5)
