"""Where ``wan generate``'s sampling defaults come from (the registry's ``Sampling``, a folder's matching
entry, the embedded model), the step-cache flags, and ``wan models`` over both hubs' folders.

Everything runs in this process through ``wan_cli.main.main``; generation goes to a stand-in pipeline
that records the request, so no network is loaded.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import wan_models
from wan_cli import generate as gen
from wan_models.configs import Sampling
from wan_models.loading import read_checkpoint
from wan_runtime import WanVideoPipeline, tiny_release, video_io
from wan_runtime.sources import folder_entry

T2V = "Wan-AI/Wan2.1-T2V-1.3B"



class StandInPipeline:
    """Records the request and returns blank frames of its size: the CLI's path without any network."""

    vae = object()
    requests: list = []

    def prepare(self, request):
        self.requests.append(request)

    def denoise(self, request, cond, progress_bar_cmd=None):
        return None

    def decode(self, latents, request):
        return [Image.new("RGB", (request.width, request.height))] * request.num_frames


@pytest.fixture
def generated(wan, monkeypatch, tmp_path):
    """``wan generate ARGS`` on the stand-in pipeline: (result, the request, the fps the mp4 was written at)."""
    saved: dict = {}
    monkeypatch.setattr(StandInPipeline, "requests", [])
    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", classmethod(lambda cls, **kw: StandInPipeline()))
    monkeypatch.setattr(video_io, "save_video", lambda frames, path, fps, quality: saved.update(fps=fps))

    def run(*args: str):
        result = wan("generate", "--device", "cpu", "-q", "-o", str(tmp_path / "out.mp4"), *args)
        request = StandInPipeline.requests[-1] if StandInPipeline.requests else None
        return result, request, saved.get("fps")

    return run


def settings_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("settings from ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A tiny Wan2.1-T2V-1.3B release folder (its DiT config matches no registry entry)."""
    return tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.1-T2V-1.3B")


# ------------------------------------------------------------------ the registry's settings


def test_every_dit_entry_has_sampling_settings() -> None:
    for name, spec in wan_models.MODELS.items():
        assert spec.sampling is not None, name
        assert spec.sampling.sizes and all(h % 16 == 0 and w % 16 == 0 for h, w in spec.sampling.sizes), name
    fun = wan_models.MODELS["Wan2.1-Fun-1.3B-InP"].sampling
    assert (fun.default_sampler, fun.steps, fun.shift, fun.guidance) == ("euler", 50, 5.0, 5.0)
    assert (fun.sizes[0], fun.fps) == ((480, 832), 15)
    i2v = wan_models.MODELS["Wan2.1-I2V-14B-480P"].sampling
    assert (i2v.default_sampler, i2v.steps, i2v.shift) == ("unipc", 40, 3.0)
    assert wan_models.MODELS["Wan2.1-FLF2V-14B-720P"].sampling.shift == 16.0


@pytest.mark.parametrize("name, expected", [
    ("Wan2.1-T2V-14B", gen.Settings(720, 1280, 81, 16, 50, 5.0, 5.0, "unipc")),
    ("Wan2.1-Fun-1.3B-Control", gen.Settings(480, 832, 81, 15, 50, 5.0, 5.0, "euler")),
    ("Wan2.2-T2V-A14B", gen.Settings(480, 832, 81, 16, 40, 12.0, 4.0, "unipc", 3.0, 0.875)),  # (high, low) guidance
])
def test_registry_entries_give_the_flags_defaults(name, expected) -> None:
    settings, source, entry = gen.default_settings(name)
    assert settings == expected and entry == name and source.startswith(f"the registry entry {name}")


def test_registry_samplers_are_the_flag_spellings() -> None:
    import wan_models

    samplers = {name for spec in wan_models.MODELS.values() if spec.sampling for name in spec.sampling.samplers}
    assert samplers <= set(gen.SAMPLERS)


def test_a_registry_model_runs_at_its_settings_and_says_so(generated) -> None:
    result, request, fps = generated("-m", "Wan2.1-T2V-14B")
    assert result.returncode == 0, result.stderr
    assert (request.height, request.width, request.num_frames, request.num_inference_steps) == (720, 1280, 81, 50)
    assert (request.sigma_shift, request.cfg_scale, request.sampler, fps) == (5.0, 5.0, "unipc", 16)
    assert settings_line(result) == ("settings from the registry entry Wan2.1-T2V-14B: 1280x720, 81 frames @ 16 fps, "
                                     "50 steps, shift 5.0, cfg 5.0, unipc")


def test_flags_and_config_files_override_the_registry(generated, tmp_path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('sigma-shift = 7.5\n')
    result, request, fps = generated("-m", "Wan2.1-I2V-14B-480P", "--steps", "3", "--sampler", "euler",
                                     "--fps", "8", "--cfg-scale", "1", "--height", "64", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (request.num_inference_steps, request.sampler) == (3, "euler")
    assert (request.cfg_scale, request.sigma_shift) == (1.0, 7.5)
    assert (request.height, request.width, request.num_frames, fps) == (64, 832, 81, 8)  # the rest: the registry's
    line = settings_line(result)
    assert line.startswith("settings from the registry entry Wan2.1-I2V-14B-480P: 832x64, 81 frames @ 8 fps, 3 steps")
    assert line.endswith("; from the command line: --height, --fps, --steps, --sigma-shift, --cfg-scale, --sampler")


def test_an_expert_pair_gets_its_guidance_pair_and_boundary(generated) -> None:
    result, request, _ = generated("-m", "Wan2.2-T2V-A14B", "--frames", "5")
    assert result.returncode == 0, result.stderr
    assert (request.cfg_scale, request.cfg_scale_2, request.switch_DiT_boundary) == (4.0, 3.0, 0.875)
    assert (request.sigma_shift, request.num_inference_steps) == (12.0, 40)
    assert "cfg 4.0, low-noise cfg 3.0, boundary 0.875" in settings_line(result)
    # One --cfg-scale serves both experts; --cfg-scale-2 and --switch-boundary set the others.
    result, request, _ = generated("-m", "Wan2.2-T2V-A14B", "--frames", "5", "--cfg-scale", "2")
    assert (request.cfg_scale, request.cfg_scale_2) == (2.0, 2.0)
    result, request, _ = generated("-m", "Wan2.2-T2V-A14B", "--frames", "5", "--cfg-scale-2", "1.5",
                                   "--switch-boundary", "0.5")
    assert (request.cfg_scale, request.cfg_scale_2, request.switch_DiT_boundary) == (4.0, 1.5, 0.5)


def test_the_embedded_model_keeps_its_own_settings(generated) -> None:
    result, request, fps = generated("--steps", "2")
    assert result.returncode == 0, result.stderr
    assert (request.height, request.width, request.num_frames, request.cfg_scale) == (64, 64, 17, 3.0)
    assert (request.sampler, request.sigma_shift, fps) == ("euler", 5.0, 15)
    assert settings_line(result).startswith("settings from the embedded tiny-shapes model: 64x64, 17 frames @ 15 fps")


# ------------------------------------------------------------------ a local folder's registry entry


def _entry(name: str, config, sampling: Sampling) -> wan_models.ModelSpec:
    return dataclasses.replace(wan_models.MODELS["Wan2.1-I2V-14B-480P"], name=name, model_id=f"Test/{name}",
                               hf_id=f"test-hub/{name}-hf", config=config, sampling=sampling)


@pytest.fixture
def twin_entries(release, monkeypatch):
    """Two registry entries with the tiny release's DiT config and different settings (as I2V-480P and
    720P share one config), named Tiny-A and Tiny-B (Hub id Tiny-B-hf)."""
    config = read_checkpoint(sorted(release.glob("diffusion_pytorch_model*.safetensors"))).config
    for name, steps in (("Tiny-A", 7), ("Tiny-B", 9)):
        sampling = Sampling(frames=9, fps=12, sizes=((32, 48),), steps=steps, shift=3.0, guidance=4.0)
        monkeypatch.setitem(wan_models.MODELS, name, _entry(name, config, sampling))
    return config


def _named(release: Path, tmp_path: Path, name: str) -> Path:
    """The release under another folder name (a symbolic link)."""
    folder = tmp_path / name
    folder.symlink_to(release, target_is_directory=True)
    return folder


def test_a_folder_without_a_matching_entry_takes_the_old_defaults(release) -> None:
    settings, source, entry = gen.default_settings(str(release))
    assert settings == gen.FALLBACK_SETTINGS and entry is None
    assert "no registry entry has its DiT's config" in source


def test_a_folder_takes_the_settings_of_the_entry_its_dit_matches(release, twin_entries, monkeypatch, tmp_path) -> None:
    monkeypatch.delitem(wan_models.MODELS, "Tiny-B")
    assert folder_entry(release) == ("Tiny-A", ["Tiny-A"])
    settings, source, entry = gen.default_settings(str(release))
    assert entry == "Tiny-A" and settings.steps == 7 and f"(matched by {release}'s DiT)" in source


def test_a_folder_name_tells_entries_of_one_config_apart(release, twin_entries, tmp_path) -> None:
    assert folder_entry(release) == (None, ["Tiny-A", "Tiny-B"])  # "Wan2.1-T2V-1.3B" names neither
    _, source, _ = gen.default_settings(str(release))
    assert "its DiT fits Tiny-A, Tiny-B, which its name does not tell apart" in source
    assert folder_entry(_named(release, tmp_path, "Tiny-A"))[0] == "Tiny-A"
    assert folder_entry(_named(release, tmp_path, "tiny-b-hf"))[0] == "Tiny-B"  # the Hub id, any case


def test_generate_on_a_matched_folder_logs_the_entry(generated, release, twin_entries, tmp_path) -> None:
    folder = _named(release, tmp_path, "Tiny-B")
    result, request, fps = generated("-m", str(folder))
    assert result.returncode == 0, result.stderr
    assert (request.num_inference_steps, request.height, request.width, request.num_frames, fps) == (9, 32, 48, 9, 12)
    assert settings_line(result).startswith(f"settings from the registry entry Tiny-B (matched by {folder}'s DiT): "
                                            "48x32, 9 frames @ 12 fps, 9 steps, shift 3.0, cfg 4.0, unipc")


# ------------------------------------------------------------------ --step-cache


def test_step_cache_flags_reach_the_request(generated) -> None:
    result, request, _ = generated("--step-cache", "first_block", "--step-cache-option", "threshold=1",
                                   "--step-cache-option", "threshold=0.08")
    assert result.returncode == 0, result.stderr
    assert (request.step_cache, request.step_cache_options) == ("first_block", {"threshold": 0.08})


def test_teacache_by_step_cache_defaults_its_model_id_to_the_model(generated) -> None:
    result, request, _ = generated("-m", "Wan2.1-T2V-1.3B", "--step-cache", "teacache",
                                   "--step-cache-option", "threshold=0.1")
    assert result.returncode == 0, result.stderr
    assert request.step_cache_options == {"threshold": 0.1, "model_id": "Wan2.1-T2V-1.3B"}


def test_the_teacache_flag_still_works(generated) -> None:
    result, request, _ = generated("--teacache", "0.2", "--teacache-model", "Wan2.1-T2V-1.3B")
    assert result.returncode == 0, result.stderr
    assert (request.tea_cache_l1_thresh, request.tea_cache_model_id) == (0.2, "Wan2.1-T2V-1.3B")
    assert request.step_cache is None


@pytest.mark.parametrize("args, fragment", [
    (["--step-cache", "nope"], "step_cache='nope' is not a registered step cache; choose one of"),
    (["--step-cache", "first_block", "--step-cache-option", "size=3"], "['size'] are not options of"),
    (["--step-cache", "first_block", "--step-cache-option", "threshold=nan"], "must be a finite number"),
    (["--step-cache", "magcache", "--step-cache-option", "threshold=0.1"], "needs step_cache_options['ratios']"),
    (["--step-cache", "teacache", "--step-cache-option", "threshold=0.1"], "no TeaCache coefficients for model id"),
    (["--step-cache-option", "threshold=0.1"], "given without step_cache"),
    (["--step-cache", "first_block", "--teacache", "0.1", "--teacache-model", "Wan2.1-T2V-1.3B"], "choose one"),
    (["--step-cache", "first_block", "--sliding-window", "9:4"], "cannot be combined"),
])
def test_step_cache_mistakes_are_one_line_usage_errors(generated, args, fragment) -> None:
    result, request, _ = generated(*args)
    assert result.returncode == 2 and request is None
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--step-cache" in errors[0] and fragment in errors[0], result.stderr


def test_step_cache_options_are_parsed_as_numbers_bools_and_lists() -> None:
    from wan_cli.options import key_values

    assert key_values(["a=1", "b=0.5", "c=1e-2", "d=true", "e=0.9,1,x", "f=name", "g="], "--x") == {
        "a": 1, "b": 0.5, "c": 0.01, "d": True, "e": [0.9, 1, "x"], "f": "name", "g": ""}


# ------------------------------------------------------------------ wan models over both hubs


def test_models_sees_files_under_the_hub_id(wan, tmp_path) -> None:
    fun = "Wan2.1-Fun-1.3B-InP"
    spec = wan_models.MODELS[fun]
    assert spec.hf_id != spec.model_id
    shutil.move(tiny_release.write_release(tmp_path, fun), tmp_path / spec.hf_id)  # as `--source hf` stores it
    result = wan("models", "--local-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.startswith("Wan")}
    assert "+diffusion_pytorch_model*.safetensors" in rows[fun] and "+google/umt5-xxl/" in rows[fun]
    assert "-diffusion_pytorch_model*.safetensors" in rows["Wan2.1-Fun-14B-InP"]  # under neither id


@pytest.fixture
def wan(wan_main):
    """``wan ARGS`` in this process (the shared ``wan_main`` fixture)."""
    return wan_main
