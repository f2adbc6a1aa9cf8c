"""Text conditioning: the prompt (and, with CFG, the negative prompt) through umT5."""

from __future__ import annotations

import torch

from ..finite import check_finite
from . import Conditioning


def _check_embeds(name: str, value) -> None:
    """Caller-given embeddings must be a tensor of finite values (the DiT checks their shape)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [1, L, text_dim], got {type(value).__name__}")
    check_finite(value, name)


def prompt(pipe, request, cond: Conditioning) -> None:
    """``context [1, 512, 4096]`` per branch; embeddings passed by the caller are used as given."""
    given_pos = request.extra.get("prompt_embeds")
    given_neg = request.extra.get("negative_prompt_embeds")
    for name, value in (("prompt_embeds", given_pos), ("negative_prompt_embeds", given_neg)):
        if value is not None:
            _check_embeds(name, value)
    if (given_pos is None or (request.uses_cfg and given_neg is None)) and pipe.prompter is None:
        raise ValueError("no text encoder is loaded: load models_t5_umt5-xxl-enc-bf16.pth and the tokenizer, "
                         "or pass prompt_embeds (and negative_prompt_embeds with cfg_scale != 1)")
    cond.positive["context"] = (given_pos if given_pos is not None
                                else pipe.prompter.encode(request.prompt, device=pipe.device))
    if request.uses_cfg:
        cond.negative["context"] = (given_neg if given_neg is not None
                                    else pipe.prompter.encode(request.negative_prompt, device=pipe.device))
    for branch in (cond.positive, cond.negative):
        if "context" in branch:
            branch["context"] = branch["context"].to(device=pipe.device, dtype=pipe.torch_dtype)
