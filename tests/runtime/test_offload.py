"""VRAM management (:mod:`wan_runtime.memory`) on tiny random networks and pipelines, on the CPU.

Storage and compute are both the CPU here, so the compute side is abstract: a recording
:class:`Accountant` sees every byte the offloaders bring over, and the tests check the budget after
every change, in DiT forwards and in whole generations (prompt encoding, CLIP, VAE encode, the DiT
steps, the motion controller, VAE decode), with and without prefetch.

Exactness: weights stored in the compute dtype give outputs identical (``torch.equal``) to no
offloading. float8 storage gives outputs identical to the network whose weights are the float8
values in float32 (the upcast is exact), and within ``FP8_REL_TOL`` (relative L2 norm) of the
float32 network: measured 4.5% for the tiny DiT's output and 4.0% for the tiny I2V pipeline's
final latents (float8 e4m3 keeps 3 mantissa bits: up to 6% relative error per weight).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from factories import TINY_DIT, dit_inputs, one_thread_fixture, random_dit
from wan_models import MODELS
from wan_models.configs import CLIP_FILE, DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_runtime import ModelConfig, WanVideoPipeline, tiny_release
from wan_runtime.memory import GIB, Accountant, Transfer, Unit, VramManager, manage_pipeline, offload

FP8 = torch.float8_e4m3fn
FP8_REL_TOL = 0.08
RELEASES = {"t2v": "Wan2.1-T2V-1.3B", "i2v": "Wan2.1-I2V-14B-480P", "vace": "Wan2.1-VACE-1.3B"}
NETWORKS = ("text_encoder", "image_encoder", "motion_controller", "vae", "dit")


class RecordingAccountant(Accountant):
    """Every change of the bytes on the compute side, in total and per network."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[int] = []
        self.by_network: dict[str, int] = {}
        self.seen: set[str] = set()
        self.overlaps = 0  # changes after which two networks had weights on the compute side

    def add(self, nbytes: int, name: str) -> None:
        super().add(nbytes, name)
        self._record(name, nbytes)

    def remove(self, nbytes: int, name: str) -> None:
        super().remove(nbytes, name)
        self._record(name, -nbytes)

    def _record(self, name: str, delta: int) -> None:
        network = name.split(":")[0]
        self.seen.add(network)
        self.by_network[network] = self.by_network.get(network, 0) + delta
        self.history.append(self.current)
        self.overlaps += sum(1 for held in self.by_network.values() if held) > 1


class PoisonedStorage(Transfer):
    """Stores every weight as NaNs and serves the real values only to the offloader: a weight read
    outside its unit's onload window (a bypassed hook, a parameter no unit holds) turns the output
    into NaNs. (Reads of a weight's device cannot be caught on a CPU-only machine.)"""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        super().__init__(torch.device("cpu"), torch.float32)
        self.values: dict[int, torch.Tensor] = {}
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self.values[id(tensor)] = tensor.data
                tensor.data = torch.full_like(tensor.data, float("nan"))

    def copy(self, unit: Unit) -> list[torch.Tensor]:
        return [self.values[id(t)] for t in unit.tensors]


one_thread = one_thread_fixture("module")


def forward(dit: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return dit(*inputs)


def to_float8(module: torch.nn.Module) -> torch.nn.Module:
    for param in module.parameters():
        param.data = param.data.to(FP8)
    return module


def upcast(module: torch.nn.Module) -> torch.nn.Module:
    """The float8 values in float32: what float8 storage computes with."""
    for param in module.parameters():
        param.data = param.data.float()
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def working_set(dit: torch.nn.Module, prefetch: bool) -> int:
    """The smallest budget the planner guarantees for ``dit`` (every layer streamed), in float32."""
    _, units = offload.build_units(dit, Transfer(torch.device("cpu"), torch.float32).compute_dtype)
    return offload.working_set(units, prefetch)


# --------------------------------------------------------------------------- one DiT


@pytest.mark.parametrize("prefetch", [False, True], ids=["sync", "prefetch"])
@pytest.mark.parametrize("share", ["working_set", "half", "all"])
def test_dit_forward_stays_within_the_budget(prefetch: bool, share: str) -> None:
    dit, inputs = random_dit(), dit_inputs()
    expected = forward(dit, inputs)
    total = sum(p.numel() * p.element_size() for p in dit.parameters())
    working = working_set(dit, prefetch)
    budget = {"working_set": working, "half": (total + working) // 2, "all": total}[share]
    accountant = RecordingAccountant()
    manager = VramManager("cpu", torch.float32, budget, accountant, prefetch=prefetch)
    network = manager.manage("dit", dit)
    for _ in range(3):
        assert torch.equal(forward(dit, inputs), expected)
    assert max(accountant.history) <= budget
    resident = sum(u.resident for u in network.units)
    if share == "working_set":
        assert resident == 0
    elif share == "half":
        assert 0 < resident < len(network.units)
    else:
        assert resident == len(network.units) and max(accountant.history) == total
    manager.offload()
    assert accountant.current == 0 and all(not u.loaded for u in network.units)


def test_a_budget_below_the_working_set_is_reported_and_still_runs(caplog) -> None:
    dit, inputs = random_dit(), dit_inputs()
    expected = forward(dit, inputs)
    manager = VramManager("cpu", torch.float32, budget=0)
    with caplog.at_level("WARNING", logger="wan_runtime.memory.offload"):
        manager.manage("dit", dit)
    assert "below the working set" in caplog.text
    assert torch.equal(forward(dit, inputs), expected)


def test_prefetch_learns_the_execution_order() -> None:
    """Module order is only a first guess (text_embedding is registered before time_embedding but
    runs after it); after one forward every streamed layer arrives prefetched."""
    dit, inputs = random_dit(), dit_inputs()
    manager = VramManager("cpu", torch.float32, budget=0, prefetch=True)
    network = manager.manage("dit", dit)
    per_forward = []
    for _ in range(3):
        before = dict(network.stats)
        forward(dit, inputs)
        per_forward.append({k: v - before[k] for k, v in network.stats.items()})
    assert per_forward[0]["prefetch_misses"] > 0
    assert per_forward[2] == {"onloads": 0, "prefetch_hits": len(network.units), "prefetch_misses": 0}


def test_float8_storage_upcasts_each_layer_and_keeps_the_float8_copy() -> None:
    inputs = dit_inputs()
    full = forward(random_dit(), inputs)
    stored = to_float8(random_dit())
    bits = {name: p.data.view(torch.uint8).clone() for name, p in stored.named_parameters()}
    expected = forward(upcast(to_float8(random_dit())), inputs)
    manager = VramManager("cpu", torch.float32, budget=0, prefetch=True)
    manager.manage("dit", stored)
    out = forward(stored, inputs)
    assert torch.equal(out, expected)
    assert relative_error(out, full) <= FP8_REL_TOL
    # Between calls only the dtype anchor (WanDiT.dtype reads it) is stored upcast, exactly.
    dtypes = {name: p.dtype for name, p in stored.named_parameters()}
    assert dtypes.pop("patch_embedding.weight") == torch.float32
    assert set(dtypes.values()) == {FP8}
    manager.disable()
    for name, p in stored.named_parameters():
        assert p.dtype == FP8 and torch.equal(p.data.view(torch.uint8), bits[name]), name


def test_fp8_linear_layers_stream_their_buffers() -> None:
    """``wan_kernels.quantize_fp8`` layers keep float8 weights as buffers: moved, never upcast."""
    wan_kernels = pytest.importorskip("wan_kernels")
    dit, inputs = random_dit(), dit_inputs()
    wan_kernels.quantize_fp8(dit, include="blocks.*")
    expected = forward(dit, inputs)
    manager = VramManager("cpu", torch.float32, budget=0, prefetch=True)
    network = manager.manage("dit", dit)
    assert any(u.num_params < len(u.tensors) for u in network.units)
    assert torch.equal(forward(dit, inputs), expected)
    manager.disable()
    assert {b.dtype for name, b in dit.named_buffers() if name.endswith("weight_fp8")} == {FP8}


def test_side_stream_logic_with_stand_in_cuda_streams(monkeypatch) -> None:
    """The CUDA prefetch path on stand-in streams and events: every copy made on the side stream
    starts after the current stream's queued work, and the current stream waits for each one
    (used or dropped) before it can reuse the memory."""
    log: list[tuple[str, Any]] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: "Stream") -> None:
            log.append((f"{self.name} waits for", other.name))

        def wait_event(self, event: "Event") -> None:
            log.append((f"{self.name} waits for event", event))

    class Event:
        def record(self, stream: Stream) -> None:
            log.append(("record on " + stream.name, self))

    main, side = Stream("main"), Stream("side")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    inputs = dit_inputs()
    stored = to_float8(random_dit())
    expected = forward(upcast(to_float8(random_dit())), inputs)
    manager = VramManager("cpu", torch.float32, budget=0, prefetch=True, pin_memory=False)
    manager.transfer.stream = side
    network = manager.manage("dit", stored)
    for _ in range(2):
        assert torch.equal(forward(stored, inputs), expected)
    manager.offload()
    recorded = [entry[1] for entry in log if entry[0] == "record on side"]
    waited = [entry[1] for entry in log if entry[0] == "main waits for event"]
    assert len(recorded) == network.stats["prefetch_hits"] + network.stats["prefetch_misses"] + 1  # + dropped
    assert sorted(map(id, recorded)) == sorted(map(id, waited))
    assert log.count(("side waits for", "main")) == len(recorded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("storage", [torch.float32, FP8], ids=["float32", "float8"])
def test_cuda_prefetch_from_pinned_memory(storage: torch.dtype) -> None:
    """On a GPU: weights pinned on the CPU, every layer streamed with prefetch; outputs equal the
    DiT on the GPU, and the allocation peak stays within activations + budget (+ the float8 copy of
    the largest layer, on the device before its upcast): dropped copies are freed at once, in
    stream order, however far the host runs ahead."""
    config = TINY_DIT.replace(dim=512, ffn_dim=2048, num_heads=4, num_layers=4, text_dim=64, text_len=16)
    cuda = torch.device("cuda", torch.cuda.current_device())
    dit = upcast(to_float8(random_dit(config))) if storage == FP8 else random_dit(config)
    inputs = tuple(t.to(cuda) for t in dit_inputs(config, grid=(4, 16, 16)))
    dit.to(cuda)
    expected = forward(dit, inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward(dit, inputs)
    weights = sum(p.numel() * p.element_size() for p in dit.parameters())
    activations = torch.cuda.max_memory_allocated() - base
    dit.to("cpu")
    if storage == FP8:
        to_float8(dit)
    manager = VramManager(cuda, torch.float32, working_set(dit, prefetch=True), prefetch=True)
    network = manager.manage("dit", dit)
    assert all(t.is_pinned() for u in network.units for t in u.tensors)
    for _ in range(2):
        assert torch.equal(forward(dit, inputs), expected)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    before = dict(network.stats)
    assert torch.equal(forward(dit, inputs), expected)
    torch.cuda.synchronize()
    assert network.stats["prefetch_hits"] - before["prefetch_hits"] == len(network.units)
    slack = (1 << 20) + (max(u.numel for u in network.units) if storage == FP8 else 0)
    assert torch.cuda.max_memory_allocated() - base <= activations + manager.budget + slack < activations + weights
    manager.disable()
    assert all(p.device.type == "cpu" for p in dit.parameters())


# --------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in RELEASES.values():
        tiny_release.write_release(root, name)
    tiny_release.write_motion_controller(root)
    return root


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), "RGB")


MODES: dict[str, tuple[str, bool, dict[str, Any]]] = {  # release, speed control, inputs
    "t2v_speed": ("t2v", True, dict(motion_bucket_id=50)),
    "i2v": ("i2v", False, dict(input_image=picture(1))),
    "vace": ("vace", False, dict(vace_reference_image=picture(2))),
}


def load(root: Path, key: str, dtype: torch.dtype | None = None, speed: bool = False) -> WanVideoPipeline:
    folder = root / MODELS[RELEASES[key]].model_id
    files = [sorted(folder.glob(DIT_FILES))[0], folder / T5_FILE, folder / VAE_FILE]
    if MODELS[RELEASES[key]].needs_image_encoder:
        files.append(folder / CLIP_FILE)
    if speed:
        files.append(root / MODELS[tiny_release.SPEED_CONTROL].model_id / MODELS[tiny_release.SPEED_CONTROL].files[0])
    return WanVideoPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(f), offload_device="cpu", offload_dtype=dtype) for f in files],
        tokenizer_config=ModelConfig(path=str(folder / T5_TOKENIZER)), skip_download=True)


def generate(pipe: WanVideoPipeline, output_type: str = "pil", **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Final latents (from the step callback) and the output."""
    latents: list[torch.Tensor] = []
    out = pipe(prompt="a cat", negative_prompt="a dog", height=32, width=48, num_frames=5, num_inference_steps=2,
               seed=0, progress_bar_cmd=lambda steps: steps, output_type=output_type,
               step_callback=lambda step, t, x: latents.append(x.clone()), **inputs)
    return latents[-1], out


def networks(pipe: WanVideoPipeline) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in NETWORKS if getattr(pipe, name) is not None}


def places(pipe: WanVideoPipeline) -> dict[str, tuple]:
    """Where every weight lives: storage pointer, device, dtype."""
    return {f"{name}.{key}": (p.data_ptr(), p.device, p.dtype)
            for name, net in networks(pipe).items() for key, p in net.named_parameters()}


@pytest.mark.parametrize("prefetch", [False, True], ids=["sync", "prefetch"])
@pytest.mark.parametrize("mode", list(MODES))
def test_generation_stays_within_the_budget_one_network_at_a_time(models_root, mode, prefetch) -> None:
    key, speed, inputs = MODES[mode]
    pipe = load(models_root, key, speed=speed)
    expected_latents, expected_frames = generate(pipe, **inputs)
    where = places(pipe)
    # The tightest budget the planner guarantees: the largest network's working set.
    probe = manage_pipeline(pipe, vram_limit=0, vram_buffer=0, prefetch=prefetch)
    tightest = max((n.root.nbytes if n.root else 0) + n.working_set for n in probe.networks.values())
    probe.disable()
    accountant = RecordingAccountant()
    pipe.vram = manage_pipeline(pipe, vram_limit=tightest / GIB, vram_buffer=0, accountant=accountant,
                                prefetch=prefetch)
    latents, frames = generate(pipe, **inputs)
    assert torch.equal(latents, expected_latents)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, expected_frames))
    assert max(accountant.history) <= pipe.vram.budget
    assert accountant.overlaps == 0
    assert accountant.seen == set(networks(pipe))  # every network ran under management
    assert accountant.current == 0 and places(pipe) == where  # back in the offload place


@pytest.mark.parametrize("mode", list(MODES))
def test_no_weight_is_read_outside_its_layers_call(models_root, mode) -> None:
    """Every network of every mode, streamed (budget 0) and resident (no budget), on poisoned storage."""
    key, speed, inputs = MODES[mode]
    pipe = load(models_root, key, speed=speed)
    expected, _ = generate(pipe, "latent", **inputs)
    storage = PoisonedStorage(list(networks(pipe).values()))
    for budget in (0, None):
        pipe.vram = VramManager("cpu", torch.float32, budget, prefetch=budget == 0)
        pipe.vram.transfer = storage
        for name, net in networks(pipe).items():
            pipe.vram.manage(name, net)
        latents, _ = generate(pipe, "latent", **inputs)
        assert torch.equal(latents, expected)
        assert all(p.isnan().all() for net in networks(pipe).values() for p in net.parameters())
        pipe.vram.disable()


def test_float8_storage_in_every_network(models_root) -> None:
    inputs = MODES["i2v"][2]
    full, _ = generate(load(models_root, "i2v"), "latent", **inputs)
    reference = load(models_root, "i2v", FP8)
    for net in networks(reference).values():
        upcast(net)
    expected, _ = generate(reference, "latent", **inputs)
    pipe = load(models_root, "i2v", FP8)
    pipe.enable_vram_management(vram_limit=0, vram_buffer=0)
    latents, _ = generate(pipe, "latent", **inputs)
    assert torch.equal(latents, expected)
    assert relative_error(latents, full) <= FP8_REL_TOL


def test_num_persistent_param_in_dit_keeps_exactly_those_resident(models_root) -> None:
    pipe = load(models_root, "t2v")
    limit = sum(p.numel() for p in pipe.dit.parameters()) // 3
    pipe.enable_vram_management(num_persistent_param_in_dit=limit)
    units = pipe.vram.networks["dit"].units
    expected, used = set(), 0  # smallest first, in module order among equals, while they fit
    for unit in sorted(units, key=lambda u: u.numel):
        if used + unit.numel <= limit:
            expected.add(unit.name)
            used += unit.numel
    left = [u.numel for u in units if u.name not in expected]
    assert expected and left and used <= limit < used + min(left)
    between_layers: list[set[str]] = []
    pipe(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, seed=0, output_type="latent",
         progress_bar_cmd=lambda steps: steps,
         step_callback=lambda *_: between_layers.append({u.name for u in units if u.loaded}))
    assert between_layers == [expected, expected]


def test_lora_merges_into_the_stored_weights_and_state_dict_keys_do_not_change(models_root) -> None:
    """With float8 storage, compute copies differ from the stored tensors: a LoRA merged while the
    DiT is active must still land in the stored weights."""
    pipe, plain = load(models_root, "t2v", FP8), load(models_root, "t2v", FP8)
    keys = {name: list(net.state_dict()) for name, net in networks(pipe).items()}
    pipe.enable_vram_management()  # no limit on the CPU: every layer resident while in use
    assert {name: list(net.state_dict()) for name, net in networks(pipe).items()} == keys
    gen = torch.Generator().manual_seed(0)
    dim = pipe.dit.config.dim
    lora = {f"{layer}.lora_{part}.weight": torch.randn(shape, generator=gen) * 0.5
            for layer in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o")
            for part, shape in (("A", (2, dim)), ("B", (dim, 2)))}
    forward(pipe.dit, dit_inputs(pipe.dit.config, grid=(2, 4, 6)))  # active: weights are compute copies
    q = pipe.dit.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float32 and all(u.loaded for u in pipe.vram.networks["dit"].units)
    merge = pipe.load_lora(pipe.dit, lora, alpha=0.8)
    assert q.weight.dtype == FP8  # merged into the float8 storage
    plain.load_lora(plain.dit, lora, alpha=0.8)
    for net in networks(plain).values():
        upcast(net)
    expected, _ = generate(plain, "latent")
    latents, _ = generate(pipe, "latent")
    assert torch.equal(latents, expected)
    pipe.unload_lora(merge)
    assert {name: list(net.state_dict()) for name, net in networks(pipe).items()} == keys


def test_enabling_again_replaces_the_plan(models_root) -> None:
    pipe = load(models_root, "t2v")
    expected, _ = generate(pipe, "latent")
    pipe.enable_vram_management(vram_limit=0, vram_buffer=0)
    first = pipe.vram
    pipe.enable_vram_management()
    assert first.networks == {} and all(u.resident for u in pipe.vram.networks["dit"].units)
    for unit in pipe.vram.networks["dit"].units:
        assert (len(unit.module._forward_pre_hooks), len(unit.module._forward_hooks)) == (1, 1)
    latents, _ = generate(pipe, "latent")
    assert torch.equal(latents, expected)
    pipe.vram.disable()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in pipe.dit.modules())


def test_units_cover_every_tensor_once(models_root) -> None:
    pipe = load(models_root, "i2v")
    vace = load(models_root, "vace").dit
    for name, net in {**networks(pipe), "vace_dit": vace}.items():
        root, units = offload.build_units(net, lambda dtype, upcast=True: dtype)
        held = [id(t) for u in ([root] if root else []) + units for t in u.tensors]
        assert sorted(held) == sorted(id(t) for t in [*net.parameters(), *net.buffers()]), name
