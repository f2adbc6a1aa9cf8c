"""``wan generate --lora PATH[:ALPHA][@high|@low]`` and ``--preset``: per-expert LoRAs land on the right DiT of a
Wan 2.2 pair (weights compared with a merge written by hand), bad values are usage errors naming the value,
and the few-step presets run on tiny releases with LoRA files in the LightX2V key layout, one DiT call per
step, their LoRAs fetched from a (local, fake) Hugging Face Hub when no --lora is given."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_files import lightx2v_lora, merged_by_hand
from wan_models.configs import DIT_FILES, EXPERT_FOLDERS
from wan_runtime import WanVideoPipeline, pipeline as pipeline_module, tiny_release
from wan_runtime.presets import PRESETS

SMALL = ["--height", "32", "--width", "32", "--frames", "5", "--device", "cpu", "--dtype", "float32", "-q",
         "-p", "a red cat", "--seed", "1"]
PAIR = "Wan2.2-T2V-A14B"
SINGLE = "Wan2.1-T2V-14B"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("Wan2.1-T2V-1.3B", SINGLE, PAIR):  # the 1.3B release is the home of the shared T5 and VAE
        tiny_release.write_release(root, name)
    return root


def dit_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob(DIT_FILES)) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def lora_files(models_root: Path, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Two LoRAs for the tiny 14B-shaped DiTs (every tiny release has the same shapes), LightX2V layout."""
    folder = tmp_path_factory.mktemp("loras")
    shapes = {k: v.shape for k, v in dit_weights(models_root / "Wan-AI" / PAIR / EXPERT_FOLDERS[0]).items()}
    return {name: (folder / f"{name}.safetensors", lightx2v_lora(folder / f"{name}.safetensors", shapes, seed))
            for seed, name in enumerate(("high", "low"))}


@pytest.fixture
def spy(monkeypatch):
    """Records the loaded pipeline, each request and every DiT call (which DiT, per step)."""
    seen = {"pipes": [], "requests": [], "calls": []}
    load = WanVideoPipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen["pipes"].append(load(cls, *args, **kwargs))
        return seen["pipes"][-1]

    prepare = WanVideoPipeline.prepare

    def recording_prepare(self, request):
        seen["requests"].append(request)
        return prepare(self, request)

    predict = pipeline_module.predict

    def counting_predict(dit, *args, **kwargs):
        seen["calls"].append(dit)
        return predict(dit, *args, **kwargs)

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(WanVideoPipeline, "prepare", recording_prepare)
    monkeypatch.setattr(pipeline_module, "predict", counting_predict)
    return seen


def assert_weights(dit: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = dit.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name].float(), value, rtol=1e-5, atol=1e-5, msg=name)


def test_expert_suffixes_merge_into_their_expert(wan_main, models_root, lora_files, spy, tmp_path) -> None:
    (high_path, high), (low_path, low) = lora_files["high"], lora_files["low"]
    result = wan_main("generate", "-m", PAIR, "--models-dir", str(models_root), *SMALL, "--steps", "2",
                      "--lora", f"{high_path}:0.7@high", "--lora", f"{low_path}@low", "--lora", f"{high_path}:0.25",
                      "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 0, result.stderr
    pipe = spy["pipes"][-1]
    release = models_root / "Wan-AI" / PAIR
    # high-noise expert: 0.7 of the first file, then 0.25 of it again (no suffix: both experts)
    expected_high = merged_by_hand(dit_weights(release / EXPERT_FOLDERS[0]), high, 0.7 + 0.25)
    expected_low = merged_by_hand(merged_by_hand(dit_weights(release / EXPERT_FOLDERS[1]), low, 1.0), high, 0.25)
    assert_weights(pipe.dit, expected_high)
    assert_weights(pipe.dit2, expected_low)


def test_a_path_holding_at_and_colon_signs(wan_main, models_root, lora_files, spy, tmp_path) -> None:
    odd = tmp_path / "v1@low:x" / "lora@high.safetensors"
    odd.parent.mkdir()
    odd.write_bytes(lora_files["low"][0].read_bytes())
    result = wan_main("generate", "-m", PAIR, "--models-dir", str(models_root), *SMALL, "--steps", "1",
                      "--lora", f"{odd}:0.5@low", "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 0, result.stderr
    pipe = spy["pipes"][-1]
    release = models_root / "Wan-AI" / PAIR
    assert_weights(pipe.dit2, merged_by_hand(dit_weights(release / EXPERT_FOLDERS[1]), lora_files["low"][1], 0.5))
    assert_weights(pipe.dit, merged_by_hand(dit_weights(release / EXPERT_FOLDERS[0]), {}, 0.0))


@pytest.mark.parametrize("suffix, message", [
    ("@mid", "'@mid' names no expert; expected PATH[:ALPHA][@high|@low]"),
    (":abc@high", "the strength 'abc' is not a number"),
    (":nan", "the strength nan is not a finite number"),
])
def test_bad_lora_values_are_usage_errors(wan_main, models_root, lora_files, spy, tmp_path, suffix, message) -> None:
    value = f"{lora_files['high'][0]}{suffix}"
    result = wan_main("generate", "-m", PAIR, "--models-dir", str(models_root), *SMALL, "--lora", value,
                      "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and message in result.stderr and "--lora" in result.stderr
    assert spy["pipes"] == []  # refused before any model loads


def test_missing_file_and_suffix_on_one_dit_are_refused_before_loading(wan_main, models_root, lora_files, spy,
                                                                       tmp_path) -> None:
    missing = tmp_path / "absent.safetensors"
    result = wan_main("generate", "-m", PAIR, "--models-dir", str(models_root), *SMALL, "--lora",
                      f"{missing}:0.5@low", "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and f"no LoRA file in '{missing}:0.5@low'" in result.stderr
    value = f"{lora_files['high'][0]}@high"
    result = wan_main("generate", "-m", SINGLE, "--models-dir", str(models_root), *SMALL, "--lora", value,
                      "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and repr(value) in result.stderr and "not a Wan 2.2 expert pair" in result.stderr
    # a tiny folder matches no registry entry (its config is no released one): found out once loaded, before any step
    folder = models_root / "Wan-AI" / "Wan2.1-T2V-1.3B"
    result = wan_main("generate", "-m", str(folder), *SMALL, "--lora", value, "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and "not a Wan 2.2 expert pair" in result.stderr, result.stderr
    assert spy["requests"] == []


@pytest.mark.parametrize("model", [PAIR, SINGLE])
def test_the_lightning_preset_with_explicit_loras(wan_main, models_root, lora_files, spy, tmp_path, model) -> None:
    high_path, low_path = lora_files["high"][0], lora_files["low"][0]
    loras = ["--lora", f"{high_path}@high", "--lora", f"{low_path}@low"] if model == PAIR else ["--lora", str(high_path)]
    result = wan_main("generate", "-m", model, "--models-dir", str(models_root), *SMALL, "--preset", "lightning",
                      *loras, "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 0, result.stderr
    request = spy["requests"][-1]
    assert (request.num_inference_steps, request.sigma_shift, request.cfg_scale, request.sampler) == (4, 5.0, 1.0,
                                                                                                     "euler")
    assert request.denoising_step_list == (1000.0, 750.0, 500.0, 250.0)
    pipe = spy["pipes"][-1]
    if model == PAIR:
        assert request.cfg_scale_2 == 1.0 and request.switch_DiT_boundary == 0.875
        # guidance 1: one DiT call per step, two steps on each expert (t = 1000, 937.5 >= 875)
        assert spy["calls"] == [pipe.dit, pipe.dit, pipe.dit2, pipe.dit2]
    else:
        assert spy["calls"] == [pipe.dit] * 4
    assert "with the preset lightning" in result.stderr and "wrote" in result.stdout


def test_flags_win_over_the_preset(wan_main, models_root, lora_files, spy, tmp_path) -> None:
    result = wan_main("generate", "-m", PAIR, "--models-dir", str(models_root), *SMALL, "--preset", "lightning",
                      "--steps", "3", "--cfg-scale-2", "2", "--lora", str(lora_files["low"][0]),
                      "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 0, result.stderr
    request = spy["requests"][-1]
    assert (request.num_inference_steps, request.cfg_scale, request.cfg_scale_2) == (3, 1.0, 2.0)
    assert request.denoising_step_list is None and "timesteps [1000.0, 750.0, 500.0, 250.0] are not used" in result.stderr


@pytest.mark.parametrize("model, message", [
    ("Wan2.2-TI2V-5B", "Wan2.2-TI2V-5B has no few-step preset; the preset 'lightning' exists for"),
    (PAIR, f"{PAIR} has no preset 'turbo'; its presets: lightning, lightning-250928, lightx2v"),
])
def test_unknown_presets_list_the_choices(wan_main, models_root, spy, tmp_path, model, message) -> None:
    preset = "turbo" if model == PAIR else "lightning"
    result = wan_main("generate", "-m", model, "--models-dir", str(models_root), *SMALL, "--preset", preset,
                      "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and message in result.stderr and "--preset" in result.stderr
    assert spy["pipes"] == []


def test_the_preset_fetches_its_loras_from_the_hub(wan_main, models_root, lora_files, spy, tmp_path, monkeypatch) -> None:
    """No --lora: the preset's files come through the download code, from a local fake Hub."""
    import huggingface_hub.constants
    from runtime.test_hf_download import PROXY_VARIABLES, FakeHub

    preset = PRESETS[PAIR]["lightning"]
    repo = tmp_path / "hub-repo"
    for lora, name in zip(preset.loras, ("high", "low")):
        (repo / lora.filename).parent.mkdir(parents=True, exist_ok=True)
        (repo / lora.filename).write_bytes(lora_files[name][0].read_bytes())
    for name in PROXY_VARIABLES + ("HF_HUB_OFFLINE",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    server = FakeHub({preset.loras[0].repo: repo})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        result = wan_main("generate", "-m", PAIR, "--models-dir", str(models_root), *SMALL, "--preset", "lightning",
                          "-o", str(tmp_path / "out.mp4"))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    fetched = models_root / preset.loras[0].repo
    assert sorted(server.downloads) == sorted(f"{lora.repo}/{lora.filename}" for lora in preset.loras)
    assert f"{fetched / preset.loras[0].filename} at 1 on the high-noise expert" in result.stderr
    release = models_root / "Wan-AI" / PAIR
    pipe = spy["pipes"][-1]
    assert_weights(pipe.dit, merged_by_hand(dit_weights(release / EXPERT_FOLDERS[0]), lora_files["high"][1], 1.0))
    assert_weights(pipe.dit2, merged_by_hand(dit_weights(release / EXPERT_FOLDERS[1]), lora_files["low"][1], 1.0))
