"""What a checkpoint is (Wan 2.1 or 2.2, which expert) and what said so: each misreading the Wan 2.2
issue listed, the evidence order, and the errors for a file of the other family."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import wan_models
from wan_cli.main import app
from wan_models import CheckpointError, DiTConfig, MODELS
from wan_models.clip import CLIPVisionTower
from wan_models.identity import identify
from wan_models.loading import read_checkpoint
from wan_models.vae import VAEConfig, WanVAE
from wan_models.vae22 import VAE22Config, WanVAE22

from factories import TINY_DIT, meta_dit, random_weights
from wan_runtime.tiny_release import TINY_CLIP

T2V = TINY_DIT
TI2V = TINY_DIT.replace(in_dim=48, out_dim=48, family="wan2.2")
I2V_EXPERT = TINY_DIT.replace(in_dim=36, family="wan2.2")
WAN21_I2V = TINY_DIT.replace(in_dim=36, image_input=True, clip_dim=64)


def _save_dit(config: DiTConfig, path: Path, official_json: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(meta_dit(config)), path)
    if official_json is not None:
        (path.parent / "config.json").write_text(json.dumps({"_class_name": "WanModel", **official_json}))
    return path


def _meta_weights(module_class: type, config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        module = module_class(config)
    return random_weights(module)


# ---- the misreadings the issue lists --------------------------------------------------------

def test_ti2v_5b_reads_as_ti2v_with_its_config_json(tmp_path) -> None:
    path = _save_dit(TI2V, tmp_path / "Wan2.2-TI2V-5B" / "diffusion_pytorch_model.safetensors",
                     {"model_type": "ti2v", "num_heads": 2, "in_dim": 48, "out_dim": 48})
    ckpt = read_checkpoint(path)
    assert ckpt.config.variant == "wan2.2-ti2v" and ckpt.config.family == "wan2.2"
    assert ckpt.config.per_token_timesteps and ckpt.config.fuses_image_latents and not ckpt.config.image_input
    assert ckpt.identity.expert is None and "48 latent channels" in ckpt.identity.evidence


def test_i2v_expert_is_a_wan22_expert_not_t2v(tmp_path) -> None:
    path = _save_dit(I2V_EXPERT, tmp_path / "high_noise_model" / "diffusion_pytorch_model.safetensors",
                     {"model_type": "i2v", "num_heads": 2})
    ckpt = read_checkpoint(path)
    assert ckpt.config.variant == "wan2.2-i2v" and ckpt.config.y_channels == 20
    assert not ckpt.config.per_token_timesteps and not ckpt.config.image_input
    assert (ckpt.identity.family, ckpt.identity.expert) == ("wan2.2", "high")
    assert "36 input channels without CLIP" in ckpt.identity.evidence and "high_noise_model/" in ckpt.identity.evidence


@pytest.mark.parametrize("folder, expert", [("high_noise_model", "high"), ("low_noise_model", "low")])
def test_t2v_expert_is_told_by_its_folder(tmp_path, folder: str, expert: str) -> None:
    path = _save_dit(T2V, tmp_path / "Wan2.2-T2V-A14B" / folder / "diffusion_pytorch_model.safetensors",
                     {"model_type": "t2v", "num_heads": 2})
    ckpt = read_checkpoint(path)
    assert ckpt.config.family == "wan2.2" and ckpt.config.variant == "wan2.2-t2v"
    assert ckpt.identity.expert == expert and not ckpt.identity.guessed
    assert ckpt.identity.describe() == f"wan2.2, {expert}-noise expert, from folder {folder}/"


def test_t2v_shapes_alone_are_a_logged_guess(tmp_path, caplog) -> None:
    path = _save_dit(T2V, tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="wan_models.identity"):
        ckpt = read_checkpoint(path)
    assert ckpt.config.family == "wan2.1" and ckpt.identity.guessed
    assert "GUESSED" in ckpt.identity.describe()
    assert any("model.safetensors: nothing tells" in r.getMessage() and "family='wan2.2'" in r.getMessage()
               for r in caplog.records)
    # The caller's expectation decides where nothing else does.
    asked = read_checkpoint(path, family="wan2.2")
    assert asked.config.variant == "wan2.2-t2v" and asked.identity.evidence == "the family asked for"
    assert not asked.identity.guessed


@pytest.mark.parametrize("name, family, expert", [
    ("wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2", "high"),
    ("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "wan2.2", "low"),
    ("wan2.1_t2v_14B_bf16.safetensors", "wan2.1", None),
    ("Wan2_2-T2V-A14B-HIGH.safetensors", "wan2.2", None),
])
def test_file_names_decide_family_and_expert(tmp_path, name: str, family: str, expert: str | None) -> None:
    ckpt = read_checkpoint(_save_dit(T2V, tmp_path / name))
    assert (ckpt.identity.family, ckpt.identity.expert) == (family, expert)
    assert ckpt.identity.evidence == f"file name {name}"


def test_registry_shapes_that_only_wan21_has_decide(tmp_path) -> None:
    """The 1.3B size exists only as Wan 2.1; the 14B T2V size is both Wan2.1-T2V-14B and a 2.2 expert."""
    small = identify([tmp_path / "x.safetensors"], MODELS["Wan2.1-T2V-1.3B"].config)
    assert (small.family, small.guessed) == ("wan2.1", False) and "Wan2.1-T2V-1.3B" in small.evidence
    big = identify([tmp_path / "x.safetensors"], MODELS["Wan2.1-T2V-14B"].config)
    assert big.guessed
    assert identify([tmp_path / "high_noise_model" / "x.safetensors"], MODELS["Wan2.1-T2V-14B"].config).expert == "high"


def test_diffusers_pipeline_folders_name_the_experts(tmp_path) -> None:
    from wan_models.formats import diffusers as diffusers_format

    sd = wan_models.convert(random_weights(meta_dit(T2V)), to="diffusers")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    for folder, expert in (("transformer", "high"), ("transformer_2", "low")):
        (tmp_path / folder).mkdir()
        save_file(sd, tmp_path / folder / "diffusion_pytorch_model.safetensors")
        (tmp_path / folder / "config.json").write_text(json.dumps(diffusers_format.transformer_config(T2V)))
        ckpt = read_checkpoint(tmp_path / folder)
        assert (ckpt.format, ckpt.identity.family, ckpt.identity.expert) == ("diffusers", "wan2.2", expert)
        assert "model_index.json" in ckpt.identity.evidence


# ---- the other family where one is expected ---------------------------------------------------

def test_a_wan22_dit_where_wan21_is_expected_is_refused(tmp_path) -> None:
    path = _save_dit(TI2V, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors is a Wan 2\.2 DiT \(from its "
                                              r"shapes \(48 latent channels\)\), but a Wan 2\.1 DiT was expected"):
        wan_models.load_model(path, family="wan2.1")
    expert = _save_dit(T2V, tmp_path / "low_noise_model" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"low_noise_model.*is a Wan 2\.2 DiT \(from folder low_noise_model/\)"):
        wan_models.load_model(expert, family="wan2.1")


def test_a_wan21_dit_where_wan22_is_expected_is_refused(tmp_path) -> None:
    path = _save_dit(WAN21_I2V, tmp_path / "i2v.safetensors")
    with pytest.raises(CheckpointError, match=r"i2v\.safetensors is a Wan 2\.1 DiT \(from its shapes \(CLIP branch: "
                                              r"Wan 2\.1 only\)\), but a Wan 2\.2 DiT was expected"):
        wan_models.load_model(path, family="wan2.2")


def test_vae_and_clip_of_the_other_family_are_refused(tmp_path) -> None:
    vae22 = tmp_path / "Wan2.2_VAE.pth"
    torch.save(_meta_weights(WanVAE22, VAE22Config(dim=4, dec_dim=5)), vae22)
    with pytest.raises(CheckpointError, match=r"Wan2\.2_VAE\.pth holds the Wan 2\.2 VAE .*which no Wan 2\.1 model uses"):
        wan_models.load_model(vae22, family="wan2.1")
    clip = tmp_path / "clip.pth"
    torch.save({f"visual.{k}": v for k, v in _meta_weights(CLIPVisionTower, TINY_CLIP).items()}, clip)
    with pytest.raises(CheckpointError, match=r"clip\.pth holds the CLIP image encoder, which no Wan 2\.2 model uses"):
        wan_models.load_model(clip, family="wan2.2")
    # The A14B models decode with the Wan 2.1 VAE.
    vae21 = tmp_path / "Wan2.1_VAE.pth"
    torch.save(_meta_weights(WanVAE, VAEConfig(dim=4)), vae21)
    assert isinstance(wan_models.load_model(vae21, family="wan2.2"), WanVAE)
    with pytest.raises(ValueError, match="unknown family 'wan3'"):
        wan_models.load_model(vae21, family="wan3")


def test_unsupported_wan22_model_type_is_named(tmp_path) -> None:
    path = _save_dit(T2V, tmp_path / "s2v" / "diffusion_pytorch_model.safetensors", {"model_type": "s2v"})
    with pytest.raises(CheckpointError, match=r"config\.json: model_type s2v \(Wan2\.2-S2V-14B\) is not supported"):
        read_checkpoint(path)


# ---- DiffSynth's flags ------------------------------------------------------------------------

DIFFSYNTH_5B = dict(has_image_input=False, patch_size=[1, 2, 2], in_dim=48, dim=32, ffn_dim=48, freq_dim=16,
                    text_dim=24, out_dim=48, num_heads=2, num_layers=2, eps=1e-6, seperated_timestep=True,
                    require_clip_embedding=False, require_vae_embedding=False, fuse_vae_embedding_in_latents=True)


def test_diffsynth_flags_declare_the_wan22_models() -> None:
    ti2v = DiTConfig.from_diffsynth(DIFFSYNTH_5B)
    assert ti2v.variant == "wan2.2-ti2v" and ti2v.per_token_timesteps
    flags = ("seperated_timestep", "fuse_vae_embedding_in_latents", "require_vae_embedding")
    i2v_kwargs = {**{k: v for k, v in DIFFSYNTH_5B.items() if k not in flags}, "in_dim": 36, "out_dim": 16}
    assert DiTConfig.from_diffsynth(i2v_kwargs).variant == "wan2.2-i2v"
    t2v_kwargs = {**i2v_kwargs, "in_dim": 16}
    assert DiTConfig.from_diffsynth(t2v_kwargs).variant == "t2v"  # DiffSynth's T2V-A14B kwargs are 2.1's
    assert DiTConfig.from_diffsynth(t2v_kwargs, family="wan2.2").variant == "wan2.2-t2v"
    with pytest.raises(ValueError, match="seperated_timestep without its partner"):
        DiTConfig.from_diffsynth({**DIFFSYNTH_5B, "fuse_vae_embedding_in_latents": False})
    with pytest.raises(ValueError, match="describe a wan2.2 DiT, not wan2.1"):
        DiTConfig.from_diffsynth(DIFFSYNTH_5B, family="wan2.1")


# ---- the registry and the CLI -----------------------------------------------------------------

def test_registry_holds_the_three_wan22_models() -> None:
    ti2v, t2v, i2v = (MODELS[n] for n in ("Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"))
    assert ti2v.config.variant == "wan2.2-ti2v" and ti2v.vae_file == "Wan2.2_VAE.pth" and not ti2v.experts
    assert (ti2v.sampling.frames, ti2v.sampling.fps, ti2v.sampling.steps, ti2v.sampling.guidance) == (121, 24, 50, 5.0)
    for spec in (t2v, i2v):
        assert spec.experts == ("high_noise_model/", "low_noise_model/") and spec.vae_file == "Wan2.1_VAE.pth"
        assert "high_noise_model/diffusion_pytorch_model*.safetensors" in spec.files
        assert not spec.needs_image_encoder
    assert (t2v.sampling.boundary, t2v.sampling.shift, t2v.sampling.guidance) == (0.875, 12.0, (3.0, 4.0))
    assert (i2v.sampling.boundary, i2v.sampling.shift, i2v.sampling.guidance) == (0.9, 5.0, (3.5, 3.5))
    assert i2v.config.y_channels == 20 and t2v.config == MODELS["Wan2.1-T2V-14B"].config.replace(family="wan2.2")


def test_wan_info_and_models_show_the_identity(tmp_path) -> None:
    from wan_runtime import tiny_release

    folder = tiny_release.write_release(tmp_path, "Wan2.2-I2V-A14B")
    result = CliRunner().invoke(app, ["info", str(folder / "low_noise_model")])
    assert result.exit_code == 0, result.output
    assert "network:  dit (wan2.2-i2v)" in result.output
    assert "family:   wan2.2, low-noise expert, from its shapes" in result.output
    guessed = CliRunner().invoke(app, ["info", str(_save_dit(T2V, tmp_path / "plain" / "model.safetensors"))])
    assert "family:   wan2.1, GUESSED" in guessed.output
    listing = CliRunner().invoke(app, ["models", "--local-dir", str(tmp_path)])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[0]: line for line in listing.output.splitlines() if line.startswith("Wan2.2")}
    assert set(rows) == {"Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"}
    assert "5.00B" in rows["Wan2.2-TI2V-5B"] and "14.29B x2" in rows["Wan2.2-T2V-A14B"]
    assert "+low_noise_model/diffusion_pytorch_model*.safetensors" in rows["Wan2.2-I2V-A14B"]


def test_every_registry_dit_declares_its_conditioning() -> None:
    """One declaration (DiTConfig.conditioning) answers what y carries; required_inputs maps it to the
    request inputs the pipeline and training ask for."""
    from wan_runtime.units import required_inputs

    expected = {
        "Wan2.1-T2V-14B": ("none", ()), "Wan2.1-I2V-14B-480P": ("image", ("input_image",)),
        "Wan2.1-FLF2V-14B-720P": ("image", ("input_image", "end_image")),
        "Wan2.1-Fun-1.3B-InP": ("image", ("input_image",)),
        "Wan2.1-Fun-14B-Control": ("control", ("control_video",)),
        "Wan2.1-Fun-V1.1-1.3B-Control-Camera": ("camera", ("input_image", "camera_control_direction")),
        "Wan2.1-VACE-14B": ("none", ()), "Wan2.2-TI2V-5B": ("none", ()), "Wan2.2-T2V-A14B": ("none", ()),
        "Wan2.2-I2V-A14B": ("image", ("input_image",)),
    }
    for name, (kind, inputs) in expected.items():
        config = MODELS[name].config
        assert (config.conditioning, required_inputs(config)) == (kind, inputs), name
    with pytest.raises(ValueError, match="takes 3 conditioning channels, which no known input provides"):
        required_inputs(T2V.replace(in_dim=19))
