"""ComfyUI's Wan 2.2 single files load into the right networks with the right weights.

The files are tiny stand-ins written in the layout of the Comfy-Org repackaged releases:

* ``wan2.2_ti2v_5B_fp16.safetensors``: the TI2V-5B DiT (48 latent channels in and out), fp16;
* ``wan2.2_{t2v,i2v}_{high,low}_noise_14B_fp16.safetensors`` and ``..._fp8_scaled.safetensors``:
  the A14B experts; in the scaled files the blocks' linear weights are ``float8_e4m3fn`` with a
  float32 per-tensor ``.scale_weight`` (and an activation ``.scale_input``) beside each, a
  ``scaled_fp8`` marker, the other tensors fp16;
* ``wan2.2_vae.safetensors``: the official ``Wan2.2_VAE.pth`` keys, 16-bit, no prefix.

DiT files are tried bare and under ComfyUI's ``model.diffusion_model.`` (ComfyUI's loader accepts
both). The fp8 tensors are made here by ComfyUI's convention, not by ``comfy.quantize_fp8``:
``scale = amax(|w|) / 448`` in float32, stored ``clamp(w / scale, ±448)`` cast to e4m3, and the
weight is ``stored * scale``. ComfyUI's own detection (``comfy/model_detection.py``,
``comfy/supported_models.py``, ``comfy/sd.py``) reads the keys and shapes the last tests check.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import wan_models
from wan_models import DiTConfig, WanDiT, formats
from wan_models.vae import VAEConfig, WanVAE
from wan_models.vae22 import VAE22Config, WanVAE22

from factories import TINY_DIT, dit_inputs, one_thread_fixture, random_dit

one_thread = one_thread_fixture("module")

DIT_PREFIX = "model.diffusion_model."
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, ComfyUI's divisor
# A ComfyUI file has no config.json: 32 wide is no multiple of 128, so the loader takes one head.
BASE = TINY_DIT.replace(num_heads=1, text_len=512, family="wan2.2")
EXPERTS = {
    "ti2v_5B": BASE.replace(in_dim=48, out_dim=48),
    "i2v_14B": BASE.replace(in_dim=36),
    # Same shapes as Wan2.1-T2V-14B (ComfyUI too reads it as a wan2.1 t2v): only the file name or
    # folder can tell the family; no layer differs between the two families for text-to-video.
    "t2v_14B": BASE,
}
SHAPES_TELL_FAMILY = ("ti2v_5B", "i2v_14B")
FILE_NAMES = {"ti2v_5B": "wan2.2_ti2v_5B_{}.safetensors", "i2v_14B": "wan2.2_i2v_high_noise_14B_{}.safetensors",
              "t2v_14B": "wan2.2_t2v_low_noise_14B_{}.safetensors"}
TINY_VAE = VAE22Config(dim=4, dec_dim=6)


def fp16_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() for k, v in sd.items()}


def comfy_scaled_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's per-tensor fp8 quantisation of one weight: ``(stored e4m3, float32 scale)``."""
    w = weight.to(torch.float32)
    scale = w.abs().amax() / E4M3_MAX
    stored = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return stored, scale


def is_block_linear(key: str, value: torch.Tensor) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2


def fp8_scaled_file(sd: dict[str, torch.Tensor], mixed: bool = False) -> dict[str, torch.Tensor]:
    """The A14B ``*_fp8_scaled`` layout: block linears scaled e4m3, the rest fp16. ``mixed``: ComfyUI's
    newer layout instead (``.weight_scale`` + ``.comfy_quant``, no marker), as its converter writes it."""
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not is_block_linear(key, value):
            out[key] = value.half()
            continue
        layer = key[: -len(".weight")]
        out[key], scale = comfy_scaled_fp8(value)
        if mixed:
            out[layer + ".weight_scale"] = scale
            out[layer + ".comfy_quant"] = conf.clone()
        else:
            out[layer + ".scale_weight"] = scale
            out[layer + ".scale_input"] = torch.tensor(1.0)
    if not mixed:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


STORAGE = {"fp16": fp16_file, "fp8_scaled": fp8_scaled_file,
           "fp8_mixed": lambda sd: fp8_scaled_file(sd, mixed=True)}
# Allowed max |output - source output| / max |source output|; measured over these cases: fp16 6.1e-4
# (11 mantissa bits: each weight within 2**-12 of itself), fp8 1.9e-2 (e4m3's 3 bits: within 1/16).
OUTPUT_TOL = {"fp16": 2e-3, "fp8_scaled": 0.05, "fp8_mixed": 0.05}


def save(tmp_path, name: str, sd: dict[str, torch.Tensor], prefix: str = "") -> str:
    path = tmp_path / name
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# ComfyUI releases TI2V-5B in fp16 only, the A14B experts in fp16 and fp8 scaled.
RELEASES = [(e, s) for e in EXPERTS for s in STORAGE if e != "ti2v_5B" or s == "fp16"]


@pytest.mark.parametrize("prefix", ["", DIT_PREFIX], ids=["bare", "prefixed"])
@pytest.mark.parametrize("expert, storage", RELEASES)
def test_dit_file_loads_into_the_right_network(tmp_path, expert: str, storage: str, prefix: str) -> None:
    config = EXPERTS[expert]
    source = random_dit(config, seed=3)
    official = source.state_dict()
    stored = STORAGE[storage](official)
    path = save(tmp_path, FILE_NAMES[expert].format(storage), stored, prefix)
    assert formats.detect_format(wan_models.read_state_dict(path)) == ("official" if storage == "fp16" and not prefix
                                                                       else "comfy")

    model = wan_models.load_model(path, dtype=torch.float32, network="dit")
    assert isinstance(model, WanDiT)
    assert model.config == config if expert in SHAPES_TELL_FAMILY else model.config.replace(family="wan2.2") == config
    loaded = model.state_dict()
    for key, value in official.items():
        if stored[key].dtype == torch.float8_e4m3fn:
            scale = stored[key[: -len(".weight")] + (".weight_scale" if storage == "fp8_mixed" else ".scale_weight")]
            assert torch.equal(loaded[key], stored[key].float() * scale), key  # weight = fp8 * scale
            # Within half an e4m3 step: 1/16 of the value, or 2**-10 of the scale among subnormals.
            bound = torch.maximum(value.abs() / 16, scale / 1024) * (1 + 1e-6)
            assert ((loaded[key] - value).abs() <= bound).all(), key
        else:
            assert torch.equal(loaded[key], value.half().float()), key

    x, t, ctx = dit_inputs(config, seed=4)
    with torch.no_grad():
        ref, out = source(x, t, ctx), model(x, t, ctx)
    assert (out - ref).abs().max() <= OUTPUT_TOL[storage] * ref.abs().max()


def test_fp8_expert_defaults_to_the_files_16_bit_dtype(tmp_path) -> None:
    stored = fp8_scaled_file(random_dit(EXPERTS["i2v_14B"], seed=5).state_dict())
    path = save(tmp_path, "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", stored, DIT_PREFIX)
    model = wan_models.load_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    key = "blocks.1.ffn.2.weight"
    expected = (stored[key].float() * stored["blocks.1.ffn.2.scale_weight"]).half()
    assert torch.equal(model.state_dict()[key], expected)


def vae22(seed: int = 6) -> WanVAE22:
    torch.manual_seed(seed)
    return WanVAE22(TINY_VAE).eval()  # its own initialisation: non-zero everywhere that matters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_vae22_file_loads_as_wan_vae22(tmp_path, dtype: torch.dtype, prefix: str) -> None:
    source = vae22()
    stored = {k: v.to(dtype) for k, v in source.state_dict().items()}
    path = save(tmp_path, "wan2.2_vae.safetensors", stored, prefix)
    model = wan_models.load_model(path, dtype=torch.float32, network="vae22")
    assert isinstance(model, WanVAE22) and model.config == TINY_VAE
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in stored.items())
    assert {p.dtype for p in wan_models.load_model(path).parameters()} == {dtype}  # the file's own
    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, out = source.decode(z), model.decode(z)
    # Only the weights were rounded; measured 1.1e-3 (fp16) and 9.2e-3 (bf16) of the output's range.
    tolerance = 5e-3 if dtype == torch.float16 else 3e-2
    assert (out - ref).abs().max() <= tolerance * ref.abs().max()


# ---- writing: what ComfyUI's loader reads ---------------------------------------------------------


def comfy_detects_wan22_vae(sd: dict[str, torch.Tensor]) -> bool:
    """``comfy/sd.py``: a Wan VAE has ``decoder.middle.0.residual.0.gamma``; the 2.2 one also the
    nested ``decoder.upsamples.0.upsamples.0.residual.2.weight`` (keys without prefix)."""
    return "decoder.middle.0.residual.0.gamma" in sd and "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd


def test_convert_vae22_to_comfy(tmp_path) -> None:
    official = vae22().state_dict()
    as_comfy = wan_models.convert(official, to="comfy")
    # A whole ComfyUI checkpoint of a Wan model keeps its VAE under "vae." (WAN21_T2V.vae_key_prefix);
    # the bare keys are the split wan2.2_vae.safetensors, i.e. the official layout.
    assert all(k.startswith("vae.") for k in as_comfy) and formats.detect_format(as_comfy) == "comfy"
    bare = {k[len("vae."):]: v for k, v in as_comfy.items()}
    assert bare.keys() == official.keys() and all(bare[k] is official[k] for k in bare)
    assert comfy_detects_wan22_vae(bare)
    assert not comfy_detects_wan22_vae(WanVAE(VAEConfig(dim=4)).state_dict())  # 2.1: ComfyUI's other branch
    back = wan_models.convert(as_comfy, to="official")
    assert all(back[k] is official[k] for k in official)
    path = save(tmp_path, "vae.safetensors", as_comfy)
    assert isinstance(wan_models.load_model(path), WanVAE22)


def comfy_wan_dit_config(sd: dict[str, torch.Tensor]) -> dict:
    """What ``comfy/model_detection.py`` reads from a Wan DiT (keys under ``model.diffusion_model.``),
    and the ``supported_models`` class it picks for a Wan 2.2 file."""
    p = DIT_PREFIX
    assert p + "head.modulation" in sd  # ComfyUI's Wan marker
    dim = sd[p + "head.modulation"].shape[-1]
    found = {
        "dim": dim,
        "num_heads": dim // 128,
        "out_dim": sd[p + "head.head.weight"].shape[0] // 4,  # patch (1, 2, 2)
        "in_dim": sd[p + "patch_embedding.weight"].shape[1],
        "ffn_dim": sd[p + "blocks.0.ffn.0.weight"].shape[0],
        "num_layers": len({k.split(".")[3] for k in sd if k.startswith(p + "blocks.")}),
        "model_type": "i2v" if p + "img_emb.proj.0.bias" in sd else "t2v",
    }
    found["class"] = "WAN22_T2V (ti2v)" if found["model_type"] == "t2v" and found["out_dim"] == 48 else "other"
    return found


def test_convert_ti2v_dit_to_comfy_has_what_comfyui_detects(tmp_path) -> None:
    config = DiTConfig(family="wan2.2", in_dim=48, out_dim=48, dim=256, ffn_dim=64, num_heads=2, num_layers=3,
                       text_dim=16, freq_dim=16)
    source = random_dit(config, seed=8)
    as_comfy = wan_models.convert(source.state_dict(), to="comfy")
    assert all(k.startswith(DIT_PREFIX) for k in as_comfy)
    found = comfy_wan_dit_config(as_comfy)
    assert found == {"dim": 256, "num_heads": 2, "out_dim": 48, "in_dim": 48, "ffn_dim": 64, "num_layers": 3,
                     "model_type": "t2v", "class": "WAN22_T2V (ti2v)"}
    i2v = wan_models.convert(random_dit(EXPERTS["i2v_14B"]).state_dict(), to="comfy")
    assert comfy_wan_dit_config(i2v)["in_dim"] == 36 and comfy_wan_dit_config(i2v)["model_type"] == "t2v"
    model = wan_models.load_model(save(tmp_path, "ti2v.safetensors", as_comfy))
    assert model.config == config  # dim 256: ComfyUI's and our default of head dim 128 agree
