"""Folding the text context's trailing zero rows (``wan_models.dit.fold_padding``) changes nothing.

Pipelines pass 512 context rows, those past the prompt zero. The DiT embeds and attends the rows
up to the longest prompt (rounded up to a multiple of 64) plus one zero row whose attention logit
is raised by ``log(count)``. Every test compares against the same model with folding switched off
(``fold_padding`` patched to return the context unchanged: the unfolded computation, each zero row
an ordinary row), on fresh random weights and inputs that are zero only in the padding, in
float32: see :func:`assert_matches` for the tolerance.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import wan_models
from wan_models import dit as dit_module
from wan_models.attention import sdpa_attention
from factories import TINY_DIT, one_thread_fixture, random_dit

ROWS = 200  # context rows given to the DiT (pipelines: text_len = 512)
IMAGE = TINY_DIT.replace(image_input=True, clip_dim=20)
VACE = TINY_DIT.replace(vace_layers=(0,), vace_in_dim=8)

one_thread = one_thread_fixture("module")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """Each element within ``rtol=1e-5``, or ``1e-5`` of the tensor's largest magnitude plus ``1e-6``.

    Folding changes the order of the softmax sums, so the results differ by float32 rounding: up to
    5e-7 of the largest output, 1.5e-5 of the largest gradient (the keys' bias gradients, which
    softmax nearly cancels: about 1e-7 absolute); the unfolded computation is about as far from a float64 run.
    """
    atol = 1e-5 * expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


@contextmanager
def unfolded() -> Iterator[None]:
    """The reference: every context row embedded and attended as an ordinary row."""
    original = dit_module.fold_padding
    dit_module.fold_padding = lambda context: (context, None)
    try:
        yield
    finally:
        dit_module.fold_padding = original


def padded_context(lengths: tuple[int, ...], dim: int, seed: int) -> torch.Tensor:
    """Random ``[B, ROWS, dim]`` context, zero from row ``lengths[b]`` of batch item ``b`` on."""
    context = torch.randn(len(lengths), ROWS, dim, generator=torch.Generator().manual_seed(seed))
    for item, length in enumerate(lengths):
        context[item, length:] = 0
    return context


def inputs(config, lengths: tuple[int, ...], seed: int = 1) -> tuple[tuple, dict]:
    """``(x, t, context), keywords`` for ``config``: the CLIP features or VACE context it needs."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    x = torch.randn(batch, config.in_dim, 3, 4, 6, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    keywords = {}
    if config.image_input:
        keywords["clip_feature"] = torch.randn(batch, 5, config.clip_dim, generator=gen)
    if config.vace_layers:
        keywords["vace_context"] = torch.randn(batch, config.vace_in_dim, 3, 4, 6, generator=gen)
    return (x, t, padded_context(lengths, config.text_dim, seed + 1)), keywords


def test_fold_padding_keeps_the_used_rows_rounded_up() -> None:
    context = padded_context((70, 20), 24, seed=0)
    folded, bias = dit_module.fold_padding(context)
    assert folded.shape == (2, 129, 24)  # 70 -> 128 rows kept, then the one folded row
    assert torch.equal(folded[:, :128], context[:, :128]) and not folded[:, 128].any()
    assert bias.shape == (129,) and not bias[:128].any()
    assert bias[128].item() == pytest.approx(math.log(ROWS - 128))
    for lengths in ((ROWS, 3), (199,)):  # nothing to fold, or a single zero row: context as given
        context = padded_context(lengths, 24, seed=0)
        assert dit_module.fold_padding(context) == (context, None)


CASES = {
    "no_padding": (ROWS,),
    "some_padding": (150,),
    "almost_all_padding": (1,),
    "all_zero": (0,),
    "batch_different_lengths": (70, 20),
    "batch_one_unpadded": (5, ROWS),
    "batch_short": (130, 1),
}


@pytest.mark.parametrize("lengths", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("config", [TINY_DIT, IMAGE, VACE], ids=["t2v", "image", "vace"])
def test_folded_forward_matches_unfolded(config, lengths: tuple[int, ...]) -> None:
    model = random_dit(config, seed=3)
    args, keywords = inputs(config, lengths)
    with torch.no_grad():
        folded = model(*args, **keywords)
        with unfolded():
            reference = model(*args, **keywords)
    assert_matches(folded, reference)


def test_image_attention_split_keeps_the_bias_on_the_text_rows() -> None:
    """DiffSynth's FLF2V split: CLIP rows past ``image_attention_tokens`` join the text attention."""
    model = random_dit(IMAGE, seed=3)
    args, keywords = inputs(IMAGE, (70, 20))
    with torch.no_grad():
        folded = model(*args, **keywords, image_attention_tokens=2)
        with unfolded():
            reference = model(*args, **keywords, image_attention_tokens=2)
    assert_matches(folded, reference)


@pytest.mark.parametrize("config", [TINY_DIT, IMAGE, VACE], ids=["t2v", "image", "vace"])
def test_gradients_match_unfolded(config) -> None:
    """Training: the weights' and the context's gradients (each zero row gets its share)."""
    model = random_dit(config, seed=4).requires_grad_(True)
    (x, t, context), keywords = inputs(config, (70, 20), seed=5)
    weight = torch.randn(x.shape[0], config.out_dim, *x.shape[2:], generator=torch.Generator().manual_seed(6))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        ctx = context.clone().requires_grad_(True)
        (model(x, t, ctx, **keywords) * weight).sum().backward()
        return {"context": ctx.grad, **{name: p.grad for name, p in model.named_parameters()}}

    folded = grads()
    with unfolded():
        reference = grads()
    assert folded["context"][1, 20:].abs().sum() > 0  # zero rows are attended, so they get gradient
    for name, grad in reference.items():
        assert_matches(folded[name], grad, f"{name} gradient")


def test_folded_context_travels_in_dit_inputs() -> None:
    """``prepare`` carries the folded rows with their bias; the stages give the forward's result."""
    model = random_dit(seed=3)
    args, _ = inputs(TINY_DIT, (70, 20))
    with torch.no_grad():
        prepared = model.prepare(*args)
        assert prepared.context.rows.shape[1] == 129 and prepared.context.bias.shape == (129,)
        torch.testing.assert_close(model.finish(model.run_blocks(prepared), prepared), model(*args), rtol=0, atol=0)


@pytest.mark.parametrize("lengths, hooked", [((ROWS,), 2), ((150,), 1)], ids=["no_padding", "padding"])
def test_attention_hook_runs_unless_the_text_attention_has_a_bias(lengths, hooked: int) -> None:
    model = random_dit(seed=3)
    args, _ = inputs(TINY_DIT, lengths)
    calls = []

    def counting(q, k, v):
        calls.append(k.shape[1])
        return sdpa_attention(q, k, v)

    previous = wan_models.set_attention_backend(counting)
    try:
        with torch.no_grad():
            model(*args)
    finally:
        wan_models.set_attention_backend(previous)
    assert len(calls) == hooked * TINY_DIT.num_layers


def test_half_precision_context_is_not_folded() -> None:
    context = torch.zeros(1, 512, 8, dtype=torch.bfloat16)
    context[:, :3] = torch.randn(1, 3, 8).to(torch.bfloat16)
    rows, bias = dit_module.fold_padding(context)
    assert bias is None and rows is context
