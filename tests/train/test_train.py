"""Training in-process on the tiny release: the loss falls, checkpoints hold exactly the trained
weights under the released names, the pipeline loads them and its output changes, resume and the
latent cache reproduce an uninterrupted uncached run, and bad input stops the run before step 1."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_models.configs import T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_runtime import ModelConfig, WanVideoPipeline
from wan_train import (TrainingError, VideoDataset, WanTrainingModule, build_cache, load_pipeline, main, parse_args,
                       train)
from wan_train.module import sample_seed
from wan_train.state import STATE_DIR

from train.support import FRAMES, HEIGHT, WIDTH, model_paths, train_argv, train_until_killed, write_csv

EVAL_SEEDS = range(12)
LORA_LAYERS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
log = logging.getLogger(__name__)


def eval_loss(module: WanTrainingModule, sample: dict) -> float:
    """The loss of ``sample`` averaged over fixed noise/timestep seeds (the same before and after)."""
    with torch.no_grad():
        inputs = module.prepare_inputs(sample)
        return sum(module.loss(inputs, seed).item() for seed in EVAL_SEEDS) / len(EVAL_SEEDS)


def one_sample(dataset: Path) -> dict:
    return VideoDataset(str(dataset), str(dataset / "one.csv"), num_frames=FRAMES, height=HEIGHT, width=WIDTH)[0]


def pipeline(release: Path, dit: Path | None = None) -> WanVideoPipeline:
    dit = dit or release / "diffusion_pytorch_model.safetensors"
    return WanVideoPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(dit)), ModelConfig(path=str(release / T5_FILE)),
                       ModelConfig(path=str(release / VAE_FILE))],
        tokenizer_config=ModelConfig(path=str(release / T5_TOKENIZER)))


def generate(pipe: WanVideoPipeline) -> torch.Tensor:
    return pipe("a red square slides right", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
                seed=0, output_type="latent", progress_bar_cmd=lambda steps: steps)


def overfit(release: Path, dataset: Path, output: Path, *flags: str) -> tuple[float, float, object]:
    """Loss of the single sample before and after 16 steps on it (``one.csv`` repeated 16 times)."""
    args = parse_args(train_argv(release, dataset, output, "--dataset_repeat", "16", *flags, metadata="one.csv"))
    sample = one_sample(dataset)
    before = eval_loss(WanTrainingModule.from_args(args, load_pipeline(args)), sample)
    result = train(args)
    after = eval_loss(result.module, sample)
    log.info("overfit %s: eval loss %.4f -> %.4f; step losses %s", flags, before, after,
             [round(x, 3) for x in result.losses])
    return before, after, result


def test_lora_overfits_saves_and_loads(release: Path, dataset: Path, tmp_path: Path) -> None:
    before, after, result = overfit(release, dataset, tmp_path, "--lora_base_model", "dit", "--lora_rank", "8",
                                    "--learning_rate", "3e-2")
    assert len(result.losses) == 16 and after < 0.7 * before, (before, after)  # measured: 1.95 -> 1.07

    saved = load_file(result.checkpoints[-1])
    assert result.checkpoints[-1].name == "epoch-0.safetensors"
    expected = {f"blocks.{i}.{layer}.lora_{part}.weight" for i in range(2) for layer in LORA_LAYERS for part in "AB"}
    assert set(saved) == expected | {f"blocks.{i}.{layer}.alpha" for i in range(2) for layer in LORA_LAYERS}
    assert all(saved[f"blocks.{i}.{layer}.alpha"].item() == 8 for i in range(2) for layer in LORA_LAYERS)
    assert saved["blocks.0.self_attn.q.lora_A.weight"].shape == (8, 32)

    # The pipeline loads the file: its output changes, and its merged DiT computes what training trained.
    pipe = pipeline(release)
    base = generate(pipe)
    pipe.load_lora(pipe.dit, result.checkpoints[-1])
    assert (generate(pipe) - base).abs().max() > 1e-3
    x, t, ctx = torch.randn(1, 16, 2, 4, 6), torch.tensor([700.0]), torch.randn(1, 8, 32)
    with torch.no_grad():
        trained = result.module.pipeline.dit(x, t, ctx)
        assert torch.allclose(pipe.dit(x, t, ctx), trained, atol=1e-5)


def test_full_finetune_overfits_saves_and_loads(release: Path, dataset: Path, tmp_path: Path) -> None:
    before, after, result = overfit(release, dataset, tmp_path, "--trainable_models", "dit",
                                    "--learning_rate", "5e-3")
    assert after < 0.7 * before, (before, after)  # measured: 1.95 -> 0.95
    saved = load_file(result.checkpoints[-1])
    released = load_file(release / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(released)  # every DiT weight, "pipe.dit." removed, nothing else
    trained = dict(result.module.pipeline.dit.named_parameters())
    assert all(torch.equal(saved[k], trained[k].detach()) for k in saved)
    assert (saved["blocks.1.ffn.2.weight"] - released["blocks.1.ffn.2.weight"]).abs().max() > 1e-4

    # from_pretrained on the saved file: a DiT like the released one, with the trained weights.
    assert (generate(pipeline(release, result.checkpoints[-1])) - generate(pipeline(release))).abs().max() > 1e-3


def test_resume_after_interruption(release: Path, dataset: Path, tmp_path: Path) -> None:
    """Stopped after step 5 (last save at step 4), resumed: the same weights as without the stop."""
    flags = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2", "--num_epochs", "2",
             "--save_steps", "2", "--gradient_accumulation_steps", "2", "--dataset_repeat", "2")
    whole = train(parse_args(train_argv(release, dataset, tmp_path / "whole", *flags)))
    assert len(whole.losses) == 8  # 2 epochs x 8 samples / 2 per step

    train_until_killed(parse_args(train_argv(release, dataset, tmp_path / "cut", *flags)), 5)
    assert (tmp_path / "cut" / STATE_DIR / "latest").read_text() == "state-e0001-b000000000"  # after step 4
    resumed = train(parse_args(train_argv(release, dataset, tmp_path / "cut", *flags, "--resume")))
    assert resumed.losses == whole.losses[4:]  # steps 5..8 again, the same draws
    a, b = load_file(whole.checkpoints[-1]), load_file(resumed.checkpoints[-1])
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    log.info("resume: max weight difference %.3g", diff)
    assert diff == 0.0


def test_cached_training_matches(release: Path, dataset: Path, tmp_path: Path) -> None:
    """--cache_latents then --use_cached (DiT file only): the same losses and weights as plain training."""
    flags = ("--trainable_models", "dit", "--learning_rate", "1e-3", "--dataset_repeat", "2")
    plain = train(parse_args(train_argv(release, dataset, tmp_path / "plain", *flags)))
    cache = build_cache(parse_args(train_argv(release, dataset, tmp_path / "c", "--cache_latents",
                                              str(tmp_path / "cache"))))
    assert len(list(cache.glob("0*.safetensors"))) == 4 and (cache / "empty_prompt.safetensors").is_file()
    dit_only = json.dumps([str(release / "diffusion_pytorch_model.safetensors")])
    cached = train(parse_args(train_argv(release, dataset, tmp_path / "cached", *flags, "--use_cached", str(cache),
                                         paths=dit_only)))
    assert cached.module.pipeline.vae is None and cached.module.pipeline.text_encoder is None
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    a, b = load_file(plain.checkpoints[-1]), load_file(cached.checkpoints[-1])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_gradient_checkpointing_changes_nothing(release: Path, dataset: Path, tmp_path: Path) -> None:
    """Plain, checkpointed and CPU-offloaded checkpointed steps: the same loss and gradients."""
    grads = []
    for flags in (["--no_gradient_checkpointing"], [], ["--use_gradient_checkpointing_offload"]):
        args = parse_args(train_argv(release, dataset, tmp_path, "--lora_base_model", "dit", *flags))
        torch.manual_seed(0)
        module = WanTrainingModule.from_args(args, load_pipeline(args))
        with torch.no_grad():  # B starts at zero: give the LoRA an effect so that A gets gradients too
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        sample = {**one_sample(dataset), "sample_seed": sample_seed(0, 0, 0)}
        loss = module(sample)
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in module.trainable_parameters()])))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        assert torch.allclose(grad, grads[0][1], rtol=1e-5, atol=1e-7)


# -- bad input: a clear error and exit status 2 before any step ----------------------------------------------


@pytest.mark.parametrize("case", ["missing column", "missing file", "short video", "unreadable video",
                                  "bad model_paths JSON", "unknown lora target", "missing model file",
                                  "resume without a state"])
def test_bad_input_stops_before_training(case: str, release: Path, dataset: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    metadata, paths, flags = "metadata.csv", None, ["--lora_base_model", "dit"]
    if case == "missing column":
        write_csv(tmp_path / "m.csv", [{"video": "clip0.mp4", "text": "no prompt column"}])
        metadata, expected = str(tmp_path / "m.csv"), "has no column ['prompt']"
    elif case == "missing file":
        write_csv(tmp_path / "m.csv", [{"video": "clip0.mp4", "prompt": "x"}, {"video": "nope.mp4", "prompt": "y"}])
        metadata, expected = str(tmp_path / "m.csv"), "row 2 column 'video': file not found"
    elif case == "short video":
        flags += ["--num_frames", "9"]
        expected = "has 7 frames, fewer than --num_frames 9"
    elif case == "unreadable video":
        (tmp_path / "v.mp4").write_bytes(b"\x00garbage" * 64)
        write_csv(tmp_path / "m.csv", [{"video": str(tmp_path / "v.mp4"), "prompt": "x"}])
        metadata, expected = str(tmp_path / "m.csv"), "cannot read video"
    elif case == "bad model_paths JSON":
        paths, expected = "['dit.safetensors']", "--model_paths is not valid JSON"
    elif case == "unknown lora target":
        flags += ["--lora_target_modules", "q,to_q"]
        expected = "--lora_target_modules ['to_q'] match no layer of dit"
    elif case == "resume without a state":
        flags += ["--resume"]
        expected = "--resume: no resume state under"
    else:
        paths, expected = model_paths(release, tmp_path / "missing.safetensors"), "missing.safetensors"
    argv = train_argv(release, dataset, tmp_path / "out", *flags, paths=paths)
    if metadata != "metadata.csv":
        argv[argv.index("--dataset_metadata_path") + 1] = metadata
    with caplog.at_level(logging.ERROR, logger="wan_train"), pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert expected in caplog.text
    assert not (tmp_path / "out" / "train_log.jsonl").exists()  # no step ran


def test_training_error_is_a_value_error() -> None:
    assert issubclass(TrainingError, ValueError)


def test_empty_prompt_ratio_swaps_in_the_empty_context(release: Path, dataset: Path, tmp_path: Path) -> None:
    """About that fraction of samples see the empty prompt's context (the pipeline's own encoding of
    ""), chosen by each sample's seed; a cache carries that context so cached runs do the same."""
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit",
                                 "--empty_prompt_ratio", "0.3"))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    empty = module.pipeline.prompter.encode("").float()
    seen = []
    module.predict = lambda x, t, context, shared: seen.append(context) or torch.zeros_like(x)
    with torch.no_grad():
        inputs = module.prepare_inputs(one_sample(dataset))
        for seed in range(200):
            module.loss(inputs, seed)
    swapped = [torch.equal(c, empty) for c in seen]
    assert 0.2 < sum(swapped) / len(swapped) < 0.4
    assert all(torch.equal(c, inputs.context) for c, s in zip(seen, swapped) if not s)
    assert not torch.equal(inputs.context, empty)

    cache = build_cache(parse_args(train_argv(release, dataset, tmp_path / "c", "--cache_latents",
                                              str(tmp_path / "cache"))))
    dit_only = json.dumps([str(release / "diffusion_pytorch_model.safetensors")])
    cached = train(parse_args(train_argv(release, dataset, tmp_path / "cached", "--trainable_models", "dit",
                                         "--empty_prompt_ratio", "0.3", "--use_cached", str(cache),
                                         paths=dit_only)))
    assert torch.equal(cached.module.empty_context.float(), empty)


def test_progress_bar_redraws_at_its_interval(release: Path, dataset: Path, tmp_path: Path) -> None:
    """The loss shown beside the bar waits for the bar's own redraw: with ``TQDM_MININTERVAL`` long
    (what a log file wants) 8 steps draw the bar at its start and end, not once per step."""
    argv = [a for a in train_argv(release, dataset, tmp_path, "--lora_base_model", "dit", "--lora_rank", "4",
                                  "--dataset_repeat", "8", metadata="one.csv") if a != "--disable_progress_bar"]
    run = subprocess.run([sys.executable, "-m", "wan_train", *argv], capture_output=True, text=True, check=True,
                         env={**os.environ, "TQDM_MININTERVAL": "1000"})  # tqdm reads it at import
    draws = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.startswith("training:")]
    assert draws[-1].startswith("training: 100%|") and "8/8" in draws[-1], draws
    assert len(draws) <= 3, draws
