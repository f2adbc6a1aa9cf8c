"""The README's quick-start snippet, extracted from the README itself, runs against tiny models.

Only the sizes are shrunk (each substitution must apply, so the snippet cannot drift unnoticed);
the model files are a tiny random release at ``./models/Wan-AI/Wan2.1-T2V-1.3B`` in the released
layout, so ``from_pretrained`` finds them and downloads nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import av

from wan_runtime import tiny_release

README = Path(__file__).resolve().parents[2] / "README.md"
SHRINK = {"height=480": "height=32", "width=832": "width=48", "num_frames=81": "num_frames=5",
          "num_inference_steps=50": "num_inference_steps=2", "torch.bfloat16": "torch.float32"}


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs(tmp_path: Path, monkeypatch) -> None:
    code = quick_start()
    for old, new in SHRINK.items():
        assert old in code, f"README quick start no longer contains {old!r}"
        code = code.replace(old, new)
    tiny_release.write_release(tmp_path / "models", "Wan2.1-T2V-1.3B")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    with av.open(os.fspath(tmp_path / "fox.mp4")) as container:
        frames = list(container.decode(video=0))
    assert (len(frames), frames[0].width, frames[0].height) == (5, 48, 32)
