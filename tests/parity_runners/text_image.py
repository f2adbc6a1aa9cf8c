"""Parity runners for the umT5 text encoder and the CLIP vision tower (``wan_models.t5`` / ``.clip``)."""

from __future__ import annotations

import torch
from parity_support import ParityCase, Runner

from wan_models.clip import CLIPVisionConfig, CLIPVisionTower, visual_state_dict
from wan_models.t5 import T5Config, UMT5Encoder


def _t5(case: ParityCase) -> UMT5Encoder:
    with torch.device("meta"):
        model = UMT5Encoder(T5Config(**case.config))
    model.load_state_dict(case.weights, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def run_t5_encoder(case: ParityCase) -> dict[str, torch.Tensor]:
    """``out = encoder(ids, mask)``, padded rows included."""
    return {"out": _t5(case)(case.inputs["ids"], case.inputs["mask"])}


@torch.no_grad()
def run_t5_context(case: ParityCase) -> dict[str, torch.Tensor]:
    """The DiT's text context: rows past each prompt zeroed, plus ``seq_lens``."""
    ids = case.inputs["ids"]
    text_len = case.literal_args.get("text_len", ids.size(1))
    if ids.size(1) != text_len:
        raise ValueError(f"{case.name}: ids hold {ids.size(1)} tokens, the case says text_len={text_len}")
    return _t5(case).encode_context(ids, case.inputs["mask"])._asdict()


@torch.no_grad()
def run_clip_vision(case: ParityCase) -> dict[str, torch.Tensor]:
    """Preprocessed ``pixel_values`` and Wan's ``features`` (all blocks but the last)."""
    with torch.device("meta"):
        model = CLIPVisionTower(CLIPVisionConfig.from_official(case.config))
    model.load_state_dict(visual_state_dict(case.weights), strict=True, assign=True)
    model.eval()
    pixel_values = model.preprocess(case.inputs["images"])
    return {"pixel_values": pixel_values, "features": model(pixel_values)}


RUNNERS: dict[str, Runner] = {
    "t5_encoder": run_t5_encoder,
    "t5_context": run_t5_context,
    "clip_vision": run_clip_vision,
}
