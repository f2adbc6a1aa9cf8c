"""Every Wan 2.1 model family trains with the flags of the seed's script for it (tiny random DiTs).

Each run takes two optimizer steps on videos whose metadata carries every conditioning column, then
checks that the checkpoint holds exactly the weights that were trained, under their released names,
and that the checkpointed training forward equals the DiT's own forward on the same inputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_models import MODELS
from wan_models.configs import CLIP_FILE
from wan_runtime import tiny_release
from wan_train import VideoDataset, WanTrainingModule, load_pipeline, parse_args, train

from train.support import model_paths, train_argv, write_csv

# LoRA factors, and each layer's alpha as a scalar (the official layout of wan_runtime.lora.layouts)
LAYER_PART = r"\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\.(lora_[AB]\.weight|alpha)"
LORA_KEY = re.compile(r"blocks" + LAYER_PART)
VACE_LORA_KEY = re.compile(r"vace_blocks" + LAYER_PART)
FILE_COLUMNS = "video,control_video,reference_image,vace_video,vace_reference_image"

# family: (registry model, training flags as in the seed's script, --extra_inputs)
FAMILIES = {
    "i2v": ("Wan2.1-I2V-14B-480P", ["--lora_base_model", "dit"], "input_image"),
    "flf2v": ("Wan2.1-FLF2V-14B-720P", ["--lora_base_model", "dit"], "input_image,end_image"),
    "fun_inp": ("Wan2.1-Fun-1.3B-InP", ["--trainable_models", "dit"], "input_image,end_image"),
    "fun_control": ("Wan2.1-Fun-1.3B-Control", ["--lora_base_model", "dit"], "control_video"),
    "fun_reference": ("Wan2.1-Fun-V1.1-1.3B-Control", ["--lora_base_model", "dit"], "control_video,reference_image"),
    "fun_camera": ("Wan2.1-Fun-V1.1-1.3B-Control-Camera", ["--lora_base_model", "dit"],
                   "input_image,camera_control_direction,camera_control_speed"),
    "vace_full": ("Wan2.1-VACE-1.3B", ["--trainable_models", "vace", "--remove_prefix_in_ckpt", "pipe.vace."],
                  "vace_video,vace_reference_image"),
    "vace_lora": ("Wan2.1-VACE-1.3B", ["--lora_base_model", "vace", "--remove_prefix_in_ckpt", "pipe.vace."],
                  "vace_video,vace_reference_image"),
    "speed": ("Wan2.1-T2V-1.3B", ["--trainable_models", "motion_controller", "--remove_prefix_in_ckpt",
                                  "pipe.motion_controller."], "motion_bucket_id"),
}


@pytest.fixture(scope="module")
def conditioned(dataset: Path, tmp_path_factory) -> Path:
    """Two rows with every conditioning column (files in the shared dataset folder)."""
    folder = tmp_path_factory.mktemp("meta")
    row = {"prompt": "a square", "control_video": "clip1.mp4", "reference_image": "still.png",
           "vace_video": "clip2.mp4", "vace_reference_image": "still.jpg", "camera_control_direction": "Left",
           "camera_control_speed": "0.02", "motion_bucket_id": "30"}
    return write_csv(folder / "all.csv", [{"video": "clip0.mp4", **row},
                                          {"video": "clip1.mp4", **row, "camera_control_direction": "RightDown"}])


def family_files(root: Path, model: str, release: Path) -> tuple[str, list[Path]]:
    """``--model_paths`` for the family (its tiny DiT, in two shards for the 14B models as released, CLIP
    where needed, the T2V umT5/VAE) and the DiT files."""
    spec = MODELS[model]
    folder = root / spec.model_id
    dit = tiny_release.write_dit(folder, tiny_release.tiny_dit_config(model), shards=2 if "14B" in model else 1)
    extra = []
    if spec.needs_image_encoder:
        extra.append(tiny_release.write_clip(folder / CLIP_FILE))
    if model == "Wan2.1-T2V-1.3B":
        extra.append(tiny_release.write_motion_controller(root))
    return model_paths(release, dit if len(dit) > 1 else dit[0], *extra), dit


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains(family: str, release: Path, dataset: Path, conditioned: Path, tmp_path: Path) -> None:
    model, flags, extras = FAMILIES[family]
    paths, dit_files = family_files(tmp_path / "models", model, release)
    args = parse_args(train_argv(release, dataset, tmp_path / "out", *flags, "--extra_inputs", extras,
                                 "--data_file_keys", FILE_COLUMNS, "--lora_rank", "4", "--learning_rate", "1e-3",
                                 metadata=str(conditioned), paths=paths))
    result = train(args)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))

    saved = load_file(result.checkpoints[-1])
    released = {key: value for path in dit_files for key, value in load_file(path).items()}
    if "--lora_base_model" in flags:
        pattern = VACE_LORA_KEY if family == "vace_lora" else LORA_KEY
        assert saved and all(pattern.fullmatch(key) for key in saved), sorted(saved)[:4]
        assert any(value.abs().max() > 0 for key, value in saved.items() if "lora_B" in key)  # B left zero
    elif family == "speed":
        controller = load_file(next((tmp_path / "models").rglob("model.safetensors")))
        assert set(saved) == set(controller)
    elif family == "vace_full":
        assert set(saved) == {key for key in released if key.startswith("vace_")}
    else:
        assert set(saved) == set(released)

    # The training forward (every block checkpointed) is the DiT's forward.
    module = result.module
    data = VideoDataset(str(dataset), str(conditioned), num_frames=5, height=32, width=48,
                        data_file_keys=FILE_COLUMNS.split(","), extra_inputs=extras.split(","))
    inputs = module.prepare_inputs(data[0])
    x, t = torch.randn_like(inputs.input_latents), torch.tensor([500.0])
    with torch.enable_grad():
        trained = module.predict(x, t, inputs.context, inputs.shared)
    with torch.no_grad():
        direct = module.pipeline.dit(x, t, inputs.context, **inputs.shared)
    assert torch.allclose(trained, direct, atol=1e-6)


@pytest.mark.parametrize("model, flags, extras, unused", [
    ("Wan2.1-Fun-V1.1-1.3B-Control", ["--trainable_models", "dit"], "control_video", True),  # ref_conv idle
    ("Wan2.1-Fun-V1.1-1.3B-Control", ["--trainable_models", "dit"], "control_video,reference_image", False),
    ("Wan2.1-Fun-V1.1-1.3B-Control", ["--lora_base_model", "dit"], "control_video", False),
    ("Wan2.1-VACE-1.3B", ["--trainable_models", "dit"], "", True),  # VACE blocks idle
    ("Wan2.1-T2V-1.3B", ["--trainable_models", "dit"], "", False),
])
def test_ddp_unused_parameter_detection(model: str, flags: list[str], extras: str, unused: bool, release: Path,
                                        dataset: Path, tmp_path: Path) -> None:
    """DDP looks for unused parameters exactly when trained weights sit in a part no input runs
    (without it, a 2-process run of the first case fails at step 2: checked by hand)."""
    paths, _ = family_files(tmp_path, model, release)
    args = parse_args(train_argv(release, dataset, tmp_path, *flags, "--extra_inputs", extras, "--data_file_keys",
                                 FILE_COLUMNS, paths=paths))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    assert module.may_leave_parameters_unused() is unused
