"""Checks at load time: NaN/inf weights, truncated or foreign files, pickles holding code, and a
wrong or corrupt ``config.json`` beside a checkpoint; each names the file and what is wrong."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wan_models
from wan_models import CheckpointError, NonFiniteWeights, WanDiT, integrity
from wan_models.configs import CLIP_FILE, T5_FILE, VAE_FILE
from wan_runtime import tiny_release

DIT = "diffusion_pytorch_model.safetensors"
POISONED = "blocks.1.ffn.0.weight"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.1-I2V-14B-480P")


@pytest.fixture
def dit_folder(release, tmp_path) -> Path:
    """A copy of the tiny DiT with its official config.json, to spoil."""
    folder = tmp_path / "dit"
    folder.mkdir()
    shutil.copy(release / DIT, folder / DIT)
    shutil.copy(release / "config.json", folder / "config.json")
    return folder


def _poison(path: Path, key: str, values: list[float]) -> int:
    """Write ``values`` over the first elements of ``key`` in a .safetensors file; returns its size."""
    sd = load_file(path)
    flat = sd[key].flatten()
    flat[: len(values)] = torch.tensor(values)
    sd[key] = flat.reshape(sd[key].shape)
    save_file(sd, str(path), metadata={"format": "pt"})
    return sd[key].numel()


# ---------------------------------------------------------------- non-finite weights


def test_nan_and_inf_in_a_dit_are_refused_naming_file_key_and_count(dit_folder) -> None:
    numel = _poison(dit_folder / DIT, POISONED, [float("nan"), float("inf"), float("-inf")])
    with pytest.raises(NonFiniteWeights) as err:
        wan_models.load_model(dit_folder / DIT)
    assert str(err.value) == (f"{dit_folder / DIT}: 1 tensor holds NaN/inf values: "
                              f"{POISONED} (3 of {numel:,} values)")
    assert err.value.counts == {POISONED: 3} and isinstance(err.value, CheckpointError)


def test_nan_in_one_shard_names_that_shard(release, tmp_path) -> None:
    config = wan_models.load_model(release / DIT).config
    shards = tiny_release.write_dit(tmp_path, config, shards=3)
    key = next(iter(load_file(shards[1])))
    _poison(shards[1], key, [float("nan")] * 2)
    with pytest.raises(NonFiniteWeights, match=rf"^{shards[1]}: 1 tensor holds NaN/inf values: {key} \(2 of "):
        wan_models.load_model(shards)


@pytest.mark.parametrize("name", [VAE_FILE, T5_FILE, CLIP_FILE])
def test_nan_in_a_pth_network_is_refused(release, tmp_path, name) -> None:
    sd = torch.load(release / name, weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1 and "textual" not in k)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    torch.save(sd, tmp_path / name)
    with pytest.raises(NonFiniteWeights, match=rf"{tmp_path / name}: 1 tensor holds NaN/inf values: {key} \(1 of "):
        wan_models.load_model(tmp_path / name)


def test_overflow_of_the_cast_is_named_as_such(dit_folder) -> None:
    _poison(dit_folder / DIT, POISONED, [1e6])  # finite in float32, inf in float16
    wan_models.load_model(dit_folder / DIT)  # as stored: fine
    with pytest.raises(NonFiniteWeights, match=rf"{POISONED} \(1 of .* after the cast to torch.float16 "
                                               r"\(the file's values are finite but beyond the range"):
        wan_models.load_model(dit_folder / DIT, dtype=torch.float16)


def test_non_finite_counting_is_exact_and_has_no_false_alarms() -> None:
    big = torch.ones(100_000, dtype=torch.float16)  # its float16 sum overflows: counted, found finite
    assert integrity.count_non_finite(big) == 0
    big[[3, 7]] = float("nan")
    assert integrity.count_non_finite(big) == 2
    fp8 = torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)
    assert integrity.count_non_finite(fp8) == 1
    assert integrity.count_non_finite(torch.tensor([1, 2])) == 0
    counts = integrity.non_finite([("a", big), ("b", torch.zeros(3)), ("c", fp8)])
    assert counts == {"a": 2, "c": 1}
    assert integrity.describe_non_finite(counts, {"a": 100_000, "c": 3}, limit=1) == (
        "2 tensors hold NaN/inf values: a (2 of 100,000 values) and 1 more")


# ---------------------------------------------------------------- foreign, pickled and truncated files


class Payload:
    """A pickled object that would run code on load."""

    def __reduce__(self):
        return (print, ("pwned",))


def _assert_no_torch_advice(message: str) -> None:
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message


def test_random_bytes_are_not_called_a_pickle(tmp_path) -> None:
    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as err:
        wan_models.load_model(path)
    assert str(err.value) == f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)"
    garbled = tmp_path / "garbled.pth"
    garbled.write_bytes(b"\x80\x02" + bytes(range(7, 250)) * 4)  # a pickle header, then garbage
    with pytest.raises(CheckpointError, match=r"garbled.pth: not a readable torch checkpoint: corrupt or truncated pickle "
                                              r"data \(Unsupported operand \d+\)$") as err:
        wan_models.load_model(garbled)
    _assert_no_torch_advice(str(err.value))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.safetensors: empty \(0 bytes\)$"):
        wan_models.load_model(empty)


@pytest.mark.parametrize("writer", ["zip", "legacy", "plain pickle"])
def test_pickles_holding_code_are_refused_without_torch_advice(tmp_path, writer) -> None:
    path = tmp_path / "evil.pth"
    obj = {"weight": torch.zeros(2), "hook": Payload()}
    if writer == "plain pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "zip")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to unpickle: the file holds objects other than "
                                              r"tensors, and loading them could run code \(.*print") as err:
        wan_models.load_model(path)
    _assert_no_torch_advice(str(err.value))


def test_truncated_files_are_named_truncated(release, tmp_path) -> None:
    for name in (DIT, VAE_FILE):
        data = (release / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{DIT}: truncated: {len((tmp_path / DIT).read_bytes()):,} of the "
                                              rf"{(release / DIT).stat().st_size:,} bytes its header describes$"):
        wan_models.load_model(tmp_path / DIT)
    with pytest.raises(CheckpointError, match=rf"{VAE_FILE}: truncated: a zip archive without its end record"):
        wan_models.load_model(tmp_path / VAE_FILE)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    whole = legacy.read_bytes()
    for cut, message in [(100, r"truncated: its pickle data ends early \(100 bytes\)"),
                         (200, r"not a readable torch checkpoint \(index out of range\)"),
                         (300, r"not a readable torch checkpoint: corrupt or truncated pickle data \(300 bytes\)"),
                         (1000, r"not a readable torch checkpoint \(unexpected EOF, expected \d+ more bytes")]:
        legacy.write_bytes(whole[:cut])  # cut inside the pickles (300: inside a class name), then in the data
        with pytest.raises(CheckpointError, match=rf"legacy.pth: {message}"):
            wan_models.read_state_dict(legacy)


def test_file_problem_passes_whole_files_and_reads_only_headers(release, tmp_path) -> None:
    for path in release.rglob("*"):
        if path.is_file():
            assert integrity.file_problem(path) is None, path
    padded = tmp_path / DIT
    padded.write_bytes((release / DIT).read_bytes() + b"\0" * 10)
    size = (release / DIT).stat().st_size
    assert integrity.file_problem(padded) == f"corrupt: {size + 10:,} bytes, more than the {size:,} its header describes"
    header = tmp_path / "header.safetensors"
    header.write_bytes((release / DIT).read_bytes()[:20])
    assert integrity.file_problem(header).startswith("truncated: 20 bytes, less than its ")
    other = tmp_path / "noise.safetensors"
    other.write_bytes(b"\xff" * 64)
    assert integrity.file_problem(other).startswith("not a .safetensors file")


def test_a_corrupt_comfy_quantisation_config_is_named(release, tmp_path) -> None:
    from wan_models.formats import comfy

    sd = comfy.quantize_fp8(load_file(release / DIT), scaled=True)
    sd.pop(comfy.MARKER)
    key = "blocks.0.ffn.0"
    sd[f"{key}.weight_scale"] = sd.pop(f"{key}.scale_weight")
    sd[f"{key}.comfy_quant"] = torch.tensor(list(b'{"format": float8'), dtype=torch.uint8)  # cut-off JSON
    path = tmp_path / "dit_fp8.safetensors"
    save_file(comfy.from_official(sd, "dit"), str(path))
    with pytest.raises(CheckpointError, match=rf"^{path}: {key}.comfy_quant: not a JSON quantisation config "
                                              r"\(Expecting value: line 1 column 12"):
        wan_models.load_model(path)


# ---------------------------------------------------------------- config.json beside the checkpoint


@pytest.mark.parametrize("text, message", [
    ('{"dim": 32, num_heads: 2}', r"not valid JSON: Expecting property name enclosed in double quotes at line 1, "
                                  r"column 13$"),
    ("[1, 2]", r"expected a JSON object, got a JSON list$"),
    ('{"num_heads": 3}', r'"num_heads": 3 does not fit the weights of .*diffusion_pytorch_model.safetensors '
                         r"\(dim 32 is not divisible by num_heads 3\)$"),
    ('{"num_heads": "two"}', r'"num_heads" must be a positive integer, got "two"$'),
    ('{"num_heads": 2, "text_len": 0}', r'"text_len" must be a positive integer, got 0$'),
    ('{"_class_name": "WanTransformer3DModel", "num_attention_heads": 2.5}',
     r'"num_attention_heads" must be a positive integer, got 2.5$'),
    ('{"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "vace_layers": [0, 7]}',
     r'"vace_layers": \[0, 7\] does not fit the weights of .* \(vace_layers \[7\] outside 0..1\)$'),
    ('{"_class_name": "AutoencoderKLWan"}', r"a diffusers 'AutoencoderKLWan' config.json does not describe a dit"),
])
def test_a_bad_config_json_is_named_with_the_key(dit_folder, text, message) -> None:
    config = dit_folder / "config.json"
    config.write_text(text)
    with pytest.raises(CheckpointError, match=rf"^{config}: {message}"):
        wan_models.load_model(dit_folder / DIT)


def test_config_json_is_read_only_for_networks_that_use_it(release, tmp_path) -> None:
    shutil.copy(release / T5_FILE, tmp_path / T5_FILE)
    (tmp_path / "config.json").write_text("{corrupt")
    assert wan_models.load_model(tmp_path / T5_FILE).__class__.__name__ == "UMT5Encoder"


def test_the_pipeline_reports_a_corrupt_config_json(release, tmp_path) -> None:
    from wan_runtime import ModelConfig, WanVideoPipeline

    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    (folder / "config.json").write_text('{"dim": 32,}')
    files = [folder / name for name in (DIT, T5_FILE, VAE_FILE, CLIP_FILE)]
    with pytest.raises(CheckpointError, match=rf"^{folder / 'config.json'}: not valid JSON: .* line 1, column 12$"):
        WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                         model_configs=[ModelConfig(path=str(f)) for f in files],
                                         tokenizer_config=ModelConfig(path=str(folder / "google" / "umt5-xxl")),
                                         progress_bar_cmd=lambda x: x)


def test_a_good_config_json_still_sets_the_heads(dit_folder) -> None:
    assert json.loads((dit_folder / "config.json").read_text())["num_heads"] == 2
    dit = wan_models.load_model(dit_folder / DIT)
    assert isinstance(dit, WanDiT) and dit.config.num_heads == 2
