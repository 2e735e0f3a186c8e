"""Conditioning: one image's text conditioning rows, kept per image so images of any prompts share a forward."""

from __future__ import annotations

import torch


class Conditioning:
    """Per-image text conditioning rows: the prompt side and the negative side (None without
    classifier-free guidance)."""

    def __init__(self, positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None):
        self.positive = positive
        self.negative = negative
        self._rows: dict[str, torch.Tensor] | None = None

    def rows(self) -> dict[str, torch.Tensor]:
        """Rows in the pipeline's order: all negatives, then all prompts (joined once: every step uses them)."""
        if self.negative is None:
            return self.positive
        if self._rows is None:
            self._rows = {k: torch.cat([self.negative[k], self.positive[k]]) for k in self.positive}
        return self._rows

    def take(self, index: torch.Tensor) -> "Conditioning":
        pick = lambda side: {k: v.index_select(0, index) for k, v in side.items()}  # noqa: E731
        return Conditioning(pick(self.positive), None if self.negative is None else pick(self.negative))


def join_conditioning(parts: list[Conditioning]) -> Conditioning:
    join = lambda sides: {k: torch.cat([side[k] for side in sides]) for k in sides[0]}  # noqa: E731
    positive = join([p.positive for p in parts])
    negative = None if parts[0].negative is None else join([p.negative for p in parts])
    return Conditioning(positive, negative)
