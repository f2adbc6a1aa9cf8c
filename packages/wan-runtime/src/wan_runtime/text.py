"""Prompt text -> umT5 context: the reference cleaning, tokenisation and encoding.

The released pipeline cleans each prompt (ftfy, HTML entities unescaped twice, whitespace runs
collapsed), tokenises it with the umT5 tokenizer padded to ``text_len`` (512) tokens with ``</s>``
appended, and encodes it with the umT5 encoder, zeroing rows past the prompt's length.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Sequence

import ftfy
import regex
import torch

from wan_models.t5 import UMT5Encoder

logger = logging.getLogger(__name__)

__all__ = ["Prompter", "clean_prompt"]

# One of these must be in a tokenizer folder; released umT5 folders hold both, plus
# tokenizer_config.json and special_tokens_map.json.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_WHITESPACE = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The reference ``whitespace`` clean: ftfy fix, HTML unescape twice, whitespace runs -> one space."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


class Prompter:
    """A umT5 tokenizer plus the :class:`UMT5Encoder` it feeds; prompts in, DiT context out."""

    def __init__(self, tokenizer: Any, text_encoder: UMT5Encoder, text_len: int = 512) -> None:
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; the umT5 tokenizer pads "
                             "with <pad> (id 0)")
        vocab = text_encoder.config.vocab
        if len(tokenizer) > vocab:
            logger.warning("the tokenizer has %d tokens but the text encoder embeds only %d; prompts using the "
                           "extra ids will be rejected", len(tokenizer), vocab)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_len = text_len
        self._warned: set[str] = set()  # prompts already warned about as too long

    @classmethod
    def from_folder(cls, tokenizer_dir: str | Path, text_encoder: UMT5Encoder, text_len: int = 512) -> "Prompter":
        """Load the tokenizer saved in ``tokenizer_dir`` (released: ``google/umt5-xxl/``)."""
        folder = Path(tokenizer_dir).expanduser().absolute()
        expected = (f"expected the umT5 tokenizer files ({' and/or '.join(TOKENIZER_FILES)}, with "
                    "tokenizer_config.json and special_tokens_map.json), i.e. the google/umt5-xxl/ folder of "
                    "Wan-AI/Wan2.1-T2V-1.3B")
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist; {expected}")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            held = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(f"tokenizer folder {folder} holds {held or 'nothing'}; {expected}")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the tokenizer in {folder}: {e}") from e
        logger.info("loaded tokenizer %s (%d tokens) from %s", type(tokenizer).__name__, len(tokenizer), folder)
        return cls(tokenizer, text_encoder, text_len)

    def tokenize(self, prompt: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> ``ids, mask`` ``[B, text_len]`` (int64): ``</s>`` appended, padded with 0."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given (an empty list)")
        cleaned = [clean_prompt(p) for p in prompts]
        for text, ids in zip(cleaned, self.tokenizer(cleaned, add_special_tokens=True, verbose=False)["input_ids"]):
            if len(ids) > self.text_len and text not in self._warned:  # once per prompt: training repeats them
                self._warned.add(text)
                kept = self.tokenizer.decode(ids[:self.text_len - 1], skip_special_tokens=True)
                logger.warning("a prompt is %d tokens long, but the text encoder reads %d: everything after "
                               "...%r is ignored (%d tokens); shorten the prompt", len(ids), self.text_len,
                               kept[-40:], len(ids) - self.text_len)
        batch = self.tokenizer(cleaned, padding="max_length", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        return batch["input_ids"].long(), batch["attention_mask"].long()

    def encode(self, prompt: str | Sequence[str], device: str | torch.device | None = None) -> torch.Tensor:
        """Context ``[B, text_len, dim]`` in the encoder's dtype, rows past each prompt's length zero.

        ``device`` is where the token ids go (default: the encoder's); the encoder must already be there.
        """
        ids, mask = self.tokenize(prompt)
        if device is None:
            device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            return self.text_encoder.encode_context(ids.to(device), mask.to(device)).context
