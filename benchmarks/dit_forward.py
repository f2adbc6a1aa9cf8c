"""One DiT forward: ours vs diffusers' WanTransformer3DModel (vs DiffSynth's WanModel when installed).

Same random weights (converted with ``wan_models.convert``), same fresh inputs each round,
implementations interleaved (A B C A B C ...), medians reported with achieved TFLOP/s and the max
relative difference of each peer's output from ours, so a fast-but-wrong result cannot win. The
text context is 512 rows as pipelines pass it: ``--prompt-tokens`` random rows, then zeros
(``--prompt-tokens 512``: all random); latents and timestep are random, never zero.

    python benchmarks/dit_forward.py                                   # GPU: 1.3B, 480P 81 frames, bf16
    python benchmarks/dit_forward.py --frames 9 --height 256 --width 256 --layers 2   # CPU-sized
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from pipeline import step_flops  # noqa: E402
from dit_setup import add_size_flags, random_dit  # noqa: E402
from timing import sync  # noqa: E402

import wan_models  # noqa: E402
from wan_models import WanDiT  # noqa: E402
from wan_models.formats import diffusers as diffusers_format  # noqa: E402

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ours(dit: WanDiT) -> Forward:
    return lambda x, t, ctx: dit(x, t, ctx)


def diffusers_peer(dit: WanDiT, device, dtype) -> Forward | str:
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        return f"not installed ({e})"
    config = {k: v for k, v in diffusers_format.transformer_config(dit.config).items() if not k.startswith("_")}
    with torch.device(device):  # not meta: diffusers keeps its RoPE tables as non-persistent buffers
        model = WanTransformer3DModel(**config)
    model.load_state_dict(wan_models.convert(dit.state_dict(), to="diffusers"), strict=True)
    model = model.to(dtype=dtype).eval()
    # As diffusers' from_pretrained(torch_dtype=...) does: some modules stay float32.
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return lambda x, t, ctx: model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def diffsynth_peer(dit: WanDiT, device, dtype) -> Forward | str:
    """DiffSynth 2.x ``WanModel`` driven as ``WanVideoPipeline.model_fn_wan_video`` drives it for t2v.

    Its own ``WanModel.forward`` cannot run in 2.1.12 (``patchify`` returns one tensor, ``forward``
    unpacks ``x, (f, h, w)``), and its pipeline module needs torchvision, so the t2v branch of
    ``model_fn_wan_video`` (no TeaCache, no sequence parallel, plain timestep) is replicated here
    line for line: the same module calls in the same order and dtypes.
    """
    try:
        ds = peers.diffsynth_module("models.wan_video_dit")
    except ImportError as e:
        return f"not installed ({e})"
    from einops import rearrange

    c = dit.config
    with torch.device(device):  # its RoPE table is a plain attribute, built where the model is made
        model = ds.WanModel(dim=c.dim, in_dim=c.in_dim, ffn_dim=c.ffn_dim, out_dim=c.out_dim, text_dim=c.text_dim,
                            freq_dim=c.freq_dim, eps=c.eps, patch_size=list(c.patch_size), num_heads=c.num_heads,
                            num_layers=c.num_layers, has_image_input=False)
    model.load_state_dict(dit.state_dict(), strict=True)  # same official keys, no conversion
    model = model.to(dtype=dtype).eval()

    def forward(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        timestep = t.to(dtype)  # the pipeline: timestep.unsqueeze(0).to(dtype=self.torch_dtype)
        temb = model.time_embedding(ds.sinusoidal_embedding_1d(model.freq_dim, timestep))
        t_mod = model.time_projection(temb).unflatten(1, (6, model.dim))
        context = model.text_embedding(ctx)
        h = model.patchify(x)
        f, hh, ww = h.shape[2:]
        h = rearrange(h, "b c f h w -> b (f h w) c").contiguous()
        freqs = torch.cat([
            model.freqs[0][:f].view(f, 1, 1, -1).expand(f, hh, ww, -1),
            model.freqs[1][:hh].view(1, hh, 1, -1).expand(f, hh, ww, -1),
            model.freqs[2][:ww].view(1, 1, ww, -1).expand(f, hh, ww, -1),
        ], dim=-1).reshape(f * hh * ww, 1, -1).to(h.device)
        for block in model.blocks:
            h = block(h, context, t_mod, freqs)
        h = model.head(h, temb)
        return model.unpatchify(h, (f, hh, ww))

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_flags(parser)
    parser.add_argument("--prompt-tokens", type=int, default=128,
                        help="non-zero context rows; the rest of the 512 are zero, as a pipeline pads the prompt")
    parser.add_argument("--kernels", action="store_true",
                        help="switch wan_kernels on for ours (on a CPU also its optimize_for_cpu path)")
    args = parser.parse_args()
    if not 0 <= args.prompt_tokens <= 512:
        parser.error(f"--prompt-tokens must be 0..512, got {args.prompt_tokens}")
    bench = random_dit(args)
    dit, config, device, dtype, gen, gpu = bench.dit, bench.config, bench.device, bench.dtype, bench.generator, bench.gpu
    frames, height, width = bench.frames, bench.height, bench.width
    if args.kernels:
        from wan_runtime.acceleration import enable_kernels, optimize_for_cpu

        enable_kernels(None)
        if not gpu:
            optimize_for_cpu(dit)
    impls: dict[str, Forward | str] = {"ours": ours(dit), "diffusers": diffusers_peer(dit, device, dtype),
                                       "diffsynth": diffsynth_peer(dit, device, dtype)}
    runnable = {k: v for k, v in impls.items() if callable(v)}
    shape, tokens = bench.latent_shape, bench.tokens
    times: dict[str, list[float]] = {k: [] for k in runnable}
    diffs: dict[str, list[float]] = {k: [] for k in runnable}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            x = torch.randn(shape, generator=gen, device=device).to(dtype)
            t = torch.rand(1, generator=gen, device=device) * 1000
            ctx = torch.randn(1, 512, config.text_dim, generator=gen, device=device).to(dtype)
            ctx[:, args.prompt_tokens:] = 0
            outputs = {}
            for name, fn in runnable.items():
                sync(device)
                start = time.perf_counter()
                outputs[name] = fn(x, t, ctx).float()
                sync(device)
                if round_:
                    times[name].append(time.perf_counter() - start)
            ref = outputs["ours"]
            for name, out in outputs.items():
                diffs[name].append(((out - ref).abs().max() / ref.abs().max()).item())
    flops = step_flops(config, tokens, branches=1)
    where = torch.cuda.get_device_name() if gpu else "CPU"
    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    print(f"# {args.model} DiT ({config.num_layers} layers), {tokens} tokens ({frames}x{height}x{width}), "
          f"{args.prompt_tokens}/512 prompt tokens, {str(dtype).removeprefix('torch.')}, {where}{threads}; "
          f"median of {args.rounds} interleaved rounds"
          f"{', ours with wan_kernels' if args.kernels else ''}")
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    print(f"{'impl':<10}{'ms':>10}{unit:>10}{'vs ours':>9}{'max rel diff':>14}")
    base = statistics.median(times["ours"])
    for name, value in impls.items():
        if not callable(value):
            print(f"{name:<10}  {value}")
            continue
        ms = statistics.median(times[name])
        print(f"{name:<10}{ms * 1e3:>10.1f}{flops / ms / scale:>10.2f}{ms / base:>9.2f}{max(diffs[name]):>14.2e}")
    versions = []
    for name, dist in (("diffusers", "diffusers"), ("diffsynth", "diffsynth")):
        if callable(impls[name]):
            from importlib.metadata import version

            versions.append(f"{name} {version(dist)}")
    if callable(impls["diffsynth"]):
        versions.append(f"diffsynth import: {peers.DIFFSYNTH_IMPORT}")
    print("# " + "; ".join(versions + [f"torch {torch.__version__}"]))


if __name__ == "__main__":
    main()
