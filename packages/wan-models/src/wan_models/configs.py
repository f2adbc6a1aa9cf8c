"""The released Wan 2.1 models: real sizes, repositories and checkpoint file names (plain data).

Every DiT has head dim 128, patch (1, 2, 2), freq_dim 256, text_dim 4096, text_len 512 and CLIP
width 1280; the shared T5 encoder, VAE and CLIP files are the same in every repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dit_config import DiTConfig, MotionControllerConfig

DIT_FILES = "diffusion_pytorch_model*.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
T5_TOKENIZER = "google/umt5-xxl/"
CLIP_TOKENIZER = "xlm-roberta-large/"


@dataclass(frozen=True)
class ModelSpec:
    """One released model: where it lives and which network files it needs.

    ``files`` are glob patterns relative to the repository root (a trailing ``/`` is a folder).
    ``config`` is the network its main file holds (a DiT, or the speed-control motion controller).
    """

    name: str
    model_id: str
    config: DiTConfig | MotionControllerConfig
    files: tuple[str, ...]
    base_model: str | None = None

    @property
    def needs_image_encoder(self) -> bool:
        return isinstance(self.config, DiTConfig) and self.config.image_input


SIZE_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
SIZE_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
IMAGE = dict(image_input=True)
TEXT_FILES = (DIT_FILES, T5_FILE, VAE_FILE, T5_TOKENIZER)
IMAGE_FILES = TEXT_FILES + (CLIP_FILE,)


def _spec(name: str, model_id: str, files: tuple[str, ...] = TEXT_FILES, **config) -> ModelSpec:
    return ModelSpec(name, model_id, DiTConfig(**config), files)


_SPECS = [
    _spec("Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B", **SIZE_1_3B),
    _spec("Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B", **SIZE_14B),
    _spec("Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-480P", IMAGE_FILES, in_dim=36, **SIZE_14B, **IMAGE),
    _spec("Wan2.1-I2V-14B-720P", "Wan-AI/Wan2.1-I2V-14B-720P", IMAGE_FILES, in_dim=36, **SIZE_14B, **IMAGE),
    _spec("Wan2.1-FLF2V-14B-720P", "Wan-AI/Wan2.1-FLF2V-14B-720P", IMAGE_FILES, in_dim=36, **SIZE_14B,
          image_input=True, image_pos_emb=True),
    _spec("Wan2.1-Fun-1.3B-InP", "PAI/Wan2.1-Fun-1.3B-InP", IMAGE_FILES, in_dim=36, **SIZE_1_3B, **IMAGE),
    _spec("Wan2.1-Fun-14B-InP", "PAI/Wan2.1-Fun-14B-InP", IMAGE_FILES, in_dim=36, **SIZE_14B, **IMAGE),
    _spec("Wan2.1-Fun-1.3B-Control", "PAI/Wan2.1-Fun-1.3B-Control", IMAGE_FILES, in_dim=48, **SIZE_1_3B, **IMAGE),
    _spec("Wan2.1-Fun-14B-Control", "PAI/Wan2.1-Fun-14B-Control", IMAGE_FILES, in_dim=48, **SIZE_14B, **IMAGE),
    _spec("Wan2.1-Fun-V1.1-1.3B-Control", "PAI/Wan2.1-Fun-V1.1-1.3B-Control", IMAGE_FILES, in_dim=48,
          **SIZE_1_3B, **IMAGE, ref_conv=True),
    _spec("Wan2.1-Fun-V1.1-14B-Control", "PAI/Wan2.1-Fun-V1.1-14B-Control", IMAGE_FILES, in_dim=48,
          **SIZE_14B, **IMAGE, ref_conv=True),
    _spec("Wan2.1-Fun-V1.1-1.3B-Control-Camera", "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera", IMAGE_FILES,
          in_dim=32, **SIZE_1_3B, **IMAGE, camera_in_dim=24),
    _spec("Wan2.1-Fun-V1.1-14B-Control-Camera", "PAI/Wan2.1-Fun-V1.1-14B-Control-Camera", IMAGE_FILES,
          in_dim=32, **SIZE_14B, **IMAGE, camera_in_dim=24),
    _spec("Wan2.1-VACE-1.3B-Preview", "iic/VACE-Wan2.1-1.3B-Preview", **SIZE_1_3B,
          vace_layers=tuple(range(0, 30, 2))),
    _spec("Wan2.1-VACE-1.3B", "Wan-AI/Wan2.1-VACE-1.3B", **SIZE_1_3B, vace_layers=tuple(range(0, 30, 2))),
    _spec("Wan2.1-VACE-14B", "Wan-AI/Wan2.1-VACE-14B", **SIZE_14B, vace_layers=tuple(range(0, 40, 5))),
    ModelSpec("Wan2.1-1.3B-speedcontrol-v1", "DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1",
              MotionControllerConfig(freq_dim=256, dim=1536), ("model.safetensors",),
              base_model="Wan2.1-T2V-1.3B"),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry called ``name``; the error lists every known name."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
