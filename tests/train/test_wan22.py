"""Wan 2.2 training on tiny releases: one A14B expert at a time (the other never read), TI2V-5B image-to-video
(frame 0 held at t=0 and left out of the loss, checked against a computation written out here), provenance
in and beside every checkpoint, the latent cache, resume and bad input."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from factories import tiny_releases
from wan_models import get_model_spec
from wan_models.configs import T5_FILE, VAE22_FILE, VAE_FILE
from wan_runtime import ModelConfig
from wan_runtime.lora.layouts import ARGS_KEY, BASE_KEY
from wan_train import TrainingError, WanTrainingModule, build_cache, load_pipeline, parse_args, train
from wan_train.experts import expert_range, select_expert_files
from wan_train.module import training_scheduler

from train.support import (FRAMES, WEIGHT_TOLERANCE, free_port, launch, logged_losses, max_difference,
                           sigkill_after_saves, train_until_killed, write_csv)

log = logging.getLogger(__name__)
TI2V, T2V, I2V = "Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"
HIGH, LOW = "high_noise_model", "low_noise_model"
DIT = "diffusion_pytorch_model.safetensors"
TI2V_SIZE, A14B_SIZE = (32, 64), (32, 48)  # TI2V: multiples of 32 (VAE stride 16 x patch 2)
EVAL_SEEDS = range(8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_releases(tmp_path_factory, TI2V, T2V, I2V) / "Wan-AI"


@pytest.fixture(scope="module")
def videos(dataset: Path, tmp_path_factory) -> str:
    """Metadata of the three videos of ``dataset`` (image-to-video needs frames after the first)."""
    path = tmp_path_factory.mktemp("meta") / "videos.csv"
    write_csv(path, [{"video": f"clip{i}.mp4", "prompt": f"square {i}"} for i in range(3)])
    return str(path)


def argv(folder: Path, dits: list[Path], dataset: Path, output: Path, *extra: str, metadata: str = "metadata.csv",
         size: tuple[int, int] | None = None) -> list[str]:
    """Flags of a small float32 run on the release ``folder`` with the DiT files ``dits``."""
    vae = VAE22_FILE if (folder / VAE22_FILE).is_file() else VAE_FILE
    height, width = size or (TI2V_SIZE if vae == VAE22_FILE else A14B_SIZE)
    paths = json.dumps([*map(str, dits), str(folder / T5_FILE), str(folder / vae)])
    return ["--dataset_base_path", str(dataset), "--dataset_metadata_path", str(dataset / metadata),
            "--height", str(height), "--width", str(width), "--num_frames", str(FRAMES), "--model_paths", paths,
            "--output_path", str(output), "--torch_dtype", "float32", "--dataset_num_workers", "0",
            "--disable_progress_bar", *extra]


def ti2v_argv(models: Path, dataset: Path, output: Path, *extra: str, **kw) -> list[str]:
    return argv(models / TI2V, [models / TI2V / DIT], dataset, output, "--extra_inputs", "input_image", *extra, **kw)


def pair_argv(models: Path, name: str, dataset: Path, output: Path, *extra: str, **kw) -> list[str]:
    folder = models / name
    return argv(folder, [folder / HIGH / DIT, folder / LOW / DIT], dataset, output, *extra, **kw)


def eval_loss(module: WanTrainingModule, inputs) -> float:
    with torch.no_grad():
        return sum(module.loss(inputs, seed).item() for seed in EVAL_SEEDS) / len(EVAL_SEEDS)


def overfit(argv_: list[str], sample: dict) -> tuple[float, float, object]:
    """Eval loss of ``sample`` (fixed seeds) before and after the run ``argv_`` trains on it."""
    args = parse_args(argv_)
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    with torch.no_grad():
        inputs = module.prepare_inputs(sample)
    before = eval_loss(module, inputs)
    result = train(args)
    after = eval_loss(result.module, inputs)
    log.info("overfit: eval loss %.4f -> %.4f; step losses %s", before, after, [round(x, 3) for x in result.losses])
    return before, after, result


def one_sample(dataset: Path, size: tuple[int, int]) -> dict:
    from wan_train import VideoDataset

    return VideoDataset(str(dataset), str(dataset / "one.csv"), num_frames=FRAMES, height=size[0], width=size[1])[0]


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# -- the timestep ranges ------------------------------------------------------------------------------------------


def test_expert_ranges_are_the_published_flags() -> None:
    """From the registry boundary and our shift-5 training schedule: DiffSynth's documented values."""
    timesteps = training_scheduler().timesteps
    t2v, i2v = get_model_spec(T2V).sampling.boundary, get_model_spec(I2V).sampling.boundary
    assert expert_range("high", t2v, timesteps) == (0.0, 0.417)
    assert expert_range("low", t2v, timesteps) == (0.417, 1.0)
    assert expert_range("high", i2v, timesteps) == (0.0, 0.358)
    assert expert_range("low", i2v, timesteps) == (0.358, 1.0)
    # What the indices mean: the last high-noise index still has t >= 875, the first low-noise one not.
    assert timesteps[416] >= 875 > timesteps[417] and timesteps[357] >= 900 > timesteps[358]


# -- one expert -----------------------------------------------------------------------------------------------------


def test_expert_file_selection_by_path(tmp_path: Path) -> None:
    """Hub patterns as DiffSynth's scripts write them, ComfyUI file names and diffusers folders: decided from the
    path (and model_index.json) alone; the shared files stay."""
    hub = [ModelConfig(model_id="Wan-AI/Wan2.2-T2V-A14B", origin_file_pattern=f"{folder}/diffusion_pytorch_model*")
           for folder in (HIGH, LOW)] + [ModelConfig(model_id="Wan-AI/Wan2.2-T2V-A14B", origin_file_pattern=T5_FILE)]
    assert [c.origin_file_pattern for c in select_expert_files(hub, "low")] == [
        f"{LOW}/diffusion_pytorch_model*", T5_FILE]
    comfy = [ModelConfig(path=f"/m/wan2.2_t2v_{role}_noise_14B_fp16.safetensors") for role in ("high", "low")]
    assert [c.path for c in select_expert_files(comfy, "high")] == [comfy[0].path]
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"],
                                                           "transformer_2": ["diffusers", "WanTransformer3DModel"],
                                                           "boundary_ratio": 0.875}))
    diffusers = [ModelConfig(path=str(tmp_path / name)) for name in ("transformer", "transformer_2")]
    assert [c.path for c in select_expert_files(diffusers, "low")] == [str(tmp_path / "transformer_2")]
    with pytest.raises(TrainingError, match="wan2.2_t2v_low_noise_14B_fp16.safetensors belong"):
        select_expert_files(comfy[1:], "high")



def test_expert_trains_one_expert_without_reading_the_other(models: Path, dataset: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--expert high with both experts' files given: the low-noise file (garbage here, so any read of it
    fails) is never opened, the loss on the high-noise range falls, and the checkpoint says what it is."""
    shutil.copytree(models / T2V, tmp_path / T2V)
    sentinel = tmp_path / T2V / LOW / DIT
    sentinel.write_bytes(b"never read" * 100)
    opened: list[str] = []
    watching = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if watching[0] and event == "open" else None)
    import wan_models.loading as loading
    real = loading.read_state_dict
    monkeypatch.setattr(loading, "read_state_dict", lambda paths: opened.append(str(paths)) or real(paths))

    run = pair_argv(tmp_path, T2V, dataset, tmp_path / "out", "--expert", "high", "--lora_base_model", "dit",
                    "--lora_rank", "8", "--learning_rate", "3e-2", "--dataset_repeat", "16", metadata="one.csv")
    before, after, result = overfit(run, one_sample(dataset, A14B_SIZE))
    watching[0] = False
    assert any(str(tmp_path / T2V / HIGH / DIT) in path for path in opened)  # the watch sees the expert read
    assert not [path for path in opened if str(sentinel) in path]
    assert result.module.pipeline.dit2 is None and result.module.pipeline.dit.identity.expert == "high"
    assert after < 0.8 * before, (before, after)
    assert result.module.timestep_range == (0, 417)

    saved = result.checkpoints[-1]
    base = json.loads(header(saved)[BASE_KEY])
    assert base == {"family": "wan2.2", "expert": "high", "variant": "wan2.2-t2v", "dim": 32, "num_layers": 2,
                    "model": T2V}
    flags = json.loads(header(saved)[ARGS_KEY])
    assert (flags["expert"], flags["min_timestep_boundary"], flags["max_timestep_boundary"]) == ("high", 0.0, 0.417)
    beside = json.loads(saved.with_suffix(".json").read_text())
    assert beside["base"] == base and beside["training_args"] == flags and beside["checkpoint"] == saved.name


def test_low_expert_range_and_wrong_expert(models: Path, dataset: Path, tmp_path: Path) -> None:
    """I2V-A14B --expert low: indices [358, 1000); only the high-noise file given: an error naming it."""
    args = parse_args(pair_argv(models, I2V, dataset, tmp_path, "--expert", "low", "--lora_base_model", "dit",
                                "--extra_inputs", "input_image"))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    assert module.timestep_range == (358, 1000) and (args.min_timestep_boundary, args.max_timestep_boundary) == (
        0.358, 1.0)
    seen = []
    module.predict = lambda x, t, context, shared: seen.append(float(t)) or torch.zeros_like(x)
    with torch.no_grad():
        inputs = module.prepare_inputs(one_sample(dataset, A14B_SIZE))
        for seed in range(50):
            module.loss(inputs, seed)
    assert max(seen) < 900 and min(seen) >= 0

    only_high = argv(models / I2V, [models / I2V / HIGH / DIT], dataset, tmp_path, "--expert", "low",
                     "--lora_base_model", "dit", "--extra_inputs", "input_image")
    with pytest.raises(TrainingError, match=f"{models / I2V / HIGH / DIT}.*high-noise expert"):
        load_pipeline(parse_args(only_high))


@pytest.mark.parametrize("case", ["expert with boundary flag", "expert on TI2V", "pair without expert",
                                  "TI2V width 48", "TI2V i2v on a still"])
def test_bad_wan22_flags(case: str, models: Path, dataset: Path, tmp_path: Path) -> None:
    if case == "expert with boundary flag":
        with pytest.raises(TrainingError, match="drop --max_timestep_boundary"):
            parse_args(pair_argv(models, T2V, dataset, tmp_path, "--expert", "high", "--max_timestep_boundary",
                                 "0.417", "--lora_base_model", "dit"))
        return
    if case == "TI2V i2v on a still":  # its only latent frame is the held image: nothing left to learn
        with pytest.raises(TrainingError, match=r"row 4 \(still.png\): image\(s\), not videos"):
            train(parse_args(ti2v_argv(models, dataset, tmp_path, "--lora_base_model", "dit")))
        assert not (tmp_path / "train_log.jsonl").exists()
        return
    flags = {"expert on TI2V": (ti2v_argv(models, dataset, tmp_path, "--expert", "high", "--lora_base_model", "dit"),
                                "not an expert of a Wan 2.2 A14B pair"),
             "pair without expert": (pair_argv(models, T2V, dataset, tmp_path, "--lora_base_model", "dit"),
                                     "pass --expert high or --expert low"),
             "TI2V width 48": (ti2v_argv(models, dataset, tmp_path, "--lora_base_model", "dit", size=(32, 48)),
                               "--width 48: .* multiple of 32")}
    run, message = flags[case]
    with pytest.raises(TrainingError, match=message):
        load_pipeline(parse_args(run))


def test_boundary_ratio_as_flag_warns(models: Path, dataset: Path, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """The switch ratio 0.875 given as --max_timestep_boundary on the high-noise expert: a warning with 0.417."""
    folder = models / T2V
    run = argv(folder, [folder / HIGH / DIT], dataset, tmp_path, "--max_timestep_boundary", "0.875",
               "--lora_base_model", "dit")
    with caplog.at_level(logging.WARNING, logger="wan_train"):
        load_pipeline(parse_args(run))
    assert "--max_timestep_boundary 0.417 --min_timestep_boundary 0.000" in caplog.text


# -- TI2V-5B image-to-video -----------------------------------------------------------------------------------------


def test_ti2v_step_by_hand(models: Path, dataset: Path, tmp_path: Path) -> None:
    """One i2v step written out: frame 0 of the noised latents is the first frame's own latents, its tokens get
    t = 0, the others t, and the loss is the bell-weighted mse over latent frames 1.. only (DiffSynth's
    FlowMatchSFTLoss for fused-image DiTs)."""
    args = parse_args(ti2v_argv(models, dataset, tmp_path, "--lora_base_model", "dit", size=(64, 64)))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    pipe = module.pipeline
    sample = one_sample(dataset, (64, 64))
    with torch.no_grad():
        inputs = module.prepare_inputs(sample)
    x0 = inputs.input_latents
    # The first frame alone through the VAE, pixels in [-1, 1].
    frame0 = torch.from_numpy(np.asarray(sample["video"][0], dtype=np.float32))
    pixels = (frame0 / 127.5 - 1).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        z = pipe.vae.encode(pixels)
    assert torch.allclose(inputs.held_latents[:, :, :1], z, atol=1e-5)

    seen = {}
    real_predict = module.predict
    module.predict = lambda x, t, c, s: seen.update(x=x, t=t) or real_predict(x, t, c, s)
    seed = 1234
    with torch.no_grad():
        loss = module.loss(inputs, seed).item()

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    index = int(torch.randint(0, 1000, (1,), generator=generator))
    sigma = (1 - index / 1000) * 5 / (1 + 4 * (1 - index / 1000))  # linspace(1, 0, 1001)[index], shifted by 5
    t = sigma * 1000
    noisy = (1 - sigma) * x0 + sigma * noise
    noisy[:, :, 0] = z[:, :, 0]
    frames, tokens_per_frame = x0.shape[2], (x0.shape[3] // 2) * (x0.shape[4] // 2)
    timestep = torch.full((1, frames * tokens_per_frame), t)
    timestep[:, :tokens_per_frame] = 0
    assert torch.allclose(seen["x"], noisy, atol=1e-5)
    assert torch.allclose(seen["t"], timestep, atol=1e-3) and (seen["t"][:, :tokens_per_frame] == 0).all()

    schedule = torch.tensor([(1 - i / 1000) * 5 / (1 + 4 * (1 - i / 1000)) * 1000 for i in range(1000)])
    bell = torch.exp(-2 * ((schedule - 500) / 1000) ** 2)
    bell = (bell - bell.min()) * (1000 / (bell - bell.min()).sum())
    with torch.no_grad():
        prediction = pipe.dit(noisy, timestep, inputs.context)
    target = noise - x0
    expected = ((prediction[:, :, 1:] - target[:, :, 1:]) ** 2).mean() * bell[index]
    assert loss == pytest.approx(expected.item(), rel=1e-4)


def test_ti2v_text_to_video_step(models: Path, dataset: Path, tmp_path: Path) -> None:
    """Without input_image the same DiT trains text-to-video: nothing held, one timestep per video, every frame
    in the loss."""
    run = argv(models / TI2V, [models / TI2V / DIT], dataset, tmp_path, "--lora_base_model", "dit")
    args = parse_args(run)
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    seen = {}
    module.predict = lambda x, t, c, s: seen.update(t=t) or torch.zeros_like(x)
    with torch.no_grad():
        inputs = module.prepare_inputs(one_sample(dataset, TI2V_SIZE))
        loss = module.loss(inputs, 7).item()
    assert inputs.held_mask is None and inputs.token_timestep_scale is None and seen["t"].shape == (1,)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(inputs.input_latents.shape, generator=generator)
    index = int(torch.randint(0, 1000, (1,), generator=generator))
    weight = float(module.scheduler.training_weights[index])
    assert loss == pytest.approx(((noise - inputs.input_latents) ** 2).mean().item() * weight, rel=1e-5)


def test_ti2v_i2v_lora_overfits_and_loads(models: Path, dataset: Path, tmp_path: Path) -> None:
    """The loss of TI2V image-to-video falls; the comfy-layout LoRA merged into a fresh DiT gives the trained one."""
    run = ti2v_argv(models, dataset, tmp_path, "--lora_base_model", "dit", "--lora_rank", "8", "--learning_rate",
                    "3e-2", "--dataset_repeat", "16", "--lora_format", "comfy", metadata="one.csv")
    before, after, result = overfit(run, one_sample(dataset, TI2V_SIZE))
    assert after < 0.8 * before, (before, after)
    saved = result.checkpoints[-1]
    assert all(key.startswith("diffusion_model.blocks.") for key in load_file(saved))
    assert json.loads(header(saved)[BASE_KEY])["model"] == TI2V

    fresh = load_pipeline(parse_args(run))
    fresh.load_lora(fresh.dit, saved)
    x, context = torch.randn(1, 48, 2, 2, 4), torch.randn(1, 8, 32)
    t = torch.tensor([[0.0, 0.0, 700.0, 700.0]])
    with torch.no_grad():
        assert torch.allclose(fresh.dit(x, t, context), result.module.pipeline.dit(x, t, context), atol=1e-5)


def test_ti2v_full_cached_equals_plain(models: Path, dataset: Path, videos: str, tmp_path: Path) -> None:
    """TI2V i2v full fine-tune on the latent cache (DiT file only) = on the videos: the cache keeps frame 0's
    latents and the per-token timestep scale."""
    flags = ("--trainable_models", "dit", "--learning_rate", "1e-3", "--dataset_repeat", "1")
    plain = train(parse_args(ti2v_argv(models, dataset, tmp_path / "plain", *flags, metadata=videos)))
    cache = build_cache(parse_args(ti2v_argv(models, dataset, tmp_path / "c", "--cache_latents",
                                             str(tmp_path / "cache"), metadata=videos)))
    stored = load_file(next(cache.glob("0*.safetensors")))
    assert stored["held_mask"][:, :, 0].all() and not stored["held_mask"][:, :, 1:].any()
    assert (stored["token_timestep_scale"] == 0).sum() == math.prod(TI2V_SIZE) // 32 ** 2
    dit_only = json.dumps([str(models / TI2V / DIT)])
    run = ti2v_argv(models, dataset, tmp_path / "cached", *flags, "--use_cached", str(cache), metadata=videos)
    run[run.index("--model_paths") + 1] = dit_only
    cached = train(parse_args(run))
    assert cached.module.pipeline.vae is None
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    a, b = load_file(plain.checkpoints[-1]), load_file(cached.checkpoints[-1])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads(header(plain.checkpoints[-1])[BASE_KEY])["model"] == TI2V  # full fine-tunes carry it too


# -- resume ---------------------------------------------------------------------------------------------------------


def test_expert_resume_after_interruption(models: Path, dataset: Path, tmp_path: Path) -> None:
    """A14B low-noise expert, stopped after step 3 (last save at step 2) and resumed: the uninterrupted weights."""
    flags = ("--expert", "low", "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2",
             "--save_steps", "2", "--dataset_repeat", "2")
    whole = train(parse_args(pair_argv(models, T2V, dataset, tmp_path / "whole", *flags)))

    train_until_killed(parse_args(pair_argv(models, T2V, dataset, tmp_path / "cut", *flags)), 3)
    resumed = train(parse_args(pair_argv(models, T2V, dataset, tmp_path / "cut", *flags, "--resume")))
    assert resumed.losses == whole.losses[2:]
    a, b = load_file(whole.checkpoints[-1]), load_file(resumed.checkpoints[-1])
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_expert_run_killed_with_sigkill_resumes_to_the_same_weights(models: Path, dataset: Path, tmp_path: Path) -> None:
    """The A14B high-noise expert trained in its own process, SIGKILLed once a few states are saved (whatever
    it is doing then) and resumed in a new process: the uninterrupted run's weights (same bound as Wan 2.1's
    test: float32 kernels differ across processes by up to ~2e-7)."""
    flags = ("--expert", "high", "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2",
             "--save_steps", "1", "--dataset_repeat", "4")
    whole = train(parse_args(pair_argv(models, T2V, dataset, tmp_path / "whole", *flags)))
    output = tmp_path / "killed"
    argv_ = pair_argv(models, T2V, dataset, output, *flags)
    killed_at = sigkill_after_saves(argv_, output, 3)
    log.info("killed with %s as the latest resume state, of %d steps", killed_at, len(whole.losses))
    assert len(whole.losses) > 3  # the kill came before the end
    launch([sys.executable, "-m", "wan_train", *argv_, "--resume"])
    assert max_difference(whole.checkpoints[-1], output / whole.checkpoints[-1].name) <= 1e-6, killed_at


# -- two processes ------------------------------------------------------------------------------------------------


def test_ti2v_i2v_ddp_two_processes_equal_one(models: Path, dataset: Path, tmp_path: Path) -> None:
    """TI2V image-to-video LoRA under DDP (2 CPU processes, one micro-batch each) = 1 process accumulating 2."""
    two = tmp_path / "two.csv"
    write_csv(two, [{"video": f"clip{i}.mp4", "prompt": f"square {i}"} for i in range(2)])
    flags = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-3", "--dataset_repeat", "2")
    single = tmp_path / "single"
    train(parse_args(ti2v_argv(models, dataset, single, *flags, "--gradient_accumulation_steps", "2",
                               metadata=str(two))))
    ddp = tmp_path / "ddp"
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "wan_train",
            *ti2v_argv(models, dataset, ddp, *flags, metadata=str(two))], env={"ACCELERATE_USE_CPU": "true"})
    diff = max_difference(single / "epoch-0.safetensors", ddp / "epoch-0.safetensors")
    log.info("TI2V i2v DDP 2 processes vs 1: max weight difference %.3g", diff)
    assert diff < WEIGHT_TOLERANCE, diff
    assert len(logged_losses(ddp)) == 2
    assert logged_losses(ddp) == pytest.approx(logged_losses(single), rel=1e-5)
