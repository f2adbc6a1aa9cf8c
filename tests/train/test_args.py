"""The flags: the seed's names and defaults, and bad values rejected before anything is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wan_train import TrainingError, build_parser, parse_args
from wan_train.args import model_configs

# The seed's train.py flags (DiffSynth-Studio 5f68727a, wan_parser) and their defaults.
SEED_DEFAULTS = {
    "dataset_base_path": "", "dataset_metadata_path": None, "max_pixels": 1280 * 720, "height": None,
    "width": None, "num_frames": 81, "data_file_keys": "image,video", "dataset_repeat": 1, "model_paths": None,
    "model_id_with_origin_paths": None, "learning_rate": 1e-4, "num_epochs": 1, "output_path": "./models",
    "remove_prefix_in_ckpt": "pipe.dit.", "trainable_models": None, "lora_base_model": None,
    "lora_target_modules": "q,k,v,o,ffn.0,ffn.2", "lora_rank": 32, "extra_inputs": None,
    "use_gradient_checkpointing_offload": False, "gradient_accumulation_steps": 1, "max_timestep_boundary": 1.0,
    "min_timestep_boundary": 0.0,
}
BASE = ["--dataset_base_path", "data", "--model_paths", '["dit.safetensors"]', "--lora_base_model", "dit"]


def test_help_lists_the_seed_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "wan_train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in SEED_DEFAULTS:
        assert f"--{flag}" in result.stdout


def test_seed_defaults() -> None:
    """Every seed default, as parsed; the boundary flags are left empty by the parser (so that --expert can
    tell them from given ones) and resolved to the seed's values by parse_args."""
    actions = {a.dest: a for a in build_parser()._actions}
    parsed = vars(parse_args(BASE))
    for name, default in SEED_DEFAULTS.items():
        if name.endswith("timestep_boundary"):
            assert actions[name].default is None and parsed[name] == default, name
        else:
            assert actions[name].default == default, name
    assert actions["dataset_base_path"].required


def test_seed_lora_script_parses() -> None:
    """The seed's lora/Wan2.1-T2V-1.3B.sh flags, unchanged."""
    args = parse_args([
        "--dataset_base_path", "data/example_video_dataset",
        "--dataset_metadata_path", "data/example_video_dataset/metadata.csv", "--height", "480", "--width", "832",
        "--dataset_repeat", "100", "--model_id_with_origin_paths",
        "Wan-AI/Wan2.1-T2V-1.3B:diffusion_pytorch_model*.safetensors,Wan-AI/Wan2.1-T2V-1.3B:models_t5_umt5-xxl-enc-"
        "bf16.pth,Wan-AI/Wan2.1-T2V-1.3B:Wan2.1_VAE.pth", "--learning_rate", "1e-4", "--num_epochs", "5",
        "--remove_prefix_in_ckpt", "pipe.dit.", "--output_path", "./models/train/Wan2.1-T2V-1.3B_lora",
        "--lora_base_model", "dit", "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2", "--lora_rank", "32"])
    configs = model_configs(args)
    assert [(c.model_id, c.origin_file_pattern) for c in configs] == [
        ("Wan-AI/Wan2.1-T2V-1.3B", "diffusion_pytorch_model*.safetensors"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "models_t5_umt5-xxl-enc-bf16.pth"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth")]


def test_model_paths_shards() -> None:
    args = parse_args(["--dataset_base_path", "d", "--trainable_models", "dit",
                       "--model_paths", '["vae.pth", ["a-00001.safetensors", "a-00002.safetensors"]]'])
    assert [c.path for c in model_configs(args)] == ["vae.pth", ["a-00001.safetensors", "a-00002.safetensors"]]


@pytest.mark.parametrize("flags, message", [
    (["--model_paths", "[dit.safetensors]"], "--model_paths is not valid JSON"),
    (["--model_paths", '{"dit": "x"}'], "--model_paths must be a non-empty JSON list"),
    (["--model_paths", '["a", 3]'], "items must be file paths"),
    (["--model_id_with_origin_paths", "Wan-AI/Wan2.1-T2V-1.3B"], "is not model_id:file_pattern"),
    (["--height", "480"], "give both --height and --width"),
    (["--height", "470", "--width", "832"], "--height must be a positive multiple of 16"),
    (["--num_frames", "80"], "4k+1"),
    (["--extra_inputs", "input_image,depth_video"], "unknown --extra_inputs ['depth_video']"),
    (["--trainable_models", "vae"], "unknown --trainable_models ['vae']"),
    (["--lora_base_model", "clip"], "unknown --lora_base_model 'clip'"),
    (["--max_timestep_boundary", "0.0005"], "--min_timestep_boundary < --max_timestep_boundary"),
    (["--cache_latents", "c", "--use_cached", "c"], "pass only one"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--empty_prompt_ratio", "1.0"], "--empty_prompt_ratio must be in [0, 1)"),
    (["--foreground_weight", "0"], "--foreground_weight must be > 0, got 0.0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--batch_size", "4"], "--batch_size 4 stacks samples of one size: set --height and --width"),
])
def test_bad_flags(flags: list[str], message: str) -> None:
    argv = BASE + flags
    if "--lora_base_model" in flags:
        argv = argv[:4] + flags
    with pytest.raises(TrainingError) as info:
        parse_args(argv)
    assert message in str(info.value)


def test_nothing_to_train() -> None:
    with pytest.raises(TrainingError, match="nothing to train"):
        parse_args(BASE[:4])
    with pytest.raises(TrainingError, match="no model given"):
        parse_args(["--dataset_base_path", "d", "--lora_base_model", "dit"])
