"""LoRA merging on a tiny random DiT: every file naming gives the same network as adding
``alpha * file_scale * up @ down`` (and ``alpha * diff``) to the weights by hand; errors name the
bad keys; LoRAs stack and unmerge in any order; bf16, fp8-stored and FP8Linear weights.

Tolerances (float32 unless said): merged weights within 1e-6 of the hand-made ones (they differ
only by the order of float32 roundings), DiT outputs within 1e-5, unmerged weights within 1e-6 of
the originals; bf16 and fp8 weights within one step of their own format.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from factories import TINY_DIT, random_dit
from wan_runtime import WanVideoPipeline
from wan_runtime.lora import merge_lora, parse_lora, unmerge_lora

ALPHA = 0.7
WEIGHT_TOL = 1e-6
OUTPUT_TOL = 1e-5
BF16_STEP = 2.0 ** -7   # largest relative spacing of bfloat16 (8 significant bits)
FP8_STEP = 2.0 ** -3    # largest relative spacing of float8_e4m3fn (4 significant bits)

# An image model, so that the CLIP branch (k_img/v_img) is covered too.
CONFIG = TINY_DIT.replace(image_input=True, in_dim=36, clip_dim=16)

# Layers given low-rank factors (a conv weight included), with their diffusers names.
LAYERS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
    "blocks.1.cross_attn.k": "blocks.1.attn2.to_k",
    "blocks.1.cross_attn.k_img": "blocks.1.attn2.add_k_proj",
    "blocks.0.cross_attn.v_img": "blocks.0.attn2.add_v_proj",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
# Full deltas: (layer or bare parameter, attribute) with the diffusers name of the layer.
DIFFS = {
    ("blocks.0.norm3", "weight"): "blocks.0.norm2",
    ("blocks.0.norm3", "bias"): "blocks.0.norm2",
    ("blocks.1.self_attn.norm_q", "weight"): "blocks.1.attn1.norm_q",
    ("head.head", "bias"): "proj_out",
    ("blocks.0.cross_attn.q", "weight"): "blocks.0.attn2.to_q",
    ("blocks.1.modulation", ""): "blocks.1.scale_shift_table",
    ("head.modulation", ""): "scale_shift_table",
}


@dataclass
class RandomLora:
    """Factors per layer ``(down, up, file alpha or None)`` and deltas per ``(layer, attr)``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]
    diffs: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


def random_lora(dit: torch.nn.Module, seed: int, layers=LAYERS, with_alpha: bool = False,
                with_diffs: bool = False) -> RandomLora:
    """Non-zero random factors of rank 2-4 (a file alpha on every other layer with ``with_alpha``)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(dit.named_parameters())
    factors = {}
    for i, layer in enumerate(layers):
        shape = params[f"{layer}.weight"].shape
        rank = 2 + i % 3
        down = torch.randn(rank, *shape[1:], generator=gen) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen) * 0.3
        factors[layer] = (down, up, 1.5 + i if with_alpha and i % 2 == 0 else None)
    diffs = {}
    if with_diffs:
        for layer, attr in DIFFS:
            diffs[layer, attr] = torch.randn(params[f"{layer}.{attr}" if attr else layer].shape, generator=gen) * 0.1
    return RandomLora(factors, diffs)


def _underscored(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class Format:
    """Key templates of one file naming; ``{}`` is the layer name after ``rename``."""

    down: str
    up: str
    alpha: str | None = None
    diff: str | None = None
    diff_b: str | None = None
    rename: Callable[[str], str] = lambda name: name

    def state_dict(self, lora: RandomLora) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (down, up, alpha) in lora.factors.items():
            name = self.rename(layer)
            out[self.down.format(name)], out[self.up.format(name)] = down, up
            if alpha is not None:
                out[self.alpha.format(name)] = torch.tensor(alpha)
        for (layer, attr), diff in lora.diffs.items():
            out[(self.diff_b if attr == "bias" else self.diff).format(self.rename(layer))] = diff
        return out


FORMATS = {
    "peft": Format("{}.lora_A.weight", "{}.lora_B.weight"),
    "peft_base_model_default": Format("base_model.model.{}.lora_A.default.weight",
                                      "base_model.model.{}.lora_B.default.weight"),
    "diffsynth": Format("{}.lora_A.default.weight", "{}.lora_B.default.weight"),
    "kohya": Format("lora_unet_{}.lora_down.weight", "lora_unet_{}.lora_up.weight", "lora_unet_{}.alpha",
                    "lora_unet_{}.diff", "lora_unet_{}.diff_b", rename=_underscored),
    "comfy_diff": Format("diffusion_model.{}.lora_down.weight", "diffusion_model.{}.lora_up.weight",
                         "diffusion_model.{}.alpha", "diffusion_model.{}.diff", "diffusion_model.{}.diff_b"),
    "diffusers": Format("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", "transformer.{}.alpha",
                        "transformer.{}.diff", "transformer.{}.diff_b",
                        rename=lambda name: LAYERS.get(name) or next(d for (o, _), d in DIFFS.items() if o == name)),
}


def write(fmt: Format, lora: RandomLora, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in fmt.state_dict(lora).items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


@torch.no_grad()
def by_hand(dit: torch.nn.Module, lora: RandomLora, alpha: float) -> torch.nn.Module:
    """A copy of ``dit`` with ``W += alpha * scale * up @ down`` and ``P += alpha * diff`` applied."""
    ref = copy.deepcopy(dit)
    params = dict(ref.named_parameters())
    for layer, (down, up, file_alpha) in lora.factors.items():
        weight = params[f"{layer}.weight"]
        scale = 1.0 if file_alpha is None else file_alpha / down.shape[0]
        weight += (alpha * scale * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape).to(weight.dtype)
    for (layer, attr), diff in lora.diffs.items():
        params[f"{layer}.{attr}" if attr else layer] += alpha * diff
    return ref


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max((v.float() - sb[k].float()).abs().max().item() for k, v in a.state_dict().items())


@torch.no_grad()
def run(dit: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 20, 2, 4, 4, generator=gen)
    context = torch.randn(1, CONFIG.text_len, CONFIG.text_dim, generator=gen)
    clip = torch.randn(1, 6, CONFIG.clip_dim, generator=gen)
    return dit(x, torch.tensor([700.0]), context, clip_feature=clip, y=y)


@pytest.fixture
def pipe() -> WanVideoPipeline:
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.add_model(random_dit(CONFIG, seed=0))
    return pipe


@pytest.mark.parametrize("name, suffix", [(name, ".safetensors") for name in FORMATS] + [("peft", ".pth")])
def test_every_format_merges_like_the_hand_made_sum(pipe, tmp_path, name, suffix):
    fmt = FORMATS[name]
    lora = random_lora(pipe.dit, seed=5, with_alpha=fmt.alpha is not None, with_diffs=fmt.diff is not None)
    path = write(fmt, lora, tmp_path / f"{name}{suffix}")
    original, expected = copy.deepcopy(pipe.dit), by_hand(pipe.dit, lora, ALPHA)

    merge = pipe.load_lora(pipe.dit, path, alpha=ALPHA)

    assert len(merge.updates) == len(lora.factors) + len(lora.diffs) and not merge.unmatched
    assert max_weight_diff(pipe.dit, expected) < WEIGHT_TOL
    out = run(pipe.dit)
    torch.testing.assert_close(out, run(expected), atol=OUTPUT_TOL, rtol=OUTPUT_TOL)
    assert (out - run(original)).abs().max() > 1e-2  # the LoRA did change the output
    pipe.unload_lora(merge)
    assert max_weight_diff(pipe.dit, original) < WEIGHT_TOL


def test_parse_names_layers_as_the_module_does(pipe):
    lora = random_lora(pipe.dit, seed=1, with_alpha=True, with_diffs=True)
    parsed = parse_lora(FORMATS["kohya"].state_dict(lora), pipe.dit)
    assert set(parsed.low_rank) == set(LAYERS) and not parsed.unmatched
    assert parsed.low_rank["blocks.0.self_attn.q"].scale == pytest.approx(1.5 / 2)  # alpha / rank
    assert parsed.low_rank["blocks.0.self_attn.o"].scale == 1.0                    # no alpha key
    assert set(parsed.diffs) == {f"{layer}.{attr}" if attr else layer for layer, attr in DIFFS}


def test_unmatched_keys_raise_listing_them_and_the_closest_layers(pipe, tmp_path):
    lora = random_lora(pipe.dit, seed=2, layers=["blocks.0.self_attn.q"])
    state = FORMATS["peft"].state_dict(lora)
    down, up, _ = lora.factors["blocks.0.self_attn.q"]
    bad = {"blocks.0.self_attn.qq.lora_A.weight": down.clone(), "blocks.0.self_attn.qq.lora_B.weight": up.clone(),
           "lora_unet_blocks_1_ffn_9.lora_down.weight": down.clone(),
           "lora_unet_blocks_1_ffn_9.lora_up.weight": up.clone(),
           "blocks.0.norm9.diff_b": torch.ones(CONFIG.dim), "blocks.0.self_attn.q.hada_w1_a": torch.ones(1)}
    path = tmp_path / "bad.safetensors"
    save_file({**state, **bad}, path)
    original = copy.deepcopy(pipe.dit)

    with pytest.raises(ValueError, match="6 keys match nothing") as info:
        pipe.load_lora(pipe.dit, path)
    message = str(info.value)
    assert str(path) in message and all(key in message for key in bad)
    assert "qq.lora_A.weight (closest: blocks.0.self_attn.q," in message and "not a LoRA tensor" in message
    assert max_weight_diff(pipe.dit, original) == 0  # nothing was merged

    merge = merge_lora(pipe.dit, path, strict=False)
    assert sorted(merge.unmatched) == sorted(bad) and len(merge.updates) == 1


def test_malformed_files_name_the_bad_key(pipe):
    down, up, _ = random_lora(pipe.dit, seed=3, layers=["blocks.0.ffn.0"]).factors["blocks.0.ffn.0"]
    with pytest.raises(ValueError, match=r"'blocks\.0\.ffn\.0\.lora_A\.weight' but no lora_B/up"):
        merge_lora(pipe.dit, {"blocks.0.ffn.0.lora_A.weight": down})
    with pytest.raises(ValueError, match=r"'blocks\.0\.ffn\.2\.lora_B\.weight'.*does not fit"):
        merge_lora(pipe.dit, {"blocks.0.ffn.2.lora_A.weight": down, "blocks.0.ffn.2.lora_B.weight": up})
    with pytest.raises(ValueError, match=r"'blocks\.0\.norm3\.diff' has shape \(3,\)"):
        merge_lora(pipe.dit, {"blocks.0.norm3.diff": torch.ones(3)})


@pytest.mark.parametrize("first_out", ["a", "b"])
def test_loras_stack_and_unmerge_in_any_order(pipe, tmp_path, first_out):
    original = copy.deepcopy(pipe.dit)
    loras = {"a": random_lora(pipe.dit, seed=10, with_alpha=True, with_diffs=True),
             "b": random_lora(pipe.dit, seed=11, layers=list(LAYERS)[::2])}
    strengths = {"a": ALPHA, "b": 1.3}
    paths = {k: write(FORMATS["comfy_diff"], lora, tmp_path / f"{k}.safetensors") for k, lora in loras.items()}
    merges = {k: pipe.load_lora(pipe.dit, paths[k], alpha=strengths[k]) for k in ("a", "b")}

    both = by_hand(by_hand(original, loras["a"], strengths["a"]), loras["b"], strengths["b"])
    assert max_weight_diff(pipe.dit, both) < WEIGHT_TOL
    torch.testing.assert_close(run(pipe.dit), run(both), atol=OUTPUT_TOL, rtol=OUTPUT_TOL)

    second_out = "b" if first_out == "a" else "a"
    pipe.unload_lora(merges[first_out])
    assert max_weight_diff(pipe.dit, by_hand(original, loras[second_out], strengths[second_out])) < WEIGHT_TOL
    pipe.unload_lora(merges[second_out])
    assert max_weight_diff(pipe.dit, original) < WEIGHT_TOL

    with pytest.raises(ValueError, match="already unmerged"):
        pipe.unload_lora(merges["a"])
    with pytest.raises(ValueError, match="another network"):
        unmerge_lora(original, merges["b"])


def test_bf16_weights_merge_in_float32_and_stay_bf16(pipe):
    dit = pipe.dit.to(torch.bfloat16)
    lora = random_lora(dit, seed=4, with_diffs=True)
    original = copy.deepcopy(dit)
    expected = by_hand(copy.deepcopy(dit).float(), lora, ALPHA).to(torch.bfloat16)  # one rounding to bf16

    merge = pipe.load_lora(dit, FORMATS["comfy_diff"].state_dict(lora), alpha=ALPHA)

    assert all(p.dtype == torch.bfloat16 for p in dit.parameters())
    for key, value in dit.state_dict().items():
        torch.testing.assert_close(value.float(), expected.state_dict()[key].float(), rtol=BF16_STEP, atol=1e-6)
    torch.testing.assert_close(run(dit), run(expected), atol=2e-2, rtol=2e-2)
    merged = {key: value.float() for key, value in dit.state_dict().items()}
    pipe.unload_lora(merge)
    # Two bf16 roundings: of the merged sum and of the difference (each within half a step).
    for key, value in dit.state_dict().items():
        was = original.state_dict()[key].float()
        assert ((value.float() - was).abs() <= BF16_STEP / 2 * (merged[key].abs() + was.abs())).all(), key


def test_fp8_stored_weights_are_merged_in_float32_and_cast_back(pipe):
    dit, layers = pipe.dit, [name for name in LAYERS if name != "patch_embedding"]
    for name in layers:
        layer = dit.get_submodule(name)
        layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    stored = {name: dit.get_submodule(name).weight.float() for name in layers}
    lora = random_lora(dit, seed=6, layers=layers)

    merge = pipe.load_lora(dit, FORMATS["peft"].state_dict(lora), alpha=ALPHA)

    for name, (down, up, _) in lora.factors.items():
        weight = dit.get_submodule(name).weight
        assert weight.dtype == torch.float8_e4m3fn
        exact = stored[name] + ALPHA * up @ down
        torch.testing.assert_close(weight.float(), exact, rtol=FP8_STEP / 2, atol=2.0 ** -10)  # one rounding
    merged = {name: dit.get_submodule(name).weight.float() for name in layers}
    pipe.unload_lora(merge)
    for name in layers:  # two roundings, the first at the merged value's magnitude
        error = (dit.get_submodule(name).weight.float() - stored[name]).abs()
        assert (error <= FP8_STEP / 2 * (merged[name].abs() + stored[name].abs()) + 2.0 ** -9).all(), name


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_linear_layers_are_dequantised_merged_and_requantised(pipe, per_channel):
    fp8 = pytest.importorskip("wan_kernels.fp8")
    dit = pipe.dit
    lora = random_lora(dit, seed=7, with_diffs=True)
    dequantized = copy.deepcopy(dit)  # becomes the float32 twin of the fp8 network
    fp8.quantize_fp8(dit, per_channel=per_channel)
    fp8_layers = {name: layer for name, layer in dit.named_modules() if isinstance(layer, fp8.FP8Linear)}
    with torch.no_grad():
        for name, layer in fp8_layers.items():
            dequantized.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
    original = {name: layer.dequantize(torch.float32) for name, layer in fp8_layers.items()}
    expected = by_hand(dequantized, lora, ALPHA)

    merge = pipe.load_lora(dit, FORMATS["comfy_diff"].state_dict(lora), alpha=ALPHA)

    # Each changed weight is the exact float32 sum up to one fp8 rounding at its new scale.
    changed = [name for name in fp8_layers if name in lora.factors or (name, "weight") in lora.diffs]
    assert len(changed) == len(LAYERS)  # every low-rank layer but the conv, plus cross_attn.q's delta
    for name in changed:
        layer, exact = fp8_layers[name], expected.get_submodule(name).weight
        assert layer.weight_fp8.dtype == torch.float8_e4m3fn
        assert layer.scale.shape == ((layer.out_features, 1) if per_channel else ())
        bound = FP8_STEP / 2 * exact.abs() + layer.scale * 2.0 ** -10
        assert ((layer.dequantize(torch.float32) - exact).abs() <= bound * 1.001).all(), name
    torch.testing.assert_close(dit.head.head.bias, expected.head.head.bias, atol=WEIGHT_TOL, rtol=0)
    assert (run(dit) - run(expected)).abs().max() < 0.05 * run(expected).abs().max()  # fp8 error (2-3% seen)

    merged = {name: (fp8_layers[name].dequantize(torch.float32), fp8_layers[name].scale.clone()) for name in changed}
    pipe.unload_lora(merge)
    for name in changed:  # two roundings: at the merged scale, then at the restored one
        layer, (merged_weight, merged_scale) = fp8_layers[name], merged[name]
        restored = layer.dequantize(torch.float32)
        bound = FP8_STEP / 2 * (merged_weight.abs() + restored.abs()) + (merged_scale + layer.scale) * 2.0 ** -10
        assert ((restored - original[name]).abs() <= bound * 1.001).all(), name
