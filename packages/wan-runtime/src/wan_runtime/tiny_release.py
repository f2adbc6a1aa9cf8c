"""Tiny random Wan 2.1 and 2.2 releases on disk, in the released folder layout and file names.

For tests, demos and smoke checks where real weights cannot be downloaded: everything loads and
runs exactly like a released model, at a few MB, but generates noise.

``write_release(root, "Wan2.1-T2V-1.3B")`` writes ``root/Wan-AI/Wan2.1-T2V-1.3B/`` with the DiT
(``diffusion_pytorch_model.safetensors`` or ``-0000i-of-0000n`` shards with their index, plus the
official ``config.json``), ``models_t5_umt5-xxl-enc-bf16.pth`` (bf16), ``Wan2.1_VAE.pth``, the
``google/umt5-xxl/`` tokenizer and, for image models, the whole-CLIP file. Sizes are tiny but fit
together: the DiT's ``text_dim`` is the T5 width, its ``clip_dim`` the CLIP width. Weights are seeded,
so the shared T5/VAE/CLIP files are identical in every release written with the same seed, as in
the real repositories. A finished release is marked, and writing it again with the same arguments
returns at once, so a session-scoped fixture can call this freely::

    @pytest.fixture(scope="session")
    def models_root(tmp_path_factory):
        root = tmp_path_factory.mktemp("models")
        tiny_release.write_release(root, "Wan2.1-T2V-1.3B")
        return root

Command line: ``python -m wan_runtime.tiny_release ROOT [MODEL]`` writes one release under ROOT.

The tiny CLIP is 1280 wide (with a narrow MLP, 2 blocks): the head count of a CLIP tower is not
stored in its weights and ``wan_models`` infers it only for the released width. It reads 32-pixel
images in 2-pixel patches, which gives the released 257 tokens per image: the FLF2V DiT's position
embedding is sized for exactly two images of 257 tokens.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

import sentencepiece
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from wan_models import MODELS, DiTConfig, MotionController, MotionControllerConfig, WanDiT
from wan_models.clip import CLIPVisionConfig, CLIPVisionTower
from wan_models.configs import CLIP_FILE, T5_FILE, T5_TOKENIZER, VAE22_FILE, VAE_FILE
from wan_models.t5 import T5Config, UMT5Encoder
from wan_models.vae import VAEConfig, WanVAE
from wan_models.vae22 import VAE22Config, WanVAE22

FACTORY_VERSION = 1
MARKER = ".tiny_release.json"
TOKENIZER_VOCAB = 256
TINY_T5 = T5Config(vocab=320, dim=32, dim_attn=32, dim_ffn=48, num_heads=2, num_layers=2, num_buckets=8)
TINY_VAE = VAEConfig(dim=8)  # z_dim stays 16: latent statistics and DiT channels depend on it
TINY_VAE22 = VAE22Config(dim=4, dec_dim=6)  # z_dim stays 48, as the TI2V DiT's channels
TINY_CLIP = CLIPVisionConfig(embed_dim=16, image_size=32, patch_size=2, vision_dim=1280, vision_mlp_ratio=0.05,
                             vision_heads=16, vision_layers=2)
TINY_DIT_SIZES = dict(dim=32, ffn_dim=48, num_heads=2, num_layers=2, freq_dim=16)
SPEED_CONTROL = "Wan2.1-1.3B-speedcontrol-v1"

# Words the tokenizer is trained on: common prompt words plus generated ones for variety.
PROMPT_WORDS = ("a cat dog bird video of the in on with and running walking flying red blue green sky sun "
                "water tree city night street light camera slowly close up beautiful").split()


def tiny_dit_config(model: str = "Wan2.1-T2V-1.3B", t5_config: T5Config = TINY_T5,
                    clip_config: CLIPVisionConfig = TINY_CLIP) -> DiTConfig:
    """The registry model's DiT variant (channels, image branch, VACE, camera...) at tiny sizes."""
    config = MODELS[model].config
    if not isinstance(config, DiTConfig):
        raise ValueError(f"{model} holds no DiT; use write_motion_controller for {SPEED_CONTROL}")
    return config.replace(**TINY_DIT_SIZES, text_dim=t5_config.dim, clip_dim=clip_config.vision_dim,
                          vace_layers=(0,) if config.vace_layers else ())


def _meta(module_class: type[torch.nn.Module], config: Any) -> torch.nn.Module:
    with torch.device("meta"):
        return module_class(config)


def random_state_dict(module: torch.nn.Module, seed: int,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded N(0, small) values for every tensor of ``module`` (norm scales around 1), non-zero.

    Matrices get std 1/sqrt(fan-in) so that activations stay in range through the tiny networks.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in module.state_dict().items():
        noise = torch.randn(tensor.shape, generator=gen)
        if key.endswith("gamma") or ("norm" in key and key.endswith(".weight")):
            value = 1 + 0.1 * noise
        elif tensor.ndim >= 2:
            fan_in = math.prod(tensor.shape[1:]) if tensor.shape[0] > 1 else tensor.shape[-1]
            value = noise / math.sqrt(fan_in)
        else:
            value = 0.05 * noise
        out[key] = value.to(dtype).contiguous()
    return out


def _model_seed(seed: int, name: str) -> int:
    return seed * 1000 + zlib.crc32(name.encode()) % 1000


def write_dit(folder: Path, config: DiTConfig, seed: int = 0, shards: int = 1) -> list[Path]:
    """The DiT as ``diffusion_pytorch_model*.safetensors`` (float32, as released) plus ``config.json``."""
    sd = random_state_dict(_meta(WanDiT, config), seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    if shards == 1:
        files = {"diffusion_pytorch_model.safetensors": keys}
    else:
        size = math.ceil(len(keys) / shards)
        files = {f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors": keys[i * size:(i + 1) * size]
                 for i in range(shards)}
        weight_map = {key: name for name, part in files.items() for key in part}
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": weight_map}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, part in files.items():
        save_file({key: sd[key] for key in part}, str(folder / name), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(official_config_json(config), indent=2))
    return [folder / name for name in files]


def official_config_json(config: DiTConfig) -> dict[str, Any]:
    """The released ``config.json`` of a DiT (the official ``WanModel``/``VaceWanModel`` kwargs)."""
    if config.family == "wan2.2":
        model_type = config.variant.removeprefix("wan2.2-")
    else:
        model_type = ("vace" if config.vace_layers else "flf2v" if config.image_pos_emb
                      else "i2v" if config.image_input else "t2v")
    out: dict[str, Any] = {
        "_class_name": "VaceWanModel" if config.vace_layers else "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": config.dim, "eps": config.eps, "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim,
        "in_dim": config.in_dim, "model_type": model_type, "num_heads": config.num_heads,
        "num_layers": config.num_layers, "out_dim": config.out_dim, "text_len": config.text_len,
    }
    if config.vace_layers:
        out.update(vace_layers=list(config.vace_layers), vace_in_dim=config.vace_in_dim)
    return out


def write_t5(path: Path, config: T5Config = TINY_T5, seed: int = 0) -> Path:
    """``models_t5_umt5-xxl-enc-bf16.pth``: the encoder's released keys in bfloat16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(_meta(UMT5Encoder, config), _model_seed(seed, T5_FILE), torch.bfloat16), path)
    return path


def write_vae(path: Path, config: VAEConfig = TINY_VAE, seed: int = 0) -> Path:
    """``Wan2.1_VAE.pth`` (float32), or ``Wan2.2_VAE.pth`` for a :class:`VAE22Config` (TI2V-5B's VAE).

    Each keeps the released latent channels (16, 48): the DiTs' channels and latent statistics depend on them.
    """
    wan22 = isinstance(config, VAE22Config)
    module_class, name, z_dim = (WanVAE22, VAE22_FILE, 48) if wan22 else (WanVAE, VAE_FILE, 16)
    if config.z_dim != z_dim:
        raise ValueError(f"the tiny {name} must keep z_dim={z_dim} (the DiT's latent channels), got {config.z_dim}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(_meta(module_class, config), _model_seed(seed, name)), path)
    return path


def write_clip(path: Path, config: CLIPVisionConfig = TINY_CLIP, seed: int = 0) -> Path:
    """The whole-CLIP file: ``visual.*`` of the tower, a few ``textual.*`` tensors and ``log_scale``."""
    tower = random_state_dict(_meta(CLIPVisionTower, config), _model_seed(seed, CLIP_FILE))
    gen = torch.Generator().manual_seed(seed)
    text = {"token_embedding.weight": (50, 8), "type_embedding.weight": (1, 8), "pos_embedding.weight": (16, 8),
            "norm.weight": (8,), "norm.bias": (8,), "blocks.0.attn.q.weight": (8, 8), "head.0.weight": (12, 8)}
    sd = {f"visual.{k}": v for k, v in tower.items()}
    sd.update({f"textual.{k}": 0.1 * torch.randn(shape, generator=gen) for k, shape in text.items()})
    sd["log_scale"] = torch.tensor(math.log(1 / 0.07))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def _training_text(seed: int) -> list[str]:
    rng = random.Random(seed)
    made = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    words = list(PROMPT_WORDS) * 8 + made
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]


def write_tokenizer(folder: Path, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0,
                    texts: Sequence[str] = ()) -> Path:
    """A small umT5-style tokenizer folder: ``spiece.model`` (unigram; pad 0, </s> 1, unk 2), the
    equivalent ``tokenizer.json`` and the T5 tokenizer configs, loadable by ``AutoTokenizer``.

    ``texts`` are trained on besides the generic prompt text (a trained model's captions, so that
    their words become single pieces)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([*texts, *_training_text(seed)]), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    # tokenizer.json as the T5 converter writes it (NFKC standing in for spm's precompiled map), so that
    # no sentencepiece -> tokenizers conversion (which needs protobuf) happens at load time.
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _config_record(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def write_release(root: str | Path, model: str = "Wan2.1-T2V-1.3B", dit_config: DiTConfig | None = None,
                  t5_config: T5Config = TINY_T5, vae_config: VAEConfig = TINY_VAE,
                  clip_config: CLIPVisionConfig = TINY_CLIP, shards: int = 1, seed: int = 0) -> Path:
    """Write the tiny release of registry ``model`` under ``root/<model_id>/``; returns that folder.

    ``dit_config`` defaults to :func:`tiny_dit_config`; ``shards > 1`` splits the DiT as the 14B
    releases are split. Files already written with the same arguments are kept (see the marker).
    """
    spec = MODELS[model]
    if isinstance(spec.config, MotionControllerConfig):
        raise ValueError(f"{model} is a motion controller; use write_motion_controller")
    dit_config = dit_config or tiny_dit_config(model, t5_config, clip_config)
    if dit_config.text_dim != t5_config.dim:
        raise ValueError(f"the DiT's text_dim {dit_config.text_dim} must equal the T5 width {t5_config.dim}")
    if dit_config.image_input and dit_config.clip_dim != clip_config.vision_dim:
        raise ValueError(f"the DiT's clip_dim {dit_config.clip_dim} must equal the CLIP width {clip_config.vision_dim}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    folder = Path(root) / spec.model_id
    record = json.dumps({"version": FACTORY_VERSION, "model": model, "dit": _config_record(dit_config),
                         "t5": _config_record(t5_config), "vae": _config_record(vae_config),
                         "clip": _config_record(clip_config) if spec.needs_image_encoder else None,
                         "shards": shards, "seed": seed}, sort_keys=True, default=str)
    marker = folder / MARKER
    if marker.is_file() and marker.read_text() == record:
        return folder
    if spec.experts:
        for expert in spec.experts:
            write_dit(folder / expert, dit_config, _model_seed(seed, model + expert), shards)
    else:
        write_dit(folder, dit_config, _model_seed(seed, model), shards)
    write_t5(folder / T5_FILE, t5_config, seed)
    if spec.vae_file == VAE22_FILE:
        write_vae(folder / VAE22_FILE, TINY_VAE22, seed)
    else:
        write_vae(folder / VAE_FILE, vae_config, seed)
    write_tokenizer(folder / T5_TOKENIZER, seed=seed)
    if spec.needs_image_encoder:
        write_clip(folder / CLIP_FILE, clip_config, seed)
    marker.write_text(record)
    return folder


def write_motion_controller(root: str | Path, dim: int = TINY_DIT_SIZES["dim"], freq_dim: int = 16,
                            seed: int = 0) -> Path:
    """``root/DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1/model.safetensors`` for a DiT of width ``dim``."""
    spec = MODELS[SPEED_CONTROL]
    path = Path(root) / spec.model_id / spec.files[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    config = MotionControllerConfig(freq_dim=freq_dim, dim=dim)
    save_file(random_state_dict(_meta(MotionController, config), _model_seed(seed, SPEED_CONTROL)), str(path),
              metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m wan_runtime.tiny_release ROOT [MODEL]``: write a tiny random release, print its folder."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Wan 2.1 or 2.2 release in the released layout.")
    parser.add_argument("root", type=Path, help="models folder (the release goes to ROOT/<model id>/)")
    parser.add_argument("model", nargs="?", default="Wan2.1-T2V-1.3B", choices=[m for m in MODELS if m != SPEED_CONTROL])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.stdout.write(f"{write_release(args.root, args.model, seed=args.seed)}\n")


if __name__ == "__main__":
    main()
