"""LoRAs we write in each layout are read at the right strength by the other tools' own code.

* diffusers (its own ``WanTransformer3DModel.load_lora_adapter`` and ``WanPipeline.load_lora_weights``
  with ``load_into_transformer_2``) gives the outputs of our DiT with the LoRA merged by ``merge_lora``;
* peft (``inject_adapter_in_model`` + ``set_peft_model_state_dict``, configured from our header) reads
  the official layout;
* the comfy layout is mapped by ComfyUI's rule, written out here from Comfy-Org/ComfyUI
  ``comfy/lora.py`` at 17358c8f (``model_lora_keys_unet``, ``load_lora``) and
  ``comfy/weight_adapter/lora.py`` at 6f98b150 (``alpha / rank``), since ComfyUI is not on PyPI.

The expected networks are ours with the LoRA merged from its factors in our names plus explicit
``.alpha`` tensors, never from the exported file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from wan_models import formats
from wan_models.formats import diffusers as diffusers_format
from wan_runtime.lora import merge_lora
from wan_runtime.lora.layouts import BASE_KEY, export_lora, save_lora

from factories import TINY_DIT, dit_inputs, random_dit

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CONFIG = TINY_DIT.replace(family="wan2.2")
REL_TOL = 1e-4
# layer -> rank: attention, FFN, text embedding and head layers; two ranks so alpha != rank on both.
LAYERS = {"blocks.0.self_attn.q": 4, "blocks.0.self_attn.o": 4, "blocks.1.cross_attn.k": 4, "blocks.1.ffn.0": 2,
          "blocks.0.ffn.2": 4, "text_embedding.0": 4, "head.head": 2}
ALPHA = 3.0


def lora_state(layers: dict[str, int] = LAYERS, seed: int = 7, dim: int = CONFIG.dim) -> dict[str, torch.Tensor]:
    """Random factors in our names for ``layers`` of a CONFIG DiT (fresh values, none zero)."""
    shapes = {name: p.shape for name, p in random_dit(CONFIG).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer, rank in layers.items():
        out, inp = shapes[f"{layer}.weight"]
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
        state[f"{layer}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3
    return state


def merged(state: dict[str, torch.Tensor], alpha: float, seed: int = 0) -> torch.nn.Module:
    """Our DiT with ``state`` merged, the scale given as explicit ``.alpha`` tensors."""
    dit = random_dit(CONFIG, seed=seed)
    alphas = {k.replace(".lora_A.weight", ".alpha"): torch.tensor(alpha) for k in state if k.endswith("lora_A.weight")}
    merge_lora(dit, {**state, **alphas})
    return dit


def diffusers_copy(seed: int = 0) -> torch.nn.Module:
    """diffusers' WanTransformer3DModel holding the weights of ``random_dit(CONFIG, seed)``."""
    theirs = diffusers.WanTransformer3DModel.from_config(diffusers_format.transformer_config(CONFIG))
    theirs.load_state_dict(formats.convert(random_dit(CONFIG, seed=seed).state_dict(), to="diffusers"), strict=True)
    return theirs.eval()


def assert_same_output(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    x, t, ctx = dit_inputs(CONFIG)
    with torch.no_grad():
        expected = ours(x, timestep=t, context=ctx)
        got = theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
    error = (expected - got).abs().max().item()
    assert error <= REL_TOL * expected.abs().max().item(), f"max |difference| {error}"


def test_diffusers_load_lora_adapter_matches_our_merge(tmp_path: Path) -> None:
    state = lora_state()
    gen = torch.Generator().manual_seed(3)
    state["blocks.1.ffn.0.diff_b"] = torch.randn(CONFIG.ffn_dim, generator=gen) * 0.3
    path = save_lora(tmp_path / "lora.safetensors", state, "diffusers", alpha=ALPHA,
                     metadata={BASE_KEY: json.dumps({"family": "wan2.2"})})
    with safe_open(path, "pt") as f:
        header = f.metadata()
    assert json.loads(header[BASE_KEY]) == {"family": "wan2.2"}
    theirs = diffusers_copy()
    # diffusers reads the header only when told the file is safetensors (weight_name or use_safetensors=True)
    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer")
    before = merged(lora_state(), ALPHA)  # the same factors without the bias delta differ visibly
    expected = merged(state, ALPHA)
    assert_same_output(expected, theirs)
    x, t, ctx = dit_inputs(CONFIG)
    with torch.no_grad():
        assert not torch.allclose(before(x, timestep=t, context=ctx), expected(x, timestep=t, context=ctx))


def test_diffusers_pipeline_loads_into_the_low_noise_expert(tmp_path: Path) -> None:
    state = lora_state(seed=11)
    path = save_lora(tmp_path / "low.safetensors", state, "diffusers", alpha=ALPHA)
    high, low = diffusers_copy(seed=0), diffusers_copy(seed=1)
    pipe = diffusers.WanPipeline(transformer=high, transformer_2=low, vae=None, text_encoder=None, tokenizer=None,
                                 scheduler=None, boundary_ratio=0.875)
    pipe.load_lora_weights(str(path), load_into_transformer_2=True)
    assert_same_output(merged(state, ALPHA, seed=1), pipe.transformer_2)
    assert_same_output(random_dit(CONFIG, seed=0), pipe.transformer)  # the high-noise expert unchanged
    assert not getattr(pipe.transformer, "peft_config", None)


def test_peft_reads_the_official_layout() -> None:
    layers = {name: 4 for name in LAYERS}  # one rank, so the header's lora_rank / lora_alpha apply to all
    state = lora_state(layers, seed=5)
    tensors, header = export_lora(state, "official", alpha=6.0)
    assert (header["lora_rank"], header["lora_alpha"]) == ("4", "6")
    config = peft.LoraConfig(r=int(header["lora_rank"]), lora_alpha=float(header["lora_alpha"]),
                             target_modules=sorted(LAYERS))
    model = peft.inject_adapter_in_model(config, copy.deepcopy(random_dit(CONFIG)))
    result = peft.set_peft_model_state_dict(model, tensors)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    assert not [k for k in result.missing_keys if "lora_" in k]
    x, t, ctx = dit_inputs(CONFIG)
    expected = merged(state, 6.0)
    with torch.no_grad():
        want, got = expected(x, timestep=t, context=ctx), model(x, timestep=t, context=ctx)
    assert (want - got).abs().max().item() <= REL_TOL * want.abs().max().item()


def comfy_key_map(dit: torch.nn.Module) -> dict[str, str]:
    """ComfyUI's ``model_lora_keys_unet`` for a WAN model (17358c8f): its model's keys are ours under
    ``diffusion_model.``; a ``.weight`` key is reachable by its layer name (generic format) and by the
    kohya ``lora_unet_`` name, any other key by itself."""
    key_map = {}
    for key in dit.state_dict():
        full = f"diffusion_model.{key}"
        if key.endswith(".weight"):
            key_map[f"lora_unet_{key.removesuffix('.weight').replace('.', '_')}"] = full
            key_map[full.removesuffix(".weight")] = full
        else:
            key_map[full] = full
    return key_map


def comfy_apply(dit: torch.nn.Module, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's ``load_lora`` + weight patching: for each mapped name ``x``: ``x.alpha`` (optional),
    ``x.lora_up/down.weight`` (weight += alpha / rank * up @ down), ``x.diff`` (added to the weight),
    ``x.diff_b`` (added to the bias). Returns the patched weights (our names); asserts every key loads."""
    weights = {f"diffusion_model.{k}": v.clone() for k, v in dit.state_dict().items()}
    loaded = set()
    for x, target in comfy_key_map(dit).items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.lora_up.weight" in lora:
            up, down = lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"]
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            weights[target] += scale * (up.flatten(1) @ down.flatten(1)).reshape(weights[target].shape)
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
            loaded |= {f"{x}.alpha"} if alpha is not None else set()
        if f"{x}.diff" in lora:
            weights[target] += lora[f"{x}.diff"]
            loaded.add(f"{x}.diff")
        if f"{x}.diff_b" in lora:
            weights[target.removesuffix(".weight") + ".bias"] += lora[f"{x}.diff_b"]
            loaded.add(f"{x}.diff_b")
    assert set(lora) - loaded == set(), "keys ComfyUI would log as 'lora key not loaded'"
    return {k.removeprefix("diffusion_model."): v for k, v in weights.items()}


def test_comfy_layout_maps_onto_every_weight_as_comfyui_does() -> None:
    state = lora_state(seed=9)
    gen = torch.Generator().manual_seed(4)
    state["blocks.0.modulation.diff"] = torch.randn(1, 6, CONFIG.dim, generator=gen) * 0.1
    state["blocks.1.norm3.diff"] = torch.randn(CONFIG.dim, generator=gen) * 0.1
    state["blocks.0.self_attn.q.diff_b"] = torch.randn(CONFIG.dim, generator=gen) * 0.1
    tensors, header = export_lora(state, "comfy", alpha=ALPHA)
    assert all(k.startswith("diffusion_model.") for k in tensors)
    got = comfy_apply(random_dit(CONFIG), tensors)
    expected = merged(state, ALPHA).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("layout", ["official", "comfy"])
def test_default_alpha_is_the_rank(layout: str) -> None:
    tensors, _ = export_lora(lora_state(), layout)
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {f"{'diffusion_model.' if layout == 'comfy' else ''}{k}.alpha": float(r)
                      for k, r in LAYERS.items()}


def test_diffusers_header_is_what_diffusers_writes() -> None:
    """Per-layer ranks go to rank_pattern, the most common one is r; diffusers builds a LoraConfig of it."""
    _, header = export_lora(lora_state(), "diffusers", alpha=ALPHA)
    config = json.loads(header["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 3
    assert config["transformer.rank_pattern"] == {"blocks.1.ffn.net.0.proj": 2, "proj_out": 2}
    assert header["lora_adapter_metadata"] == json.dumps(config, indent=2, sort_keys=True)
    peft.LoraConfig(**{k.removeprefix("transformer."): v for k, v in config.items()})


@pytest.mark.parametrize("state, layout, words", [
    ({"blocks.0.modulation.diff": torch.ones(1, 6, 32)}, "diffusers", "blocks.0.modulation.diff"),
    ({"blocks.0.self_attn.q.diff": torch.ones(32, 32)}, "diffusers", "blocks.0.self_attn.q.diff"),
    ({"motion_controller.lin.lora_A.weight": torch.ones(2, 8), "motion_controller.lin.lora_B.weight": torch.ones(8, 2)},
     "diffusers", "motion_controller.lin.lora_A.weight"),
    ({"blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 32)}, "official", "lora_B"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 32)}, "comfy", "our names"),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 32)}, "comfy", "our names"),
    ({"blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 32),
      "blocks.0.self_attn.q.lora_B.weight": torch.ones(32, 3)}, "official", "not the factors"),
    ({"x.diff": torch.ones(1)}, "kohya", "unknown LoRA layout"),
])
def test_bad_input_is_refused_by_name(state: dict, layout: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        export_lora(state, layout)


def test_save_lora_writes_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modulation"):
        save_lora(tmp_path / "x.safetensors", {"blocks.0.modulation.diff": torch.ones(1, 6, 32)}, "diffusers")
    assert list(tmp_path.iterdir()) == []
