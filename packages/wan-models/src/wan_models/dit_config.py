"""Configuration of the Wan 2.1 / 2.2 diffusion transformer and its variants, as plain data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping

CLIP_TOKENS_PER_IMAGE = 257
FAMILIES = ("wan2.1", "wan2.2")


@dataclass(frozen=True)
class DiTConfig:
    """Sizes and optional parts of one DiT; defaults are Wan2.1-T2V-1.3B.

    ``image_input`` adds the CLIP image branch (``img_emb``, ``k_img``/``v_img``), ``image_pos_emb``
    the first+last-frame position table (FLF2V), ``ref_conv`` the Fun V1.1 reference-image conv,
    ``camera_in_dim`` the Fun Control-Camera adapter, ``vace_layers`` the VACE hint blocks.
    ``family`` is "wan2.1" or "wan2.2": a Wan 2.2 DiT never has the CLIP branch (``image_input``
    False) whatever its channels, so the 36-channel I2V-A14B expert takes ``y`` without CLIP and
    the 48-channel TI2V-5B takes neither; the blocks are the same.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_input: bool = False
    image_pos_emb: bool = False
    clip_dim: int = 1280
    ref_conv: bool = False
    camera_in_dim: int | None = None
    vace_layers: tuple[int, ...] = field(default=())
    vace_in_dim: int = 96
    family: str = "wan2.1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "vace_layers", tuple(self.vace_layers))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for RoPE")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown DiT family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if self.family == "wan2.2" and self.image_input:
            raise ValueError("Wan 2.2 DiTs have no CLIP image branch: image_input must be False")
        if self.image_pos_emb and not self.image_input:
            raise ValueError("image_pos_emb (FLF2V) needs image_input=True")
        bad = [i for i in self.vace_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"vace_layers {bad} outside 0..{self.num_layers - 1}")
        if self.vace_layers and 0 not in self.vace_layers:
            raise ValueError(f"vace_layers must include layer 0, got {list(self.vace_layers)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def y_channels(self) -> int:
        """Channels of the conditioning ``y`` concatenated to the noise (I2V: 4 mask + 16 latents)."""
        return self.in_dim - self.out_dim

    @property
    def conditioning(self) -> str:
        """What ``y`` carries, so no caller does channel arithmetic: "none"; "image" (4 mask channels
        + image latents: I2V, FLF2V, Fun InP, the I2V-A14B expert); "control" (control-video latents +
        image latents: Fun Control); "camera" (first-frame latents beside the camera adapter);
        "other" for a channel count no released model has."""
        if not self.y_channels:
            return "none"
        if self.camera_in_dim is not None:
            return "camera"
        if self.y_channels == 2 * self.out_dim:
            return "control"
        return "image" if self.y_channels == self.out_dim + 4 else "other"

    @property
    def fuses_image_latents(self) -> bool:
        """TI2V: an input image's latents replace the noise of latent frame 0 instead of entering as ``y``."""
        return self.family == "wan2.2" and self.in_dim == self.out_dim and self.out_dim != 16

    @property
    def per_token_timesteps(self) -> bool:
        """Whether the sampler passes ``t`` per token (``[B, L]``): TI2V gives the image's tokens timestep 0.
        Any DiT accepts per-token ``t``; the others are sampled with one ``t`` per video."""
        return self.fuses_image_latents

    @property
    def variant(self) -> str:
        """Short label of the architecture variant (for logs and tables)."""
        if self.family == "wan2.2":
            return "wan2.2-" + ("ti2v" if self.fuses_image_latents else "i2v" if self.y_channels else "t2v")
        if self.vace_layers:
            return "vace"
        if self.camera_in_dim is not None:
            return "fun-camera"
        if self.ref_conv:
            return "fun-v1.1-control"
        if self.image_pos_emb:
            return "flf2v"
        if self.image_input:
            return "i2v" if self.in_dim == 36 else "fun-control" if self.in_dim == 48 else "image-input"
        return "t2v"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "DiTConfig":
        return DiTConfig(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_official(cls, kwargs: dict[str, Any], clip_dim: int = 1280,
                      family: str | None = None) -> "DiTConfig":
        """From the official ``WanModel``/``VaceWanModel`` kwargs (the released ``config.json``).

        ``family`` None means "wan2.2" for model_type ti2v, else "wan2.1"; a Wan 2.2 i2v or t2v expert
        has the same ``config.json`` fields as Wan 2.1, so its caller must say ``family="wan2.2"``.
        """
        kw = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        model_type = kw.pop("model_type", "t2v")
        family = family or ("wan2.2" if model_type == "ti2v" else "wan2.1")
        known = ("t2v", "i2v", "ti2v") if family == "wan2.2" else ("t2v", "i2v", "flf2v", "vace")
        if model_type not in known:
            raise ValueError(f"unknown official {family} model_type {model_type!r}; expected {', '.join(known)}")
        window = tuple(kw.pop("window_size", (-1, -1)))
        if window != (-1, -1):
            raise ValueError(f"local attention window {window} is not used by any released model")
        num_layers = kw.get("num_layers", 32)
        vace_layers = kw.pop("vace_layers", None)
        if model_type == "vace" and vace_layers is None:
            vace_layers = list(range(0, num_layers, 2))
        vace_in_dim = kw.pop("vace_in_dim", None)
        return cls(
            **{k: kw[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                                  "text_dim", "text_len", "freq_dim", "patch_size", "eps", "qk_norm",
                                  "cross_attn_norm") if k in kw},
            image_input=family == "wan2.1" and model_type in ("i2v", "flf2v"),
            image_pos_emb=model_type == "flf2v",
            clip_dim=clip_dim,
            vace_layers=tuple(vace_layers or ()),
            vace_in_dim=96 if vace_in_dim is None else vace_in_dim,
            family=family,
        )

    @classmethod
    def from_diffsynth(cls, kwargs: dict[str, Any], clip_dim: int = 1280,
                       vace: dict[str, Any] | None = None, family: str | None = None) -> "DiTConfig":
        """From DiffSynth ``WanModel`` kwargs (plus its separate ``VaceWanModel`` kwargs, if any).

        DiffSynth marks TI2V-5B with ``seperated_timestep`` and ``fuse_vae_embedding_in_latents``
        and the I2V-A14B expert with ``require_clip_embedding: False``; its T2V-A14B kwargs equal
        Wan2.1-T2V-14B's, so ``family`` must say "wan2.2" for that one.
        """
        wan22_flags = sorted(k for k in ("seperated_timestep", "fuse_vae_embedding_in_latents") if kwargs.get(k))
        no_clip_image = kwargs.get("require_clip_embedding") is False and kwargs.get("in_dim", 16) != kwargs.get(
            "out_dim", 16)
        if kwargs.get("has_image_input") and kwargs.get("require_clip_embedding") is False:
            raise ValueError("has_image_input with require_clip_embedding False: an image branch that takes no CLIP "
                             "features is no released Wan model")
        if wan22_flags != [] and wan22_flags != ["fuse_vae_embedding_in_latents", "seperated_timestep"]:
            raise ValueError(f"{wan22_flags[0]} without its partner: TI2V-5B sets both seperated_timestep and "
                             "fuse_vae_embedding_in_latents")
        decided = "wan2.2" if wan22_flags or no_clip_image else None
        if family is not None and decided is not None and family != decided:
            raise ValueError(f"these DiffSynth kwargs describe a {decided} DiT, not {family}")
        family = decided or family or "wan2.1"
        return cls(
            **{k: kwargs[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                                      "text_dim", "freq_dim", "patch_size", "eps") if k in kwargs},
            image_input=kwargs.get("has_image_input", False),
            image_pos_emb=kwargs.get("has_image_pos_emb", False),
            clip_dim=clip_dim,
            ref_conv=kwargs.get("has_ref_conv", False),
            camera_in_dim=kwargs.get("in_dim_control_adapter", 24) if kwargs.get("add_control_adapter") else None,
            vace_layers=tuple((vace or {}).get("vace_layers", ())),
            vace_in_dim=(vace or {}).get("vace_in_dim", 96),
            family=family,
        )


@dataclass(frozen=True)
class MotionControllerConfig:
    """Speed-control motion controller: sinusoid of the motion bucket id -> 6*dim modulation offset."""

    freq_dim: int = 256
    dim: int = 1536


def _count_indexed(keys: Iterable[str], prefix: str) -> int:
    """Number of ``prefix.N.`` entries (N = 0, 1, ...) among ``keys``."""
    indices = {int(k[len(prefix) + 1:].split(".", 1)[0]) for k in keys if k.startswith(prefix + ".")}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix}.N keys are not numbered 0..{len(indices) - 1}: {sorted(indices)[:10]}")
    return len(indices)


def dit_config_from_state_dict(sd: Mapping[str, Any], num_heads: int | None = None,
                               text_len: int = 512) -> DiTConfig:
    """Infer a :class:`DiTConfig` from released key names and tensor shapes.

    Heads cannot be read from shapes; every released DiT has head dim 128, which is assumed unless
    ``num_heads`` is given (the official ``config.json`` beside a checkpoint states it). A width
    that is no multiple of 128 falls back to a single head. Shapes no Wan 2.1 DiT has mark a Wan 2.2
    DiT: 48 output channels (TI2V-5B), or 36 input channels without CLIP, reference, camera or VACE
    inputs (I2V-A14B expert). A Wan 2.2 T2V expert has Wan2.1-T2V-14B's shapes and reads as "wan2.1".
    """
    required = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                "blocks.0.ffn.0.weight", "head.head.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not a Wan DiT state dict: missing {missing}")
    patch = sd["patch_embedding.weight"].shape
    dim, in_dim, patch_size = patch[0], patch[1], tuple(patch[2:])
    vace_blocks = _count_indexed(sd, "vace_blocks")
    num_layers = _count_indexed(sd, "blocks")
    camera = sd.get("control_adapter.conv.weight")
    clip = sd.get("img_emb.proj.0.weight")
    out_dim = sd["head.head.weight"].shape[0] // math.prod(patch_size)
    plain = clip is None and camera is None and not vace_blocks and "ref_conv.weight" not in sd
    wan22 = plain and (out_dim == 48 or in_dim == 36)
    return DiTConfig(
        dim=dim,
        in_dim=in_dim,
        patch_size=patch_size,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        num_heads=num_heads or (dim // 128 if dim % 128 == 0 else 1),
        text_len=text_len,
        num_layers=num_layers,
        out_dim=out_dim,
        text_dim=sd["text_embedding.0.weight"].shape[1],
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        image_input=clip is not None,
        image_pos_emb="img_emb.emb_pos" in sd,
        clip_dim=clip.shape[0] if clip is not None else 1280,
        ref_conv="ref_conv.weight" in sd,
        camera_in_dim=camera.shape[1] // 64 if camera is not None else None,
        # Released VACE files place their blocks evenly from layer 0 (every 2nd of 30, every 5th of 40).
        vace_layers=tuple(range(0, num_layers, num_layers // vace_blocks))[:vace_blocks] if vace_blocks else (),
        vace_in_dim=sd["vace_patch_embedding.weight"].shape[1] if vace_blocks else 96,
        family="wan2.2" if wan22 else "wan2.1",
    )


def motion_controller_config_from_state_dict(sd: Mapping[str, Any]) -> MotionControllerConfig:
    """Sizes of a speed-control motion controller from its ``linear.{0,2,4}`` weights."""
    if sorted(sd) != sorted(f"linear.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")):
        raise ValueError(f"not a motion controller state dict: keys {sorted(sd)[:8]}")
    freq_dim = sd["linear.0.weight"].shape[1]
    return MotionControllerConfig(freq_dim=freq_dim, dim=sd["linear.0.weight"].shape[0])
