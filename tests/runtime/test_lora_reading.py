"""Reading LoRA files at the strength their writer meant, proven against the writers' own code.

diffusers saves a LoRA of a tiny ``WanTransformer3DModel`` (the weights of our tiny DiT converted)
with ``lora_alpha`` != ``r`` and per-layer patterns: merged by us, our DiT computes what diffusers'
transformer computes with the adapter active. The same for a peft adapter folder saved by
``get_peft_model(...).save_pretrained`` on our DiT, and for peft's DoRA. Files in the layouts of
LightX2V / Lightning few-step LoRAs, of our exporter (lora.layouts) and of our trainer's header merge
like the hand-made sum. Bad files raise before anything changes.

Tolerance: outputs within 1e-4 of their largest magnitude (float32; diffusers and peft sum in
another order, and diffusers' timestep sinusoid is float32 where ours is float64).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from factories import TINY_DIT, dit_inputs, random_dit
from wan_models import WanDiT
from wan_models.formats import diffusers as diffusers_format
from wan_models.identity import Identity
from wan_runtime.lora import BASE_KEY, LAYOUTS, merge_lora, parse_lora, save_lora, unmerge_lora

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

REL_TOL = 1e-4
RANK = 4
# Linear layers adapted in the interop cases (our names, then diffusers').
OURS = ["self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2"]
THEIRS = ["attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ffn.net.0.proj", "ffn.net.2"]


def assert_close_outputs(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> None:
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= REL_TOL * scale
    assert (theirs - base).abs().max() > 100 * REL_TOL * scale  # the adapter changes the output


@torch.no_grad()
def ours_out(dit: WanDiT) -> torch.Tensor:
    x, t, ctx = dit_inputs(TINY_DIT, seed=4)
    return dit(x, t, ctx)


@torch.no_grad()
def randomize_adapter(model: torch.nn.Module, seed: int) -> None:
    """Non-zero random LoRA factors (peft starts lora_B at zero) and DoRA magnitudes near the norms."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        elif "lora_magnitude_vector" in name:
            param.mul_(1 + 0.3 * torch.rand(param.shape, generator=gen))


def diffusers_twin(dit: WanDiT) -> torch.nn.Module:
    cfg = diffusers_format.transformer_config(dit.config)
    theirs = diffusers.WanTransformer3DModel.from_config(cfg).eval()
    theirs.load_state_dict(diffusers_format.from_official(dit.state_dict()), strict=True)
    return theirs


@torch.no_grad()
def theirs_out(model: torch.nn.Module) -> torch.Tensor:
    x, t, ctx = dit_inputs(TINY_DIT, seed=4)
    return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample


CONFIGS = {
    "alpha_is_rank": dict(r=RANK, lora_alpha=RANK),
    "alpha_not_rank": dict(r=RANK, lora_alpha=3 * RANK),
    "patterns": dict(r=RANK, lora_alpha=2.0, rank_pattern={"^blocks.0.attn1.to_q": 2, "ffn.net.2": 6},
                     alpha_pattern={"attn2.to_k": 7.0, r"blocks\.1\.ffn\.net\.0\.proj": 0.5}),
}


@pytest.mark.parametrize("saver", ["pipeline", "model"])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_lora_saved_by_diffusers_gives_diffusers_outputs(tmp_path, case, saver):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    dit = random_dit(TINY_DIT, seed=1)
    theirs = diffusers_twin(dit)
    base = theirs_out(theirs)
    theirs.add_adapter(LoraConfig(target_modules=THEIRS, **CONFIGS[case]))
    randomize_adapter(theirs, seed=2)
    expected = theirs_out(theirs)
    if saver == "pipeline":  # keys and header under "transformer."
        diffusers.WanPipeline.save_lora_weights(
            tmp_path, transformer_lora_layers=get_peft_model_state_dict(theirs),
            transformer_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
        path = tmp_path / "pytorch_lora_weights.safetensors"
    else:
        theirs.save_lora_adapter(tmp_path)
        path = next(tmp_path.glob("*.safetensors"))

    merge = merge_lora(dit, path)

    assert len(merge.updates) == len(THEIRS) * TINY_DIT.num_layers
    assert_close_outputs(ours_out(dit), expected, base)


@pytest.mark.parametrize("by", ["folder", "file"])
def test_a_peft_adapter_folder_gives_peft_outputs(tmp_path, by):
    from peft import LoraConfig, get_peft_model

    dit = random_dit(TINY_DIT, seed=3)
    base = ours_out(dit)
    config = LoraConfig(r=RANK, lora_alpha=10, target_modules=OURS, rank_pattern={"blocks.1.ffn.0": 3},
                        alpha_pattern={"^blocks.0.self_attn.o": 1.5}, use_rslora=by == "file")
    model = get_peft_model(copy.deepcopy(dit), config)
    randomize_adapter(model, seed=4)
    expected = ours_out(model.base_model.model)
    model.save_pretrained(tmp_path)

    merge_lora(dit, tmp_path if by == "folder" else tmp_path / "adapter_model.safetensors")

    assert_close_outputs(ours_out(dit), expected, base)


def test_dora_merges_as_peft_computes_it_and_unmerges_exactly(tmp_path):
    from peft import LoraConfig, get_peft_model

    dit = random_dit(TINY_DIT, seed=5)
    original, base = copy.deepcopy(dit), ours_out(dit)
    model = get_peft_model(copy.deepcopy(dit), LoraConfig(r=RANK, lora_alpha=6, target_modules=OURS, use_dora=True))
    randomize_adapter(model, seed=6)
    expected = ours_out(model.base_model.model)
    model.save_pretrained(tmp_path)

    merge = merge_lora(dit, tmp_path)

    assert_close_outputs(ours_out(dit), expected, base)
    unmerge_lora(dit, merge)
    for key, value in dit.state_dict().items():
        torch.testing.assert_close(value, original.state_dict()[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layer", ["blocks.0.ffn.0", "blocks.0.self_attn.q"])  # [48, 32] and square [32, 32]
def test_kohya_dora_scale_per_input_channel_and_strength(layer):
    """LyCORIS' default: a [1, in] magnitude, one per input channel; strength a blends W + a (W_dora - W)."""
    dit = random_dit(TINY_DIT, seed=7)
    param = dit.get_parameter(f"{layer}.weight")
    weight = param.detach().clone()
    gen = torch.Generator().manual_seed(8)
    down, up = torch.randn(2, 32, generator=gen), torch.randn(weight.shape[0], 2, generator=gen)
    magnitude = torch.rand(1, 32, generator=gen) + 0.5
    name = "lora_unet_" + layer.replace(".", "_")
    state = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0),
             f"{name}.dora_scale": magnitude}
    combined = weight + 0.5 * up @ down
    dora = combined * magnitude / combined.norm(dim=0, keepdim=True)
    expected = weight + 0.6 * (dora - weight)

    merge = merge_lora(dit, state, alpha=0.6)

    torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5)
    unmerge_lora(dit, merge)
    torch.testing.assert_close(param.detach(), weight, atol=1e-6, rtol=1e-6)


def test_a_dora_merge_fixes_the_unmerge_order():
    dit = random_dit(TINY_DIT, seed=9)
    original = copy.deepcopy(dit)
    gen = torch.Generator().manual_seed(10)
    plain = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 32, generator=gen),
             "blocks.0.self_attn.q.lora_B.weight": torch.randn(32, 2, generator=gen)}
    dora = {key: torch.randn(value.shape, generator=gen) for key, value in plain.items()}
    dora["blocks.0.self_attn.q.lora_magnitude_vector.weight"] = torch.rand(32, generator=gen) + 0.5
    first, second = merge_lora(dit, plain), merge_lora(dit, dora)

    with pytest.raises(ValueError, match="unmerge LoRA <state dict> first.*blocks.0.self_attn.q.weight"):
        unmerge_lora(dit, first)
    unmerge_lora(dit, second)
    unmerge_lora(dit, first)
    torch.testing.assert_close(dit.blocks[0].self_attn.q.weight, original.blocks[0].self_attn.q.weight,
                               atol=1e-6, rtol=1e-6)


def factors(seed: int, layers: dict[str, tuple[int, int]], rank: int = 2) -> dict[str, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(rank, n_in, generator=gen) * 0.3, torch.randn(n_out, rank, generator=gen) * 0.3)
            for name, (n_out, n_in) in layers.items()}


@torch.no_grad()
def by_hand(dit: WanDiT, low_rank: dict, scales: dict[str, float], deltas: dict[str, torch.Tensor]) -> WanDiT:
    ref = copy.deepcopy(dit)
    params = dict(ref.named_parameters())
    for name, (down, up) in low_rank.items():
        params[f"{name}.weight"] += scales[name] * up @ down
    for name, delta in deltas.items():
        params[name] += delta
    return ref


def max_diff(a: WanDiT, b: WanDiT) -> float:
    sb = b.state_dict()
    return max((v - sb[k]).abs().max().item() for k, v in a.state_dict().items())


SHAPES = {"blocks.0.self_attn.q": (32, 32), "blocks.1.cross_attn.v": (32, 32), "blocks.0.ffn.2": (32, 48),
          "head.head": (64, 32), "text_embedding.0": (32, 24), "time_embedding.0": (32, 16),
          "time_projection.1": (192, 32)}


@pytest.mark.parametrize("factor_names", [("lora_down", "lora_up"), ("lora_A", "lora_B")])
def test_few_step_lora_layouts_merge(factor_names):
    """LightX2V / Lightning files: diffusion_model. prefix, factors with .alpha, and deltas on norms
    (.diff), biases (.diff_b) and modulation tables (.diff_m, LightX2V's name)."""
    dit = random_dit(TINY_DIT, seed=11)
    low_rank = factors(12, SHAPES)
    gen = torch.Generator().manual_seed(13)
    params = dict(dit.named_parameters())
    deltas = {name: torch.randn(params[name].shape, generator=gen) * 0.1 for name in (
        "blocks.0.norm3.weight", "blocks.1.self_attn.norm_k.weight", "blocks.0.self_attn.q.bias",
        "head.head.bias", "blocks.1.modulation", "head.modulation")}
    down, up = factor_names
    state = {}
    for name, (a, b) in low_rank.items():
        state |= {f"diffusion_model.{name}.{down}.weight": a, f"diffusion_model.{name}.{up}.weight": b,
                  f"diffusion_model.{name}.alpha": torch.tensor(8.0)}
    renamed = {"blocks.0.norm3.weight": "blocks.0.norm3.diff", "blocks.1.self_attn.norm_k.weight":
               "blocks.1.self_attn.norm_k.diff", "blocks.0.self_attn.q.bias": "blocks.0.self_attn.q.diff_b",
               "head.head.bias": "head.head.diff_b", "blocks.1.modulation": "blocks.1.diff_m",
               "head.modulation": "head.diff_m"}
    state |= {f"diffusion_model.{renamed[name]}": delta for name, delta in deltas.items()}
    expected = by_hand(dit, low_rank, {name: 8.0 / 2 for name in low_rank}, deltas)

    merge_lora(dit, state)

    assert max_diff(dit, expected) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_our_exports_and_trainer_header_merge_at_their_scale(tmp_path, layout):
    dit = random_dit(TINY_DIT, seed=14)
    low_rank = factors(15, {name: SHAPES[name] for name in ("blocks.0.self_attn.q", "blocks.0.ffn.2")}, rank=4)
    state = {f"{name}.{part}.weight": t for name, (a, b) in low_rank.items() for part, t in (("lora_A", a), ("lora_B", b))}
    bias = torch.randn(32, generator=torch.Generator().manual_seed(16))  # diffusers: lora_B.bias / scale
    path = save_lora(tmp_path / "x.safetensors", {**state, "blocks.0.ffn.2.diff_b": bias}, layout, alpha=6.0)
    expected = by_hand(dit, low_rank, {name: 6.0 / 4 for name in low_rank}, {"blocks.0.ffn.2.bias": bias})

    merge_lora(dit, path)
    assert max_diff(dit, expected) < 1e-6

    save_file(state, tmp_path / "trained.safetensors", metadata={"lora_rank": "4", "lora_alpha": "6"})
    assert parse_lora(tmp_path / "trained.safetensors", dit).low_rank["blocks.0.ffn.2"].scale == 6.0 / 4


def test_an_alpha_tensor_wins_over_a_header_with_a_warning(tmp_path, caplog):
    dit = random_dit(TINY_DIT, seed=16)
    (a, b), = factors(17, {"blocks.0.self_attn.q": (32, 32)}).values()
    state = {"blocks.0.self_attn.q.lora_A.weight": a, "blocks.0.self_attn.q.lora_B.weight": b,
             "blocks.0.self_attn.q.alpha": torch.tensor(3.0)}
    save_file(state, tmp_path / "both.safetensors", metadata={"lora_alpha": "8", "lora_rank": "2"})
    with caplog.at_level(logging.WARNING):
        parsed = parse_lora(tmp_path / "both.safetensors", dit)
    assert parsed.low_rank["blocks.0.self_attn.q"].scale == 3.0 / 2
    assert "its .alpha tensor says 3, header lora_alpha/lora_rank says 8; using the tensor" in caplog.text


def unchanged_after(dit: WanDiT, lora, match: str) -> None:
    before = copy.deepcopy(dit.state_dict())
    with pytest.raises(ValueError, match=match):
        merge_lora(dit, lora)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_a_lora_for_another_model_size_names_the_size_and_the_models():
    dit = random_dit(TINY_DIT, seed=18)
    gen = torch.Generator().manual_seed(19)
    wide = {"diffusion_model.blocks.29.self_attn.q.lora_down.weight": torch.randn(2, 1536, generator=gen),
            "diffusion_model.blocks.29.self_attn.q.lora_up.weight": torch.randn(1536, 2, generator=gen),
            "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, 1536, generator=gen),
            "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(8960, 2, generator=gen)}
    unchanged_after(dit, wide, r"fits a DiT of dim 1536, ffn_dim 8960 with at least 30 blocks \(Wan2\.1-T2V-1\.3B"
                               r".*this DiT has dim 32, ffn_dim 48 with 2 blocks"
                               r"[\s\S]*'diffusion_model.blocks.0.ffn.0.lora_up.weight': up \(8960, 2\)")
    (a, b), = factors(20, {"blocks.5.self_attn.q": (32, 32)}).values()  # fits the width; block 5 is missing
    deep = {"blocks.5.self_attn.q.lora_A.weight": a, "blocks.5.self_attn.q.lora_B.weight": b}
    unchanged_after(dit, deep, r"at least 6 blocks .*this DiT has dim 32, ffn_dim 48 with 2 blocks[\s\S]*"
                               r"'blocks.5.self_attn.q.lora_A.weight' names no layer")


@pytest.mark.parametrize("naming", ["official", "diffusers", "kohya"])
def test_the_size_a_lora_fits_is_read_alike_in_every_naming(naming):
    """A Wan2.1-T2V-14B LoRA touching only cross-attention and the FFN output, in three namings: the merge
    error and `wan info`'s reading (lora.fit.lora_shape) give the same size and the same registry models."""
    from wan_runtime.lora.fit import lora_shape

    dit = random_dit(TINY_DIT, seed=23)
    layers = {"blocks.39.cross_attn.k": (5120, 5120), "blocks.0.ffn.2": (5120, 13824)}
    name = {"official": lambda n, p: f"{n}.lora_{p}.weight",
            "diffusers": lambda n, p: "transformer." + diffusers_format.DIT_KEYS.rename(f"{n}.weight").removesuffix(
                ".weight") + f".lora_{p}.weight",
            "kohya": lambda n, p: "lora_unet_" + n.replace(".", "_") + (".lora_down.weight" if p == "A" else
                                                                         ".lora_up.weight")}[naming]
    state = {}
    for layer, (down, up) in factors(24, layers, rank=1).items():
        state[name(layer, "A")], state[name(layer, "B")] = down, up
    shape = lora_shape(state)
    assert (shape.sizes, shape.num_layers, shape.unknown) == ({"dim": 5120, "ffn_dim": 13824}, 40, [])
    assert "Wan2.1-T2V-14B" in shape.models() and "Wan2.2-T2V-A14B (either expert)" in shape.models()
    assert not any("1.3B" in model or "5B" in model for model in shape.models())
    unchanged_after(dit, state, r"fits a DiT of dim 5120, ffn_dim 13824 with at least 40 blocks \(.*Wan2\.1-T2V-14B"
                                r".*\); this DiT has dim 32, ffn_dim 48 with 2 blocks")


def test_vace_keys_on_a_dit_without_vace_blocks():
    dit = random_dit(TINY_DIT, seed=21)
    (a, b), = factors(22, {"x": (32, 32)}).values()
    state = {"vace_blocks.0.self_attn.q.lora_A.weight": a, "vace_blocks.0.self_attn.q.lora_B.weight": b}
    unchanged_after(dit, state, r"2 keys adapt VACE blocks .*no VACE blocks; load a VACE model \(.*Wan2\.1-VACE-1\.3B")


def test_ranks_that_do_not_fit(tmp_path):
    dit = random_dit(TINY_DIT, seed=23)
    (a, b), = factors(24, {"blocks.0.self_attn.k": (32, 32)}).values()
    unchanged_after(dit, {"blocks.0.self_attn.k.lora_A.weight": a, "blocks.0.self_attn.k.lora_B.weight": b[:, :1]},
                    r"'blocks.0.self_attn.k.lora_A.weight' \(2, 32\) and 'blocks.0.self_attn.k.lora_B.weight' "
                    r"\(32, 1\) are not factors of one rank")
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 4})}
    save_file({"transformer.blocks.0.attn1.to_k.lora_A.weight": a, "transformer.blocks.0.attn1.to_k.lora_B.weight": b},
              tmp_path / "lying.safetensors", metadata=header)
    unchanged_after(dit, tmp_path / "lying.safetensors", r"layer 'transformer.blocks.0.attn1.to_k' has rank 2 in its "
                                                         r"tensors but rank 4 in header lora_adapter_metadata")


def test_family_and_expert_info_lines(tmp_path, caplog):
    dit = random_dit(TINY_DIT.replace(family="wan2.2"), seed=25)
    dit.identity = Identity("wan2.2", "low")
    (a, b), = factors(26, {"x": (32, 32)}).values()
    base = {"family": "wan2.1", "expert": "high", "variant": "t2v", "dim": 32, "num_layers": 2,
            "model": "Wan2.1-T2V-14B"}
    save_file({"blocks.0.self_attn.q.lora_A.weight": a, "blocks.0.self_attn.q.lora_B.weight": b},
              tmp_path / "x.safetensors", metadata={BASE_KEY: json.dumps(base)})
    with caplog.at_level(logging.INFO, logger="wan_runtime.lora"):
        merge_lora(dit, tmp_path / "x.safetensors")
    assert "a wan2.1 LoRA (for Wan2.1-T2V-14B) merged into a wan2.2 DiT" in caplog.text
    assert "trained for the high-noise expert merged into the low-noise expert" in caplog.text
