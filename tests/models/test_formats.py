"""Checkpoint formats: diffusers and ComfyUI state dicts load into our networks and compute what
diffusers computes; our state dicts convert back and load strictly into diffusers' classes.

diffusers itself is the reference: tiny random ``WanTransformer3DModel`` (T2V, I2V, FLF2V),
``WanVACETransformer3DModel`` and ``AutoencoderKLWan`` models run the same inputs as ours.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import wan_models
from wan_models import DiTConfig, WanDiT, formats
from wan_models.formats import comfy
from wan_models.formats import diffusers as diffusers_format
from wan_models.loading import CheckpointError
from wan_models.vae import VAEConfig, WanVAE

from factories import TINY_DIT, dit_inputs, random_dit, randomize

diffusers = pytest.importorskip("diffusers")

# float32 on both sides; what differs is summation order and diffusers' float32 timestep sinusoid
# (ours is float64). Measured max |difference|: 3.1e-6 for DiT outputs up to ~5, 2.4e-7 for the VAE.
FLOAT_TOL = dict(rtol=1e-4, atol=1e-4)

TINY = TINY_DIT.replace(text_len=512)  # dim 32, 2 heads of 16: only config.json can tell the heads
VARIANTS = {
    "t2v": TINY,
    "i2v": TINY.replace(in_dim=36, image_input=True, clip_dim=20),
    "flf2v": TINY.replace(in_dim=36, image_input=True, image_pos_emb=True, clip_dim=20),
    "vace": TINY.replace(num_layers=4, vace_layers=(0, 3), vace_in_dim=8),
}


def diffusers_dit(config: DiTConfig) -> torch.nn.Module:
    cfg = diffusers_format.transformer_config(config)
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg).eval()


def our_dit(config: DiTConfig, state: dict[str, torch.Tensor]) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def dit_case(config: DiTConfig, seed: int = 1) -> tuple[dict, dict]:
    """The same inputs as our ``forward`` kwargs and as diffusers' ``forward`` kwargs."""
    x, t, _ = dit_inputs(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ctx = torch.randn(1, 512 if config.image_input else 8, config.text_dim, generator=gen)
    ours = dict(x=x, timestep=t, context=ctx)
    theirs = dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx)
    if config.image_input:
        images = 2 if config.image_pos_emb else 1  # FLF2V: first and last frame, which diffusers
        clip = torch.randn(images, 257, config.clip_dim, generator=gen)  # takes as 2 batch rows
        y = torch.randn(1, config.in_dim - 16, *x.shape[2:], generator=gen)
        ours.update(x=x[:, :16], y=y, clip_feature=clip.reshape(1, images * 257, -1))
        theirs.update(hidden_states=torch.cat([x[:, :16], y], dim=1), encoder_hidden_states_image=clip)
    if config.vace_layers:
        vace = torch.randn(1, config.vace_in_dim, *x.shape[2:], generator=gen)
        ours["vace_context"] = vace
        theirs["control_hidden_states"] = vace
    return ours, theirs


def assert_same_dit(ours: WanDiT, theirs: torch.nn.Module, config: DiTConfig) -> None:
    kwargs, their_kwargs = dit_case(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(**kwargs), theirs(**their_kwargs).sample, **FLOAT_TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_dit_to_official(variant: str) -> None:
    config = VARIANTS[variant]
    theirs = randomize(diffusers_dit(config))
    state = theirs.state_dict()
    assert formats.detect_format(state) == "diffusers"
    official = formats.convert(state, to="official")
    assert {id(v) for v in official.values()} == {id(v) for v in state.values()}  # renamed, not copied
    assert_same_dit(our_dit(config, official), theirs, config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_dit_to_diffusers(variant: str) -> None:
    config = VARIANTS[variant]
    ours = random_dit(config, seed=3)
    theirs = diffusers_dit(config)
    theirs.load_state_dict(formats.convert(ours.state_dict(), to="diffusers"), strict=True)
    assert_same_dit(ours, theirs, config)


@pytest.mark.parametrize("variant", ["t2v", "vace"])
def test_load_diffusers_transformer_folder(tmp_path, variant: str) -> None:
    """``config.json`` supplies what shapes cannot: 2 heads (not 1) and VACE layers (0, 3)."""
    config = VARIANTS[variant]
    theirs = randomize(diffusers_dit(config), seed=5)
    theirs.save_pretrained(tmp_path / "transformer")
    ours = wan_models.load_model(tmp_path / "transformer")
    assert ours.config == config
    assert_same_dit(ours, theirs, config)


@pytest.mark.parametrize("name", ["Wan2.1-T2V-1.3B", "Wan2.1-I2V-14B-480P", "Wan2.1-FLF2V-14B-720P",
                                  "Wan2.1-VACE-14B"])
def test_released_sizes_match_diffusers_single_file_converter(name: str) -> None:
    """At the released sizes our names agree with diffusers' own converter, except that it leaves
    FLF2V's ``img_emb.emb_pos`` unrenamed (the strict loads above show ``pos_embed`` is right)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        official = WanDiT(wan_models.MODELS[name].config).state_dict()
    ours = set(formats.convert(official, to="diffusers"))
    theirs = set(convert_wan_transformer_to_diffusers(dict(official)))
    expected = {"img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"} if "FLF2V" in name else set()
    assert ours ^ theirs == expected


def test_diffusers_lacks_fun_parts() -> None:
    config = TINY.replace(in_dim=48, image_input=True, ref_conv=True)
    with pytest.raises(ValueError, match="ref_conv"):
        diffusers_format.transformer_config(config)
    with pytest.raises(ValueError, match="no diffusers equivalent: ref_conv"):
        formats.convert(random_dit(config).state_dict(), to="diffusers")


# ---- VAE ------------------------------------------------------------------------------------

def vae_case() -> torch.Tensor:
    return torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1


def assert_same_vae(ours: WanVAE, theirs: torch.nn.Module) -> None:
    video = vae_case()
    with torch.no_grad():
        mu, their_mu = ours.encode(video, normalize=False), theirs.encode(video).latent_dist.mean
        frames, their_frames = ours.decode(mu, normalized=False), theirs.decode(mu).sample
    torch.testing.assert_close(mu, their_mu, **FLOAT_TOL)
    torch.testing.assert_close(frames, their_frames, **FLOAT_TOL)
    assert (frames.abs() < 1).float().mean() > 0.5  # not a comparison of clamped values


@pytest.mark.parametrize("num_res_blocks", [1, 2])  # 2 is the release; 1 moves every decoder index
def test_vae_both_directions(num_res_blocks: int) -> None:
    config = VAEConfig(dim=8, num_res_blocks=num_res_blocks)
    theirs = randomize(diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(config)), scale=0.1)
    official = formats.convert(theirs.state_dict(), to="official")
    with torch.device("meta"):
        ours = WanVAE(config)
    ours.load_state_dict(official, strict=True, assign=True)
    assert_same_vae(ours.eval(), theirs)
    fresh = diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(config)).eval()
    fresh.load_state_dict(formats.convert(ours.state_dict(), to="diffusers"), strict=True)
    assert_same_vae(ours, fresh)


def test_released_vae_matches_diffusers_single_file_converter() -> None:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        official = WanVAE().state_dict()
    assert formats.convert(official, to="diffusers").keys() == convert_wan_vae_to_diffusers(dict(official)).keys()


def test_load_diffusers_vae_folder(tmp_path) -> None:
    config = VAEConfig(dim=8)
    theirs = randomize(diffusers.AutoencoderKLWan.from_config(diffusers_format.vae_config(config)), scale=0.1)
    theirs.save_pretrained(tmp_path / "vae")
    ours = wan_models.load_model(tmp_path / "vae")
    assert isinstance(ours, WanVAE) and ours.config == config
    assert_same_vae(ours, theirs)


# ---- ComfyUI --------------------------------------------------------------------------------

def new_style_scales(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's mixed-precision layout: ``.weight_scale`` plus a ``.comfy_quant`` JSON config."""
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    out = {}
    for key, value in sd.items():
        if key.endswith(".scale_weight"):
            layer = key[: -len(".scale_weight")]
            out[layer + ".weight_scale"] = value
            out[layer + ".comfy_quant"] = conf.clone()
        elif not key.endswith(comfy.MARKER):
            out[key] = value
    return out


# A ComfyUI file has no config.json: heads and text_len are the loader's defaults for a 32-wide DiT.
COMFY_DIT = TINY_DIT.replace(num_heads=1, text_len=512)
# name: (official state dict -> stored state dict, allowed max |error| / max |output|). Measured:
# fp16 4.5e-4, bf16 3.7e-3, fp8 5.4e-2, scaled fp8 4.3e-2. e4m3 keeps 3 mantissa bits, so each
# weight may be off by 1/16 of itself; 0.1 of the output scale bounds that for this network.
STORAGE = {
    "fp16": (lambda sd: {k: v.half() for k, v in sd.items()}, 2e-3),
    "bf16": (lambda sd: {k: v.bfloat16() for k, v in sd.items()}, 2e-2),
    "fp8": (lambda sd: comfy.quantize_fp8(sd, scaled=False), 0.1),
    "fp8-scaled": (lambda sd: comfy.quantize_fp8(sd), 0.1),
    "fp8-weight_scale": (lambda sd: new_style_scales(comfy.quantize_fp8(sd)), 0.1),
}


@pytest.mark.parametrize("storage", list(STORAGE))
def test_comfy_dit_file(tmp_path, storage: str) -> None:
    store, tolerance = STORAGE[storage]
    reference = random_dit(COMFY_DIT, seed=11)
    stored = comfy.from_official(store(reference.state_dict()), "dit")
    assert all(k.startswith(comfy.DIT_PREFIX) for k in stored)
    save_file(stored, tmp_path / "wan_comfy.safetensors")
    model = wan_models.load_model(tmp_path / "wan_comfy.safetensors", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config == COMFY_DIT
    x, t, ctx = dit_inputs(COMFY_DIT)
    with torch.no_grad():
        ref, out = reference(x, t, ctx), model(x, t, ctx)
    assert (out - ref).abs().max() <= tolerance * ref.abs().max()


def test_fp8_dtype_default_and_asked(tmp_path) -> None:
    """Unscaled fp8 weights beside bf16 ones load as bf16 when no dtype is asked for (the file's
    keys may be official, without prefix), as the asked dtype otherwise."""
    state = comfy.quantize_fp8({k: v.bfloat16() for k, v in random_dit(TINY_DIT).state_dict().items()}, scaled=False)
    save_file(state, tmp_path / "dit_fp8.safetensors")
    assert formats.detect_format(state) == "official"
    model = wan_models.load_model(tmp_path / "dit_fp8.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_file(comfy.from_official(comfy.quantize_fp8(random_dit(TINY_DIT).state_dict()), "dit"),
              tmp_path / "dit_fp8_scaled.safetensors")
    model = wan_models.load_model(tmp_path / "dit_fp8_scaled.safetensors", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_comfy_vae_and_unprefixed_scaled_files(tmp_path) -> None:
    vae_state = WanVAE(VAEConfig(dim=8)).state_dict()
    as_comfy = formats.convert(vae_state, to="comfy")
    assert all(k.startswith("vae.") for k in as_comfy) and formats.detect_format(as_comfy) == "comfy"
    back = formats.convert(as_comfy, to="official")
    assert back.keys() == vae_state.keys() and all(back[k] is vae_state[k] for k in back)
    save_file(as_comfy, tmp_path / "vae.safetensors")
    loaded = wan_models.load_model(tmp_path / "vae.safetensors")
    assert isinstance(loaded, WanVAE) and torch.equal(loaded.decoder.conv1.weight, vae_state["decoder.conv1.weight"])
    scaled = comfy.quantize_fp8(random_dit(TINY_DIT).state_dict())  # a scaled file without prefix
    assert formats.detect_format(scaled) == "comfy"
    weight = formats.convert(scaled, dtype=torch.float32)["blocks.0.ffn.0.weight"]
    assert torch.equal(weight, scaled["blocks.0.ffn.0.weight"].float() * scaled["blocks.0.ffn.0.scale_weight"])


def test_comfy_errors() -> None:
    state = random_dit(TINY_DIT).state_dict()
    both = {**comfy.from_official(state, "dit"), "vae.encoder.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="several networks"):
        formats.convert(both)
    nvfp4 = {**state, "blocks.0.ffn.0.weight_scale_2": torch.ones(1)}
    with pytest.raises(ValueError, match="NVFP4"):
        formats.convert(nvfp4)


def test_unknown_format_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="match no Wan 2.1 network.*lm_head.weight"):
        formats.detect_format({"lm_head.weight": torch.zeros(1), "model.layers.0.mlp.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        formats.convert(random_dit(TINY_DIT).state_dict(), to="gguf")
    save_file({"lm_head.weight": torch.zeros(1)}, tmp_path / "llm.safetensors")
    with pytest.raises(CheckpointError, match="llm.safetensors.*lm_head.weight"):
        wan_models.load_model(tmp_path / "llm.safetensors")
