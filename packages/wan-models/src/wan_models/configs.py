"""The released Wan 2.1 and 2.2 models: real sizes, repositories, checkpoint files and sampling
settings (plain data): the official ones, or DiffSynth-Studio's defaults for models shipped without any.

Every DiT has head dim 128, patch (1, 2, 2), freq_dim 256, text_dim 4096, text_len 512 and CLIP
width 1280; the shared T5 encoder, VAE and CLIP files are the same in every repository. The Wan 2.2
A14B models are two DiTs of one config, the high-noise expert in ``high_noise_model/`` and the
low-noise one in ``low_noise_model/``; they keep the Wan 2.1 VAE, while TI2V-5B has its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dit_config import DiTConfig, MotionControllerConfig

DIT_FILES = "diffusion_pytorch_model*.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
VAE22_FILE = "Wan2.2_VAE.pth"
EXPERT_FOLDERS = ("high_noise_model/", "low_noise_model/")  # (high-noise, low-noise)
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
T5_TOKENIZER = "google/umt5-xxl/"
CLIP_TOKENIZER = "xlm-roberta-large/"


@dataclass(frozen=True)
class Sampling:
    """A model's sampling settings: the official repository's (``generate.py``, ``wan/configs``), or
    DiffSynth-Studio's pipeline defaults (:data:`DIFFSYNTH_SAMPLING`) for models released without any.

    ``guidance`` is one scale, or (low-noise, high-noise) for an expert pair; ``boundary`` is the
    switch point as a fraction of 1000 timesteps (the high-noise expert runs while t >= boundary*1000).
    ``sizes`` are (height, width) pairs; ``samplers`` the solvers it ships with, the default first.
    """

    frames: int
    fps: int
    sizes: tuple[tuple[int, int], ...]
    steps: int
    shift: float
    guidance: float | tuple[float, float]
    boundary: float | None = None
    samplers: tuple[str, ...] = ("unipc", "dpmpp")

    @property
    def default_sampler(self) -> str:
        """The solver to use when none is named (the first of ``samplers``)."""
        return self.samplers[0]


@dataclass(frozen=True)
class ModelSpec:
    """One released model: where it lives and which network files it needs.

    ``model_id`` is its ModelScope repository, ``hf_id`` its Hugging Face Hub one (None: the same id).
    ``files`` are glob patterns relative to the repository root (a trailing ``/`` is a folder).
    ``config`` is the network its main file holds (a DiT, or the speed-control motion controller);
    ``experts`` the folders of an expert pair's DiTs (high-noise first), which share ``config``.
    """

    name: str
    model_id: str
    config: DiTConfig | MotionControllerConfig
    files: tuple[str, ...]
    base_model: str | None = None
    experts: tuple[str, ...] = ()
    sampling: Sampling | None = None
    hf_id: str | None = None

    def __post_init__(self) -> None:
        if self.hf_id is None:
            object.__setattr__(self, "hf_id", self.model_id)

    @property
    def needs_image_encoder(self) -> bool:
        return isinstance(self.config, DiTConfig) and self.config.image_input

    @property
    def family(self) -> str:
        """"wan2.1" or "wan2.2" (a motion controller belongs to its Wan 2.1 base model)."""
        return self.config.family if isinstance(self.config, DiTConfig) else "wan2.1"

    @property
    def vae_file(self) -> str:
        """The VAE file this model decodes with."""
        return VAE22_FILE if VAE22_FILE in self.files else VAE_FILE


SIZE_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
SIZE_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
IMAGE = dict(image_input=True)
TEXT_FILES = (DIT_FILES, T5_FILE, VAE_FILE, T5_TOKENIZER)
IMAGE_FILES = TEXT_FILES + (CLIP_FILE,)


SIZES_480 = ((480, 832), (832, 480))
SIZES_720 = ((720, 1280), (1280, 720))
SIZES_480_720 = SIZES_480 + SIZES_720
SIZES_720_480 = SIZES_720 + SIZES_480


def _official(sizes: tuple[tuple[int, int], ...], steps: int = 50, shift: float = 5.0,
              guidance: float = 5.0) -> Sampling:
    """The official Wan 2.1 ``generate.py`` settings: 81 frames at 16 fps, UniPC (or DPM++)."""
    return Sampling(frames=81, fps=16, sizes=sizes, steps=steps, shift=shift, guidance=guidance)


# The official generate.py samples 50 steps (40 for image-to-video) with guidance 5 and shift 5
# (3 for image-to-video at 480p, 16 for FLF2V and VACE); its README recommends guidance 6 and a
# shift of 8 to 12 for T2V-1.3B. The PAI Fun models and speed control ship no settings: these are
# DiffSynth-Studio's WanVideoPipeline defaults, and the 15 fps its examples write.
DIFFSYNTH_SAMPLING = Sampling(frames=81, fps=15, sizes=((480, 832),), steps=50, shift=5.0, guidance=5.0,
                              samplers=("euler",))
T2V_1_3B_SAMPLING = _official(SIZES_480, shift=8.0, guidance=6.0)
VACE_1_3B_SAMPLING = _official(SIZES_480, shift=16.0)


def _spec(name: str, model_id: str, files: tuple[str, ...] = TEXT_FILES, hf_id: str | None = None,
          sampling: Sampling = DIFFSYNTH_SAMPLING, **config) -> ModelSpec:
    return ModelSpec(name, model_id, DiTConfig(**config), files, hf_id=hf_id, sampling=sampling)


_SPECS = [
    _spec("Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B", sampling=T2V_1_3B_SAMPLING, **SIZE_1_3B),
    _spec("Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B", sampling=_official(SIZES_720_480), **SIZE_14B),
    _spec("Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-480P", IMAGE_FILES, in_dim=36, **SIZE_14B, **IMAGE,
          sampling=_official(SIZES_480, steps=40, shift=3.0)),
    _spec("Wan2.1-I2V-14B-720P", "Wan-AI/Wan2.1-I2V-14B-720P", IMAGE_FILES, in_dim=36, **SIZE_14B, **IMAGE,
          sampling=_official(SIZES_720, steps=40)),
    _spec("Wan2.1-FLF2V-14B-720P", "Wan-AI/Wan2.1-FLF2V-14B-720P", IMAGE_FILES, in_dim=36, **SIZE_14B,
          image_input=True, image_pos_emb=True, sampling=_official(SIZES_720_480, shift=16.0)),
    _spec("Wan2.1-Fun-1.3B-InP", "PAI/Wan2.1-Fun-1.3B-InP", IMAGE_FILES, in_dim=36, **SIZE_1_3B, **IMAGE,
          hf_id="alibaba-pai/Wan2.1-Fun-1.3B-InP"),
    _spec("Wan2.1-Fun-14B-InP", "PAI/Wan2.1-Fun-14B-InP", IMAGE_FILES, in_dim=36, **SIZE_14B, **IMAGE,
          hf_id="alibaba-pai/Wan2.1-Fun-14B-InP"),
    _spec("Wan2.1-Fun-1.3B-Control", "PAI/Wan2.1-Fun-1.3B-Control", IMAGE_FILES, in_dim=48, **SIZE_1_3B, **IMAGE,
          hf_id="alibaba-pai/Wan2.1-Fun-1.3B-Control"),
    _spec("Wan2.1-Fun-14B-Control", "PAI/Wan2.1-Fun-14B-Control", IMAGE_FILES, in_dim=48, **SIZE_14B, **IMAGE,
          hf_id="alibaba-pai/Wan2.1-Fun-14B-Control"),
    _spec("Wan2.1-Fun-V1.1-1.3B-Control", "PAI/Wan2.1-Fun-V1.1-1.3B-Control", IMAGE_FILES, in_dim=48,
          **SIZE_1_3B, **IMAGE, ref_conv=True, hf_id="alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control"),
    _spec("Wan2.1-Fun-V1.1-14B-Control", "PAI/Wan2.1-Fun-V1.1-14B-Control", IMAGE_FILES, in_dim=48,
          **SIZE_14B, **IMAGE, ref_conv=True, hf_id="alibaba-pai/Wan2.1-Fun-V1.1-14B-Control"),
    _spec("Wan2.1-Fun-V1.1-1.3B-Control-Camera", "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera", IMAGE_FILES,
          in_dim=32, **SIZE_1_3B, **IMAGE, camera_in_dim=24, hf_id="alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control-Camera"),
    _spec("Wan2.1-Fun-V1.1-14B-Control-Camera", "PAI/Wan2.1-Fun-V1.1-14B-Control-Camera", IMAGE_FILES,
          in_dim=32, **SIZE_14B, **IMAGE, camera_in_dim=24, hf_id="alibaba-pai/Wan2.1-Fun-V1.1-14B-Control-Camera"),
    _spec("Wan2.1-VACE-1.3B-Preview", "iic/VACE-Wan2.1-1.3B-Preview", **SIZE_1_3B,
          vace_layers=tuple(range(0, 30, 2)), hf_id="ali-vilab/VACE-Wan2.1-1.3B-Preview", sampling=VACE_1_3B_SAMPLING),
    _spec("Wan2.1-VACE-1.3B", "Wan-AI/Wan2.1-VACE-1.3B", **SIZE_1_3B, vace_layers=tuple(range(0, 30, 2)),
          sampling=VACE_1_3B_SAMPLING),
    _spec("Wan2.1-VACE-14B", "Wan-AI/Wan2.1-VACE-14B", **SIZE_14B, vace_layers=tuple(range(0, 40, 5)),
          sampling=_official(SIZES_720_480, shift=16.0)),
    ModelSpec("Wan2.1-1.3B-speedcontrol-v1", "DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1",
              MotionControllerConfig(freq_dim=256, dim=1536), ("model.safetensors",),
              base_model="Wan2.1-T2V-1.3B", sampling=DIFFSYNTH_SAMPLING),
]

SIZE_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)
WAN22 = dict(family="wan2.2")
_EXPERT_FILES = tuple(f"{folder}{name}" for folder in EXPERT_FOLDERS for name in (DIT_FILES, "config.json"))

_SPECS += [
    ModelSpec("Wan2.2-TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B",
              DiTConfig(in_dim=48, out_dim=48, **SIZE_5B, **WAN22),
              (DIT_FILES, "config.json", T5_FILE, VAE22_FILE, T5_TOKENIZER),
              sampling=Sampling(frames=121, fps=24, sizes=((704, 1280), (1280, 704)), steps=50, shift=5.0,
                                guidance=5.0)),
    ModelSpec("Wan2.2-T2V-A14B", "Wan-AI/Wan2.2-T2V-A14B", DiTConfig(**SIZE_14B, **WAN22),
              _EXPERT_FILES + (T5_FILE, VAE_FILE, T5_TOKENIZER), experts=EXPERT_FOLDERS,
              sampling=Sampling(frames=81, fps=16, sizes=SIZES_480_720, steps=40, shift=12.0, guidance=(3.0, 4.0),
                                boundary=0.875)),
    ModelSpec("Wan2.2-I2V-A14B", "Wan-AI/Wan2.2-I2V-A14B", DiTConfig(in_dim=36, **SIZE_14B, **WAN22),
              _EXPERT_FILES + (T5_FILE, VAE_FILE, T5_TOKENIZER), experts=EXPERT_FOLDERS,
              sampling=Sampling(frames=81, fps=16, sizes=SIZES_480_720, steps=40, shift=5.0, guidance=(3.5, 3.5),
                                boundary=0.900)),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry called ``name``; the error lists every known name."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
