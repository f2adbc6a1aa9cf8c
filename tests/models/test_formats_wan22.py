"""Wan 2.2 in diffusers' layouts, proven against diffusers itself: the 48-channel VAE
(``AutoencoderKLWan(is_residual=True)``), the Wan 2.2 DiTs (TI2V-5B with per-token timesteps, the
I2V-A14B expert without CLIP, the T2V expert) and whole pipeline folders.

Tiny random diffusers models are converted and loaded strictly into our networks (and ours into
theirs), and both compute the same outputs. The pipeline folders are made by diffusers' own
``WanPipeline.save_pretrained`` (tiny umT5 encoder, a word-level tokenizer and a scheduler built
offline), and ours are loaded back by ``WanPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wan_models
from wan_models import DiTConfig, WanDiT, formats
from wan_models.errors import CheckpointError
from wan_models.formats import diffusers as diffusers_format
from wan_models.formats.diffusers_pipeline import PipelineFolder, read_pipeline, write_pipeline
from wan_models.vae import VAEConfig, WanVAE
from wan_models.vae22 import VAE22Config, WanVAE22

from factories import TINY_DIT, random_weights, randomize

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Outputs agree within this fraction of the largest output value (float32 on both sides).
REL_TOL = 1e-4

TINY22 = TINY_DIT.replace(text_len=512, family="wan2.2")
DITS = {
    "ti2v": TINY22.replace(in_dim=48, out_dim=48),
    "i2v-expert": TINY22.replace(in_dim=36),
    "t2v-expert": TINY22,
}
# The released stage layout (4 stages, 2 temporal downsamples) at tiny widths; z_dim stays 48.
TINY_VAE22 = VAE22Config(dim=8, dec_dim=12, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def assert_close_rel(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    error = (ours - theirs).abs().max().item()
    assert error <= REL_TOL * theirs.abs().max().item(), f"max |difference| {error}"


def build(module_class: type, config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    with torch.device("meta"):
        model = module_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

# ---- VAE ------------------------------------------------------------------------------------


def diffusers_vae22(config: VAE22Config = TINY_VAE22, seed: int = 0) -> torch.nn.Module:
    return randomize(diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(config)), seed, scale=0.1)


def assert_same_vae22(ours: WanVAE22, theirs: torch.nn.Module) -> None:
    """Our normalised encode against diffusers' raw mean normalised by its config's statistics, and
    our decode of those latents against diffusers' decode of the raw ones; sizes from the configs."""
    cfg = theirs.config
    spatial, temporal = cfg.scale_factor_spatial, cfg.scale_factor_temporal
    assert spatial == ours.config.spatial_factor
    video = torch.rand(1, 3, 1 + temporal, 2 * spatial, 3 * spatial, generator=torch.Generator().manual_seed(7)) * 2 - 1
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = ours.encode(video)
        their_mu = theirs.encode(video).latent_dist.mean
        frames = ours.decode(z)
        their_frames = theirs.decode(z * std + mean).sample
    assert z.shape == (1, cfg.z_dim, 2, 2, 3)
    assert_close_rel(z, (their_mu - mean) / std)
    assert_close_rel(frames, their_frames)
    assert frames.shape == video.shape
    assert (frames.abs() < 1).float().mean() > 0.5  # not a comparison of clamped values


@pytest.mark.parametrize("num_res_blocks", [1, 2])  # 2 is the release; 1 moves every index
def test_vae22_both_directions(num_res_blocks: int) -> None:
    config = VAE22Config(dim=8, dec_dim=12, dim_mult=(1, 2, 2, 2), num_res_blocks=num_res_blocks)
    theirs = diffusers_vae22(config)
    state = theirs.state_dict()
    assert formats.detect_format(state) == "diffusers"
    official = formats.convert(state, to="official")
    assert {id(v) for v in official.values()} == {id(v) for v in state.values()}  # renamed, not copied
    assert wan_models.detect_network(official).name == "vae22"
    ours = build(WanVAE22, config, official)
    assert_same_vae22(ours, theirs)

    mine = build(WanVAE22, config, random_weights(WanVAE22(config), seed=4, scale=0.1))
    fresh = diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(config)).eval()
    fresh.load_state_dict(formats.convert(mine.state_dict(), to="diffusers"), strict=True)
    assert_same_vae22(mine, fresh)


def test_released_vae22_keys_are_diffusers_keys() -> None:
    """At the released size, our diffusers names are exactly those of diffusers' own module."""
    with torch.device("meta"):
        official = WanVAE22().state_dict()
        theirs = diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(VAE22Config()))
    converted = formats.convert(official, to="diffusers")
    assert converted.keys() == theirs.state_dict().keys()
    assert all(converted[k].shape == v.shape for k, v in theirs.state_dict().items())
    config = theirs.config
    assert (config.is_residual, config.patch_size, config.in_channels, config.decoder_base_dim,
            config.scale_factor_spatial) == (True, 2, 12, 256, 16)


def test_load_diffusers_vae22_folder(tmp_path: Path) -> None:
    """The latent statistics (not the released ones here) come from the folder's config.json."""
    gen = torch.Generator().manual_seed(2)
    config = VAE22Config(dim=8, dec_dim=12, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                         latents_mean=tuple((torch.randn(48, generator=gen) * 0.1).tolist()),
                         latents_std=tuple((torch.rand(48, generator=gen) + 0.5).tolist()))
    theirs = diffusers_vae22(config, seed=3)
    theirs.save_pretrained(tmp_path / "vae")
    ours = wan_models.load_model(tmp_path / "vae")
    assert isinstance(ours, WanVAE22) and ours.config == config
    assert_same_vae22(ours, theirs)


def test_vae_config_of_the_other_vae_is_an_error(tmp_path: Path) -> None:
    """A Wan 2.1 VAE beside an is_residual config.json, and a Wan 2.2 VAE beside a Wan 2.1 one."""
    v21 = diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(VAEConfig(dim=8)))
    v21.save_pretrained(tmp_path / "v21")
    v22_json = diffusers_format.vae_config(TINY_VAE22)
    (tmp_path / "v21" / "config.json").write_text(json.dumps(v22_json))
    with pytest.raises(CheckpointError, match=r"v21/config\.json: .*is_residual.*Wan 2\.2 VAE.*Wan 2\.1"):
        wan_models.load_model(tmp_path / "v21")

    diffusers_vae22().save_pretrained(tmp_path / "v22")
    v21_json = diffusers_format.vae_config(VAEConfig(dim=8, z_dim=48, latents_mean=(0.0,) * 48,
                                                     latents_std=(1.0,) * 48))
    (tmp_path / "v22" / "config.json").write_text(json.dumps(v21_json))
    with pytest.raises(CheckpointError, match=r"v22/config\.json: \"is_residual\" is false.*Wan 2\.1 VAE"):
        wan_models.load_model(tmp_path / "v22")
    (tmp_path / "v22" / "config.json").write_text(json.dumps({**v22_json, "patch_size": None}))
    with pytest.raises(CheckpointError, match=r"v22/config\.json: .*'patch_size': None"):
        wan_models.load_model(tmp_path / "v22")

# ---- DiT ------------------------------------------------------------------------------------


def diffusers_dit(config: DiTConfig) -> torch.nn.Module:
    return diffusers.WanTransformer3DModel.from_config(diffusers_format.transformer_config(config)).eval()


def dit_case(config: DiTConfig, seed: int = 1) -> tuple[dict, dict]:
    """Our forward kwargs and diffusers' for the same inputs; TI2V gets one timestep per token."""
    gen = torch.Generator().manual_seed(seed)
    grid = (3, 4, 6)
    x = torch.randn(1, config.in_dim, *grid, generator=gen)
    ctx = torch.randn(1, 8, config.text_dim, generator=gen)
    if config.out_dim == 48:
        tokens = grid[0] * grid[1] * grid[2] // 4
        t = torch.rand(1, tokens, generator=gen) * 1000
        t[:, : tokens // 3] = 0.0  # the conditioning frame's tokens, as TI2V's image-to-video sets them
    else:
        t = torch.rand(1, generator=gen) * 1000
    ours = dict(x=x, timestep=t, context=ctx)
    if config.in_dim == 36:
        ours.update(x=x[:, :16], y=x[:, 16:])
    return ours, dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx)


def assert_same_dit(ours: WanDiT, theirs: torch.nn.Module, config: DiTConfig) -> None:
    kwargs, their_kwargs = dit_case(config)
    with torch.no_grad():
        assert_close_rel(ours(**kwargs), theirs(**their_kwargs).sample)


@pytest.mark.parametrize("variant", list(DITS))
def test_wan22_dit_both_directions(variant: str) -> None:
    config = DITS[variant]
    assert diffusers_format.transformer_config(config)["image_dim"] is None
    theirs = randomize(diffusers_dit(config))
    official = formats.convert(theirs.state_dict(), to="official")
    assert_same_dit(build(WanDiT, config, official), theirs, config)
    mine = build(WanDiT, config, random_weights(WanDiT(config), seed=3))
    fresh = diffusers_dit(config)
    fresh.load_state_dict(formats.convert(mine.state_dict(), to="diffusers"), strict=True)
    assert_same_dit(mine, fresh, config)


@pytest.mark.parametrize("variant", list(DITS))
def test_load_diffusers_wan22_transformer_folder(tmp_path: Path, variant: str) -> None:
    """A TI2V or I2V-expert folder reads as family wan2.2; a T2V expert has Wan2.1-T2V's shapes
    and config fields, so it reads as wan2.1 (the same network)."""
    config = DITS[variant]
    theirs = randomize(diffusers_dit(config), seed=5)
    theirs.save_pretrained(tmp_path / "transformer")
    ours = wan_models.load_model(tmp_path / "transformer")
    expected = config.replace(family="wan2.1") if variant == "t2v-expert" else config
    assert ours.config == expected
    assert_same_dit(ours, theirs, config)


@pytest.mark.parametrize("name", ["Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"])
def test_released_wan22_dit_keys_are_diffusers_keys(name: str) -> None:
    config = wan_models.MODELS[name].config
    with torch.device("meta"):
        official = WanDiT(config).state_dict()
        theirs = diffusers_dit(config).state_dict()
    converted = formats.convert(official, to="diffusers")
    assert converted.keys() == theirs.keys()
    assert all(converted[k].shape == v.shape for k, v in theirs.items())

# ---- pipeline folders -----------------------------------------------------------------------


def text_parts() -> dict:
    """A tiny umT5 encoder, a word-level tokenizer and a scheduler: what WanPipeline needs besides ours."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TINY22.text_dim, d_kv=4, d_ff=16,
                                          num_layers=1, num_heads=2, relative_attention_num_buckets=4))
    return dict(tokenizer=tokenizer, text_encoder=encoder.eval(), scheduler=diffusers.UniPCMultistepScheduler())


def test_read_diffusers_made_a14b_pipeline(tmp_path: Path) -> None:
    config = DITS["t2v-expert"]
    high, low = randomize(diffusers_dit(config), seed=1), randomize(diffusers_dit(config), seed=2)
    vae = randomize(diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(VAEConfig(dim=8))), scale=0.1)
    pipe = diffusers.WanPipeline(transformer=high, transformer_2=low, vae=vae, boundary_ratio=0.875, **text_parts())
    pipe.save_pretrained(tmp_path / "pipe")

    found = read_pipeline(tmp_path / "pipe")
    assert found == PipelineFolder(tmp_path / "pipe", "WanPipeline",
                                   {"high": tmp_path / "pipe" / "transformer", "low": tmp_path / "pipe" / "transformer_2"},
                                   tmp_path / "pipe" / "vae", 0.875, False)
    for role, theirs in (("high", high), ("low", low)):
        assert_same_dit(wan_models.load_model(found.experts[role]), theirs, config)
    ours_vae = wan_models.load_model(found.vae)
    assert isinstance(ours_vae, WanVAE) and not isinstance(ours_vae, WanVAE22)


def test_read_diffusers_made_ti2v_pipeline(tmp_path: Path) -> None:
    config = DITS["ti2v"]
    transformer, vae = randomize(diffusers_dit(config), seed=4), diffusers_vae22(seed=5)
    pipe = diffusers.WanPipeline(transformer=transformer, vae=vae, expand_timesteps=True, **text_parts())
    pipe.save_pretrained(tmp_path / "pipe")
    found = read_pipeline(tmp_path / "pipe")
    assert (found.experts, found.boundary_ratio, found.expand_timesteps) == (
        {"single": tmp_path / "pipe" / "transformer"}, None, True)
    assert_same_dit(wan_models.load_model(found.experts["single"]), transformer, config)
    assert_same_vae22(wan_models.load_model(found.vae), vae)


def test_write_pipeline_loads_in_diffusers(tmp_path: Path) -> None:
    config = DITS["i2v-expert"]
    high = build(WanDiT, config, random_weights(WanDiT(config), seed=6))
    low = build(WanDiT, config, random_weights(WanDiT(config), seed=7))
    vae = build(WanVAE22, TINY_VAE22, random_weights(WanVAE22(TINY_VAE22), seed=8, scale=0.1))
    folder = write_pipeline(tmp_path / "out", {"high": (config, high.state_dict()), "low": (config, low.state_dict())},
                            (TINY_VAE22, vae.state_dict()), boundary_ratio=0.9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left

    pipe = diffusers.WanPipeline.from_pretrained(folder, **text_parts())
    assert pipe.config.boundary_ratio == 0.9
    assert_same_dit(high, pipe.transformer, config)
    assert_same_dit(low, pipe.transformer_2, config)
    assert_same_vae22(vae, pipe.vae)
    alone = diffusers.WanTransformer3DModel.from_pretrained(folder, subfolder="transformer_2")
    assert_same_dit(low, alone, config)
    assert_same_vae22(vae, diffusers.AutoencoderKLWan.from_pretrained(folder, subfolder="vae"))

    found = read_pipeline(folder)
    assert (set(found.experts), found.boundary_ratio, found.expand_timesteps) == ({"high", "low"}, 0.9, False)
    assert wan_models.load_model(folder / "transformer_2").config == config


def test_write_pipeline_failure_leaves_nothing(tmp_path: Path) -> None:
    config = DITS["t2v-expert"]
    good = random_weights(WanDiT(config))
    bad = {**good, "ref_conv.weight": torch.zeros(1)}  # no diffusers name: fails after "high" is written
    with pytest.raises(ValueError, match="ref_conv"):
        write_pipeline(tmp_path / "out", {"high": (config, good), "low": (config, bad)}, boundary_ratio=0.875)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="boundary_ratio"):
        write_pipeline(tmp_path / "out", {"high": (config, good), "low": (config, good)})
    with pytest.raises(ValueError, match="two experts"):
        write_pipeline(tmp_path / "out", {"single": (config, good)}, boundary_ratio=0.5)


GOOD_INDEX = {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "expand_timesteps": False,
              "transformer": ["diffusers", "WanTransformer3DModel"],
              "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
BAD_INDEX = {
    "no class": ({"_class_name": None}, r'"_class_name" must name'),
    "no transformer": ({"transformer": None}, r'"transformer" is missing or null'),
    "foreign class": ({"transformer": ["diffusers", "FluxTransformer2DModel"]}, r'"transformer" must be'),
    "not a pair": ({"vae": "AutoencoderKLWan"}, r'"vae" must be'),
    "no boundary": ({"boundary_ratio": None}, r'"transformer_2" is set but "boundary_ratio" is null'),
    "boundary range": ({"boundary_ratio": 875}, r'"boundary_ratio" must be a number between 0 and 1'),
    "boundary, one DiT": ({"transformer_2": [None, None]}, r'"boundary_ratio" is 0.875 but "transformer_2"'),
    "expand": ({"expand_timesteps": "yes"}, r'"expand_timesteps" must be true or false'),
}


@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_malformed_model_index(tmp_path: Path, case: str) -> None:
    change, message = BAD_INDEX[case]
    for sub in ("transformer", "transformer_2", "vae"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps({**GOOD_INDEX, **change}))
    with pytest.raises(CheckpointError, match=r"model_index\.json: " + message):
        read_pipeline(tmp_path)


def test_model_index_not_json_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model_index.json"):
        read_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"model_index\.json: not valid JSON"):
        read_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(GOOD_INDEX))
    with pytest.raises(CheckpointError, match=r'"transformer" names .*/transformer/config\.json does not exist'):
        read_pipeline(tmp_path)

# ---- CLI ------------------------------------------------------------------------------------


def test_cli_converts_wan22_vae_and_dit(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wan_cli.main import app

    vae = build(WanVAE22, TINY_VAE22, random_weights(WanVAE22(TINY_VAE22), seed=9, scale=0.1))
    save_file(vae.state_dict(), tmp_path / "Wan2.2_VAE.safetensors")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "Wan2.2_VAE.safetensors"), str(tmp_path / "vae"),
                                      "--to", "diffusers"])
    assert result.exit_code == 0, result.output
    assert_same_vae22(vae, diffusers.AutoencoderKLWan.from_pretrained(tmp_path / "vae"))

    config = DITS["ti2v"]
    dit = build(WanDiT, config, random_weights(WanDiT(config), seed=10))
    save_file(dit.state_dict(), tmp_path / "dit.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": config.num_heads, "model_type": "ti2v"}))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "dit.safetensors"), str(tmp_path / "transformer"),
                                      "--to", "diffusers"])
    assert result.exit_code == 0, result.output
    assert_same_dit(dit, diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "transformer"), config)


def test_cli_converts_a14b_release_to_pipeline(tmp_path: Path) -> None:
    """A released-layout T2V-A14B folder becomes a pipeline folder that diffusers loads."""
    from typer.testing import CliRunner

    from wan_cli.main import app
    from wan_runtime import tiny_release

    release = tiny_release.write_release(tmp_path / "models", "Wan2.2-T2V-A14B")
    out = tmp_path / "pipe"
    result = CliRunner().invoke(app, ["convert", str(release), str(out), "--to", "diffusers"])
    assert result.exit_code != 0 and "--boundary-ratio" in result.output and not out.exists()
    result = CliRunner().invoke(app, ["convert", str(release), str(out), "--to", "diffusers",
                                      "--boundary-ratio", "0.875"])
    assert result.exit_code == 0, result.output
    found = read_pipeline(out)
    assert (set(found.experts), found.boundary_ratio) == ({"high", "low"}, 0.875)
    for folder, subfolder in (("high_noise_model", "transformer"), ("low_noise_model", "transformer_2")):
        ours = wan_models.load_model(release / folder)
        assert_same_dit(ours, diffusers.WanTransformer3DModel.from_pretrained(out, subfolder=subfolder), ours.config)
