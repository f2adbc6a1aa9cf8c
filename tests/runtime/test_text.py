"""Prompt cleaning and the Prompter (tiny umT5-style tokenizer + tiny umT5 encoder from a tiny release)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import wan_models
from wan_runtime import tiny_release
from wan_models.configs import T5_FILE, T5_TOKENIZER
from wan_runtime.text import Prompter, clean_prompt


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.1-T2V-1.3B")


@pytest.fixture(scope="module")
def prompter(release) -> Prompter:
    encoder = wan_models.load_model(release / T5_FILE, dtype=torch.float32)
    return Prompter.from_folder(release / T5_TOKENIZER, encoder)


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize("raw, clean", [
    ("a cat &amp; a dog", "a cat & a dog"),
    ("a cat &amp;amp; a dog", "a cat & a dog"),          # unescaped twice, as the reference does
    ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
    ("cafÃ© at night", "café at night"),                  # mojibake repaired by ftfy
    ("  a\tcat \n\n running   fast  ", "a cat running fast"),
    ("a\u3000cat\u00a0runs", "a cat runs"),               # unicode spaces collapse too
    ("", ""),
])
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


def test_clean_prompt_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a str, got list"):
        clean_prompt(["a cat"])


# ---------------------------------------------------------------- tokenizing and encoding


def test_tokenize_appends_eos_and_pads_with_zero(prompter):
    ids, mask = prompter.tokenize(["a cat running", ""])
    assert ids.shape == mask.shape == (2, 512) and ids.dtype == mask.dtype == torch.int64
    n = int(mask[0].sum())
    assert n > 1 and ids[0, n - 1] == 1 and (ids[0, : n - 1] > 2).all()    # words, then </s>
    assert (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all() and (mask[0, :n] == 1).all()
    assert ids[1, 0] == 1 and mask[1].sum() == 1                               # the empty prompt is just </s>


def test_tokenize_truncates_long_prompts_keeping_eos(prompter):
    ids, mask = prompter.tokenize("a cat running in the city at night " * 200)
    assert mask.sum() == 512 and ids[0, -1] == 1


def test_encode_shape_and_zero_rows_past_the_prompt(prompter):
    context = prompter.encode("a cat running on the water")
    assert context.shape == (1, 512, tiny_release.TINY_T5.dim) and context.dtype == torch.float32
    n = int(prompter.tokenize("a cat running on the water")[1].sum())
    assert (context[0, n:] == 0).all()
    assert (context[0, :n].abs().sum(-1) > 0).all()


def test_batch_rows_are_zero_past_each_prompt_and_match_single_prompts(prompter):
    prompts = ["a cat", "a blue bird flying over the green tree in the sun"]
    context = prompter.encode(prompts)
    _, mask = prompter.tokenize(prompts)
    for b, prompt in enumerate(prompts):
        n = int(mask[b].sum())
        assert (context[b, n:] == 0).all() and (context[b, :n].abs().sum(-1) > 0).all()
        torch.testing.assert_close(context[b: b + 1], prompter.encode(prompt))
    assert mask[0].sum() != mask[1].sum()


def test_different_prompts_differ_and_cleaning_applies(prompter):
    assert not torch.allclose(prompter.encode("a red cat"), prompter.encode("a blue dog"))
    torch.testing.assert_close(prompter.encode("a  cat &amp; dog\n"), prompter.encode("a cat & dog"), rtol=0, atol=0)


def test_custom_text_len_and_device(release):
    encoder = wan_models.load_model(release / T5_FILE, dtype=torch.float32)
    short = Prompter.from_folder(release / T5_TOKENIZER, encoder, text_len=16)
    context = short.encode(["a cat"], device="cpu")
    assert context.shape == (1, 16, tiny_release.TINY_T5.dim)


def test_encoder_dtype_is_kept(release):
    encoder = wan_models.load_model(release / T5_FILE, dtype=torch.bfloat16)
    assert Prompter.from_folder(release / T5_TOKENIZER, encoder).encode("a cat").dtype == torch.bfloat16


# ---------------------------------------------------------------- errors


def test_missing_or_empty_tokenizer_folder_names_path_and_expected_files(tmp_path, prompter):
    with pytest.raises(FileNotFoundError, match="does not exist.*tokenizer.json and/or spiece.model") as info:
        Prompter.from_folder(tmp_path / "google" / "umt5-xxl", prompter.text_encoder)
    assert str(tmp_path / "google" / "umt5-xxl") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds nothing.*google/umt5-xxl/ folder"):
        Prompter.from_folder(tmp_path / "empty", prompter.text_encoder)


def test_bad_text_len_and_empty_prompt_list(prompter):
    with pytest.raises(ValueError, match="text_len must be a positive int"):
        Prompter(prompter.tokenizer, prompter.text_encoder, text_len=0)
    with pytest.raises(ValueError, match="no prompt given"):
        prompter.encode([])
