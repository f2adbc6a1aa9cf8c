"""A Wan2.2-A14B expert pair generates the same from diffusers' pipeline folder and from ComfyUI's
single files as from the released layout: the roles come from ``model_index.json`` and the file
names, not from the order the files are given in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wan_models
from wan_models.configs import VAE_FILE
from wan_models.formats.diffusers_pipeline import write_pipeline
from wan_models.loading import read_checkpoint
from wan_runtime import tiny_release

from factories import load_tiny_pipeline, one_thread_fixture

one_thread = one_thread_fixture("module")
A14B = "Wan2.2-T2V-A14B"
SETTINGS = dict(prompt="a red cat", negative_prompt="blurry", seed=5, num_inference_steps=4, sampler="unipc",
                sigma_shift=12.0, cfg_scale=4.0, cfg_scale_2=3.0, switch_DiT_boundary=0.875, height=32, width=32,
                num_frames=5, output_type="latent", progress_bar_cmd=lambda x: x)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    # Head dim 128, as every released DiT: files without a config.json (ComfyUI's) give heads = dim / 128.
    config = tiny_release.tiny_dit_config(A14B).replace(dim=128, num_heads=1)
    return tiny_release.write_release(tmp_path_factory.mktemp("models"), A14B, dit_config=config)


@pytest.fixture(scope="module")
def reference(release) -> torch.Tensor:
    pipe = load_tiny_pipeline(release, [release / "high_noise_model", release / "low_noise_model"])
    return pipe(**SETTINGS)


def expert(release: Path, role: str):
    ckpt = read_checkpoint(release / f"{role}_noise_model")
    return ckpt.config, ckpt.state_dict


def test_a_diffusers_pipeline_folder(release, reference, tmp_path) -> None:
    folder = write_pipeline(tmp_path / "Wan2.2-T2V-A14B-Diffusers",
                            {"high": expert(release, "high"), "low": expert(release, "low")}, boundary_ratio=0.875)
    # transformer_2 (low-noise) given first: model_index.json says which is which.
    pipe = load_tiny_pipeline(release, [folder / "transformer_2", folder / "transformer"], VAE_FILE)
    assert (pipe.dit.identity.expert, pipe.dit2.identity.expert) == ("high", "low")
    torch.testing.assert_close(pipe(**SETTINGS), reference, rtol=1e-4, atol=1e-5)  # float32 rounding


def test_comfyui_single_files(release, reference, tmp_path) -> None:
    files = []
    for role in ("low", "high"):  # low-noise first: the file names say which is which
        _, sd = expert(release, role)
        path = tmp_path / f"wan2.2_t2v_{role}_noise_14B_fp16.safetensors"
        save_file({k: v.contiguous() for k, v in wan_models.convert(sd, to="comfy").items()}, path)
        files.append(path)
    pipe = load_tiny_pipeline(release, files, VAE_FILE)
    assert (pipe.dit.identity.expert, pipe.dit2.identity.expert) == ("high", "low")
    torch.testing.assert_close(pipe(**SETTINGS), reference, rtol=1e-4, atol=1e-5)  # float32 rounding
