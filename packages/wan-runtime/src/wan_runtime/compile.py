"""Regional ``torch.compile`` of the DiT: each transformer block is compiled in place, not the model.

The blocks are instances of one class with the same forward, and torch inlines built-in
``nn.Module`` calls with the parameters as graph inputs, so dynamo traces one block and every other
block reuses that graph: the compile cost is about one block's whatever the depth (checked with
``torch._dynamo`` counters in ``tests/runtime/test_compile.py``). ``Module.compile`` keeps the
module objects and state-dict keys, so LoRA merging (in place, on the same parameters) and FP8
storage keep working; compilation happens on the first call.
"""

from __future__ import annotations

import logging

from torch import nn

from wan_models import WanDiT

logger = logging.getLogger(__name__)


def compiled_blocks(dit: WanDiT) -> list[nn.Module]:
    """The DiT's transformer blocks (VACE blocks included) that :func:`compile_blocks` compiles."""
    return [*dit.blocks, *getattr(dit, "vace_blocks", ())]


def is_compiled(dit: WanDiT) -> bool:
    """Whether any of the DiT's blocks was compiled with ``Module.compile``."""
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in compiled_blocks(dit))


def compile_blocks(dit: WanDiT, mode: str | None = None, dynamic: bool | None = None,
                   fullgraph: bool = False, backend: str = "inductor") -> int:
    """Compile every block of ``dit`` in place with ``torch.compile`` (lazily, on first call); returns how many.

    The options are ``torch.compile``'s; ``dynamic=None`` lets torch mark sizes dynamic once a
    second shape (batch, token count) is seen, instead of recompiling for every shape.
    """
    blocks = compiled_blocks(dit)
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
    logger.info("torch.compile (backend %s, mode %s, dynamic %s) set on %d DiT blocks; they compile on the "
                "first denoising step", backend, mode, dynamic, len(blocks))
    return len(blocks)
