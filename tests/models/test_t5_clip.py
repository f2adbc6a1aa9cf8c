"""Behaviour of the umT5 encoder and the CLIP vision tower on tiny configs (parity lives in test_parity)."""

from __future__ import annotations

import logging

import pytest
import torch

from wan_models.attention import sdpa_attention, set_attention_backend
from wan_models.clip import (CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionTower, visual_state_dict)
from wan_models.clip import config_from_state_dict as clip_config_from_state_dict
from wan_models.t5 import T5Config, UMT5Encoder, relative_position_buckets
from wan_models.t5 import config_from_state_dict as t5_config_from_state_dict

TINY_T5 = T5Config(vocab=50, dim=16, dim_attn=24, dim_ffn=40, num_heads=3, num_layers=2, num_buckets=8)
TINY_CLIP = CLIPVisionConfig(embed_dim=12, image_size=28, patch_size=7, vision_dim=16, vision_heads=2,
                             vision_layers=3)


def _tiny_t5(seed: int = 0) -> UMT5Encoder:
    torch.manual_seed(seed)
    model = UMT5Encoder(TINY_T5).eval()
    with torch.no_grad():  # non-trivial norm scales so the checks are not blind to them
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def _tiny_clip(seed: int = 0) -> CLIPVisionTower:
    torch.manual_seed(seed)
    return CLIPVisionTower(TINY_CLIP).eval()


def _prompts(lengths: list[int], total: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0, last token </s> = 1) and their mask, like the umT5 tokenizer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(2, vocab, (n - 1,), generator=g)
        ids[b, n - 1] = 1
        mask[b, :n] = 1
    return ids, mask


def _full_clip_state_dict(tower: CLIPVisionTower) -> dict[str, torch.Tensor]:
    """A stand-in for the released whole-CLIP file: visual.*, a few textual.* tensors and log_scale."""
    sd = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    sd["textual.token_embedding.weight"] = torch.randn(10, 8)
    sd["textual.blocks.0.attn.q.weight"] = torch.randn(8, 8)
    sd["textual.head.0.weight"] = torch.randn(8, 8)
    sd["log_scale"] = torch.tensor(2.6593)
    return sd


# ---------------------------------------------------------------- umT5


def test_t5_meta_build_and_assign_load_reproduces_outputs():
    source = _tiny_t5()
    with torch.device("meta"):
        model = UMT5Encoder(TINY_T5)
    assert not list(model.buffers())
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    model.eval()
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids, mask = _prompts([5, 9], 12, TINY_T5.vocab)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), source(ids, mask), rtol=0, atol=0)


def test_t5_state_dict_keys_are_the_released_ones():
    keys = set(UMT5Encoder(TINY_T5).state_dict())
    block = {"norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
             "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
             "pos_embedding.embedding.weight"}
    expected = {"token_embedding.weight", "norm.weight"}
    expected.update(f"blocks.{i}.{k}" for i in range(2) for k in block)
    assert keys == expected


def test_t5_config_from_released_size_state_dict():
    with torch.device("meta"):
        sd = UMT5Encoder(T5Config()).state_dict()
    cfg = t5_config_from_state_dict(sd)
    assert cfg == T5Config()
    assert (cfg.vocab, cfg.dim, cfg.dim_ffn, cfg.num_heads, cfg.num_layers) == (256384, 4096, 10240, 64, 24)
    assert t5_config_from_state_dict(UMT5Encoder(TINY_T5).state_dict()) == TINY_T5


def test_t5_config_from_state_dict_rejects_foreign_dicts():
    with pytest.raises(ValueError, match="missing"):
        t5_config_from_state_dict(_tiny_clip().state_dict())
    sd = UMT5Encoder(TINY_T5).state_dict()
    shared = dict(sd, **{"pos_embedding.embedding.weight": torch.zeros(8, 3)})
    with pytest.raises(ValueError, match=r"pos_embedding\.embedding\.weight"):
        t5_config_from_state_dict(shared)
    del sd["blocks.1.ffn.fc2.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.fc2\.weight"):
        t5_config_from_state_dict(sd)


def test_t5_config_rejects_shared_positions_and_bad_heads():
    with pytest.raises(ValueError, match="shared_pos"):
        T5Config(shared_pos=True)
    with pytest.raises(ValueError, match="divisible"):
        T5Config(dim_attn=100, num_heads=3)


def test_t5_context_zeroes_rows_past_each_prompt():
    model = _tiny_t5()
    ids, mask = _prompts([4, 11, 1], 16, TINY_T5.vocab)
    with torch.no_grad():
        full = model(ids, mask)
        context, seq_lens = model.encode_context(ids, mask)
    assert seq_lens.tolist() == [4, 11, 1] and seq_lens.dtype == torch.long
    for b, n in enumerate(seq_lens.tolist()):
        assert torch.equal(context[b, :n], full[b, :n])
        assert not context[b, n:].any()
        assert full[b, n:].abs().sum() > 0  # the plain forward keeps padded rows


def test_t5_padding_does_not_reach_real_tokens():
    model = _tiny_t5()
    ids, mask = _prompts([6], 10, TINY_T5.vocab)
    other = ids.clone()
    other[0, 6:] = torch.arange(10, 14)
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
    torch.testing.assert_close(a[0, :6], b[0, :6], rtol=0, atol=0)


def test_t5_relative_buckets_shape_sign_split_and_clamp():
    num_buckets, half = 32, 16
    b = relative_position_buckets(300, num_buckets, torch.device("cpu"))
    assert b.shape == (300, 300) and b.dtype == torch.long
    assert int(b.min()) == 0 and int(b.max()) == num_buckets - 1
    # Row 0 holds offsets 0..299 (keys after the query), column 0 offsets 0..-299.
    after, before = b[0], b[:, 0]
    assert after[0] == 0 and after[1:].min() >= half and torch.all(before < half)
    assert before[:8].tolist() == list(range(8))  # exact below num_buckets / 4
    assert torch.all(before.diff() >= 0) and torch.all(after[1:].diff() >= 0)
    assert torch.all(before[128:] == half - 1) and torch.all(after[128:] == num_buckets - 1)


def test_t5_rejects_bad_inputs():
    model = _tiny_t5()
    ids, mask = _prompts([3], 6, TINY_T5.vocab)
    with pytest.raises(ValueError, match="integer"):
        model(ids.float(), mask)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(ids[0], mask[0])
    with pytest.raises(ValueError, match="lie in"):
        model(torch.full_like(ids, TINY_T5.vocab), mask)
    with pytest.raises(ValueError, match="lie in"):
        model(torch.full_like(ids, -1), mask)
    with pytest.raises(ValueError, match="mask shape"):
        model(ids, mask[:, :4])


def test_t5_bfloat16_runs_in_bfloat16():
    model = _tiny_t5()
    ids, mask = _prompts([5, 8], 8, TINY_T5.vocab)
    with torch.no_grad():
        ref = model(ids, mask)
        out = model.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# ---------------------------------------------------------------- CLIP vision


def test_clip_meta_build_and_load_from_full_released_layout(caplog):
    source = _tiny_clip()
    full = _full_clip_state_dict(source)
    with caplog.at_level(logging.DEBUG, logger="wan_models.clip"):
        sd = visual_state_dict(full)
    assert "dropped 4" in caplog.text
    assert set(sd) == set(source.state_dict())
    with torch.device("meta"):
        model = CLIPVisionTower(clip_config_from_state_dict(full, vision_heads=2))
    assert not list(model.buffers())
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    images = torch.rand(2, 3, 19, 33) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), source.encode_image(images), rtol=0, atol=0)


def test_clip_visual_state_dict_passes_tower_dicts_and_rejects_strays():
    tower_sd = _tiny_clip().state_dict()
    assert visual_state_dict(tower_sd).keys() == tower_sd.keys()
    stray = dict(_full_clip_state_dict(_tiny_clip()), **{"logit_bias": torch.zeros(())})
    with pytest.raises(ValueError, match="logit_bias"):
        visual_state_dict(stray)


def test_clip_config_from_released_size_state_dict():
    with torch.device("meta"):
        tower = CLIPVisionTower(CLIPVisionConfig())
    full = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    full["textual.token_embedding.weight"] = torch.empty(250002, 1024, device="meta")
    full["log_scale"] = torch.empty((), device="meta")
    cfg = clip_config_from_state_dict(full)
    assert cfg == CLIPVisionConfig()
    sizes = (cfg.image_size, cfg.patch_size, cfg.vision_dim, cfg.vision_layers, cfg.embed_dim, cfg.num_tokens)
    assert sizes == (224, 14, 1280, 32, 1024, 257)


def test_clip_config_from_state_dict_errors():
    with pytest.raises(ValueError, match="missing"):
        clip_config_from_state_dict(UMT5Encoder(TINY_T5).state_dict())
    with pytest.raises(ValueError, match="vision_heads"):
        clip_config_from_state_dict(_tiny_clip().state_dict())
    sd = _tiny_clip().state_dict()
    del sd["transformer.1.mlp.2.bias"]
    with pytest.raises(ValueError, match=r"transformer\.1\.mlp\.2\.bias"):
        clip_config_from_state_dict(sd, vision_heads=2)


def test_clip_config_from_official_kwargs():
    official = dict(embed_dim=12, image_size=28, patch_size=7, vision_dim=16, vision_mlp_ratio=4,
                    vision_heads=2, vision_layers=3, vision_pool="token", activation="gelu",
                    vocab_size=100, text_dim=32, text_layers=1, norm_eps=1e-5)
    assert CLIPVisionConfig.from_official(official) == TINY_CLIP
    with pytest.raises(ValueError, match="unknown"):
        CLIPVisionConfig.from_official(dict(official, vision_width=3))
    with pytest.raises(ValueError, match="unsupported"):
        CLIPVisionConfig.from_official(dict(official, vision_pool="attn_pool"))
    with pytest.raises(ValueError, match="multiple"):
        CLIPVisionConfig(image_size=30, patch_size=7)


def test_clip_preprocess_shape_range_and_constant_images():
    model = _tiny_clip()
    images = torch.empty(2, 3, 37, 53)
    images[0].fill_(-1.0)
    images[1].fill_(0.5)
    before = images.clone()
    pixels = model.preprocess(images)
    assert torch.equal(images, before)  # the caller's tensor is not modified
    assert pixels.shape == (2, 3, 28, 28) and pixels.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    for b, value in enumerate((0.0, 0.75)):  # [-1, 1] -> [0, 1]
        want = ((value - mean) / std).view(3, 1, 1).expand(3, 28, 28)
        torch.testing.assert_close(pixels[b], want)
    same_size = model.preprocess(torch.zeros(1, 3, 28, 28))
    torch.testing.assert_close(same_size[0, :, 0, 0], (0.5 - mean) / std)


def test_clip_features_skip_the_last_block_and_use_the_attention_hook():
    model = _tiny_clip()
    pixels = model.preprocess(torch.rand(1, 3, 28, 28) * 2 - 1)
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return sdpa_attention(q, k, v)

    previous = set_attention_backend(counting)
    try:
        with torch.no_grad():
            features = model(pixels)
    finally:
        set_attention_backend(previous)
    assert features.shape == (1, TINY_CLIP.num_tokens, TINY_CLIP.vision_dim)
    assert calls == [(1, TINY_CLIP.num_tokens, 2, 8)] * (TINY_CLIP.vision_layers - 1)
    with torch.no_grad():
        for p in [*model.transformer[-1].parameters(), *model.post_norm.parameters(), model.head]:
            p.add_(1.0)
        torch.testing.assert_close(model(pixels), features, rtol=0, atol=0)


def test_clip_rejects_bad_inputs():
    model = _tiny_clip()
    with pytest.raises(ValueError, match="images"):
        model.preprocess(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="images"):
        model.preprocess(torch.zeros(1, 4, 28, 28))
    with pytest.raises(ValueError, match="images"):
        model.preprocess(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.zeros(1, 3, 32, 32))
