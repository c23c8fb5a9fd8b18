"""Held-out epoch selection that does not mistake noise for progress.

Retraining keeps the state of its best epoch on held-out images. On a few hundred images a
gain of one or two images is noise, and a model picked for it can be worse on the real test
set. So a later epoch replaces the kept one only when the held-out images say so beyond their
noise (one-sided, about 95% confidence):

1. on the per-image hits (agreement with the teacher, or correct labels), a paired test:
   with ``gained`` images the new state gets right and the kept one did not, and ``lost`` the
   other way, ``gained - lost > z * sqrt(gained + lost)`` (McNemar's normal approximation);
2. else, when it loses no more images than it gains, on the per-image loss (KL to the
   teacher, or cross-entropy): the mean paired improvement above ``z`` standard errors.

A held-out split below :data:`MIN_HOLDOUT` images cannot tell one epoch from another at all;
retraining then keeps the starting model and says why (see :mod:`labelless.retrain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Evidence", "MIN_HOLDOUT", "Z_ONE_SIDED", "significantly_better", "too_few_held_out"]

MIN_HOLDOUT = 100  # held-out images below which no epoch can be told better than the start
Z_ONE_SIDED = 1.645  # one-sided 95% normal quantile


@dataclass(frozen=True)
class Evidence:
    """One state's per-image held-out results: ``hits`` (bool) and ``losses`` (float), both (n,)."""

    hits: torch.Tensor
    losses: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"hits": self.hits, "losses": self.losses}

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor]) -> "Evidence":
        return cls(data["hits"], data["losses"])


def significantly_better(new: Evidence, old: Evidence, z: float = Z_ONE_SIDED) -> bool:
    """Whether ``new`` beats ``old`` on the same held-out images beyond their noise."""
    gained = int((new.hits & ~old.hits).sum())
    lost = int((old.hits & ~new.hits).sum())
    if gained - lost > z * math.sqrt(gained + lost):
        return True
    if gained < lost:
        return False
    improvement = (old.losses - new.losses).double()
    n = improvement.numel()
    if n < 2:
        return False
    spread = improvement.std().item()
    return improvement.mean().item() > z * spread / math.sqrt(n)


def too_few_held_out(n_held_out: int, minimum: int, holdout: float) -> str | None:
    """Why ``n_held_out`` images cannot pick an epoch (None when they can)."""
    if n_held_out >= minimum:
        return None
    return (f"only {n_held_out} image(s) are held out (fewer than {minimum}): too few to tell a better epoch "
            f"from noise, so the starting model is kept; give more images or a larger --holdout "
            f"(now {holdout:g})")
