"""Two-way key renaming from tables of key templates.

A rule pairs the template of a key in one format with its template in the other, e.g.
``("blocks.{n}.self_attn.q.{p}", "blocks.{n}.attn1.to_q.{p}")``. A template matches a key only as a
whole; its placeholders match:

===========  ==========================================
``{n}``      a block or layer index (digits)
``{p}``      ``weight`` or ``bias``
``{coder}``  ``encoder`` or ``decoder``
``{rest}``   anything (the remainder of a key)
===========  ==========================================

The first rule whose template matches renames the key; renaming never touches tensors.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, TypeVar

V = TypeVar("V")

PLACEHOLDERS = {"n": r"\d+", "p": r"weight|bias", "coder": r"encoder|decoder", "rest": r".+"}
_FIELD = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern[str]:
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        name = m.group(1)
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}} in key template {template!r}")
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(f"(?P<{name}>{PLACEHOLDERS[name]})")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


class KeyMap:
    """Renames keys between two formats (``left`` and ``right``) by a list of template pairs."""

    def __init__(self, rules: Iterable[tuple[str, str]], left: str = "official", right: str = "other") -> None:
        rules = tuple(rules)
        self.left, self.right = left, right
        self._to_right = [(_compile(a), b) for a, b in rules]
        self._to_left = [(_compile(b), a) for a, b in rules]

    def rename(self, key: str, *, to_left: bool = False) -> str | None:
        """``key`` in the other format, or ``None`` when no rule matches it."""
        for pattern, template in self._to_left if to_left else self._to_right:
            m = pattern.fullmatch(key)
            if m:
                return template.format(**m.groupdict())
        return None

    def apply(self, state: Mapping[str, V], *, to_left: bool = False) -> dict[str, V]:
        """A new dict with every key renamed and the same values; raises ``ValueError`` naming the
        keys that no rule covers (or that two keys would both become)."""
        out: dict[str, V] = {}
        unmapped: list[str] = []
        for key, value in state.items():
            new = self.rename(key, to_left=to_left)
            if new is None:
                unmapped.append(key)
            elif new in out:
                raise ValueError(f"two keys both become {new!r} ({key!r} is one of them)")
            else:
                out[new] = value
        if unmapped:
            source, target = (self.right, self.left) if to_left else (self.left, self.right)
            raise ValueError(f"{len(unmapped)} {source} keys have no {target} equivalent: "
                             f"{', '.join(sorted(unmapped)[:8])}{' ...' if len(unmapped) > 8 else ''}")
        return out
