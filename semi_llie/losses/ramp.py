"""The ramped weight of the unsupervised loss: w(e) = weight · exp(-5 · (1 - min(e, R) / R)²)."""

from __future__ import annotations

import math

from semi_llie.errors import ConfigError

RAMP_UNITS = ("epoch", "step")


class RampedWeight:
    """Sigmoid-shaped ramp-up (Laine & Aila) from weight·e⁻⁵ at e = 0 to `weight` at e ≥ R.

    `unit` says what e and R count: "epoch" (e may be fractional, e.g. step / steps_per_epoch) or
    "step" (optimizer steps). `ramp_length` 0 means no ramp: the full weight from the start.
    """

    def __init__(self, weight: float = 0.1, ramp_length: float = 100, unit: str = "epoch") -> None:
        if unit not in RAMP_UNITS:
            raise ConfigError(f"unsup_weight.unit is {unit!r}; use one of {', '.join(RAMP_UNITS)}")
        if ramp_length < 0 or weight < 0:
            raise ConfigError("unsup_weight.weight and unsup_weight.ramp_length must be >= 0")
        self.weight = float(weight)
        self.ramp_length = float(ramp_length)
        self.unit = unit

    def __call__(self, *, epoch: float, step: int) -> float:
        """The weight at this point of training; both counters are given, `unit` picks one."""
        if self.ramp_length == 0:
            return self.weight
        progress = epoch if self.unit == "epoch" else step
        phase = 1.0 - min(max(progress, 0.0), self.ramp_length) / self.ramp_length
        return self.weight * math.exp(-5.0 * phase * phase)

    def __repr__(self) -> str:
        return f"RampedWeight(weight={self.weight}, ramp_length={self.ramp_length}, unit={self.unit!r})"
