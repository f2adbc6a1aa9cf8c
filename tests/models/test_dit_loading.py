"""DiT registry, detection from keys and shapes, and the loader's memory-safe, strict behaviour."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import wan_models
from wan_models import DiTConfig, MotionController, MotionControllerConfig, WanDiT
from wan_models.loading import CheckpointError

from factories import TINY_DIT as TINY, dit_inputs as inputs, meta_dit as build, random_weights


@pytest.mark.parametrize("name", list(wan_models.MODELS))
def test_detect_config_recovers_every_released_model(name: str) -> None:
    spec = wan_models.MODELS[name]
    with torch.device("meta"):
        module = WanDiT(spec.config) if isinstance(spec.config, DiTConfig) else MotionController(spec.config)
    expected = spec.config
    if name == "Wan2.2-T2V-A14B":  # its shapes are Wan2.1-T2V-14B's: the folder decides (test_identity.py)
        expected = wan_models.MODELS["Wan2.1-T2V-14B"].config
    assert wan_models.detect_config(module.state_dict()) == expected


def test_real_sizes_match_the_release() -> None:
    counts = {name: sum(p.numel() for p in build(spec.config).parameters())
              for name, spec in wan_models.MODELS.items() if isinstance(spec.config, DiTConfig)}
    assert round(counts["Wan2.1-T2V-1.3B"] / 1e9, 2) == 1.42
    assert round(counts["Wan2.1-T2V-14B"] / 1e9, 1) == 14.3
    assert counts["Wan2.1-I2V-14B-480P"] > counts["Wan2.1-T2V-14B"]
    assert round(counts["Wan2.2-TI2V-5B"] / 1e9, 2) == 5.0
    assert counts["Wan2.2-T2V-A14B"] == counts["Wan2.1-T2V-14B"] < counts["Wan2.2-I2V-A14B"] < counts["Wan2.1-I2V-14B-480P"]


def test_unknown_model_name_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="Wan2.1-T2V-1.3B"):
        wan_models.get_model_spec("Wan2.1-T2V-2B")


def test_load_model_round_trip_and_dtype(tmp_path) -> None:
    sd = random_weights(build(TINY))
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    model = wan_models.load_model(tmp_path / "diffusion_pytorch_model.safetensors")
    assert isinstance(model, WanDiT) and model.config.variant == "t2v"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    x, t, ctx = inputs(TINY)
    with torch.no_grad():
        ref = model(x, t, ctx)
        half = wan_models.load_model(tmp_path / "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in half.parameters())
        low = half(x, t, ctx)
    assert low.dtype == torch.float32 and ref.shape == (1, 16, 3, 4, 6)
    # bf16 weights keep the float32 residual stream: a few percent of the output scale at most.
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_shards_and_config_json(tmp_path) -> None:
    config = TINY.replace(num_heads=4)  # head dim 8: only config.json can tell
    sd = random_weights(build(config))
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[1::2]}, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": 4, "text_len": 8}))
    model = wan_models.load_model(tmp_path)
    assert model.config == config
    with pytest.raises(CheckpointError, match="also present in another shard"):
        wan_models.load_model([tmp_path / p.name for p in sorted(tmp_path.glob("*.safetensors"))] * 2)


def test_strict_errors_name_keys_and_shapes(tmp_path) -> None:
    model = build(TINY)
    sd = random_weights(model)
    sd.pop("blocks.1.ffn.2.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    sd["head.modulation"] = torch.zeros(1, 2, 31)
    with pytest.raises(CheckpointError) as err:
        wan_models.loading.load_into(model, sd, source="x.safetensors")
    msg = str(err.value)
    assert "x.safetensors" in msg and "blocks.1.ffn.2.bias" in msg and "blocks.0.extra.weight" in msg
    assert "head.modulation: file (1, 2, 31) vs model (1, 2, 32)" in msg


def test_unknown_network_and_corrupt_files(tmp_path) -> None:
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="match no Wan 2.1 network.*foo.weight"):
        wan_models.load_model(tmp_path / "other.safetensors")
    good = tmp_path / "good.safetensors"
    save_file(random_weights(build(TINY)), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated.safetensors: truncated: 157,988 of the 158,088 bytes"):
        wan_models.load_model(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        wan_models.load_model(tmp_path / "missing.safetensors")


class Payload:
    """A pickled object that would run code on load."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="evil.pth: refused to unpickle"):
        wan_models.load_model(path)


def test_pth_loads_mmap(tmp_path) -> None:
    controller = MotionController(MotionControllerConfig(freq_dim=8, dim=4))
    torch.save(controller.state_dict(), tmp_path / "mc.pth")
    loaded = wan_models.load_model(tmp_path / "mc.pth")
    ids = torch.tensor([1.0, 50.0])
    torch.testing.assert_close(loaded(ids), controller(ids), rtol=0, atol=0)


def test_import_pulls_in_nothing_else() -> None:
    code = ("import sys, wan_models; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'diffusers', 'wan_kernels', 'wan_runtime', 'wan_train', 'wan_cli')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrong_network_for_the_request(tmp_path) -> None:
    save_file(random_weights(build(TINY)), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match=r"dit.safetensors holds a DiT, not the Wan 2.1 VAE \(16 latent channels, Wan2.1_VAE.pth\) as asked for"):
        wan_models.load_model(tmp_path / "dit.safetensors", network="vae")
    assert isinstance(wan_models.load_model(tmp_path / "dit.safetensors", network="dit"), WanDiT)
