"""Session-wide test hygiene: every test leaves wan_models' replaceable hooks as it found them.

``WanVideoPipeline.from_pretrained`` switches wan_kernels on process-wide (as it should for
users); without this, one test's pipeline would change the attention and ops of the next.
"""

from __future__ import annotations

import pytest

from wan_models import attention, ops


@pytest.fixture(autouse=True)
def _restore_model_hooks():
    before_attention = attention.get_attention_backend()
    before_ops = {name: ops.get_op(name) for name in ops.DEFAULTS}
    yield
    try:
        import wan_kernels
    except ImportError:
        pass
    else:
        wan_kernels.disable()
    attention.set_attention_backend(before_attention)
    for name, fn in before_ops.items():
        ops.set_op(name, fn)
