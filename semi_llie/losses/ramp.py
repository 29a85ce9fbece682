"""The ramped weight of the unsupervised loss: w(e) = weight · exp(-5 · (1 - min(e, R) / R)²), and 0 from
`until` on when set."""

from __future__ import annotations

import math

from semi_llie.errors import ConfigError

RAMP_UNITS = ("epoch", "step")


class RampedWeight:
    """Sigmoid-shaped ramp-up (Laine & Aila) from weight·e⁻⁵ at e = 0 to `weight` at e ≥ R.

    `unit` says what e, R and `until` count: "epoch" (e may be fractional, e.g. step / steps_per_epoch) or
    "step" (optimizer steps). `ramp_length` 0 means no ramp: the full weight from the start. `until` (None:
    never) ends the unlabeled branch: from e ≥ until the weight is 0 and the trainer stops drawing unlabeled
    batches, so the student trains on labels alone while the EMA teacher goes on averaging it.
    """

    def __init__(
        self,
        weight: float = 0.1,
        ramp_length: float = 100,
        unit: str = "epoch",
        until: float | None = None,
    ) -> None:
        if unit not in RAMP_UNITS:
            raise ConfigError(f"unsup_weight.unit is {unit!r}; use one of {', '.join(RAMP_UNITS)}")
        if ramp_length < 0 or weight < 0:
            raise ConfigError("unsup_weight.weight and unsup_weight.ramp_length must be >= 0")
        if until is not None and until <= 0:
            raise ConfigError("unsup_weight.until must be > 0 (or null: the unlabeled branch never stops)")
        self.weight = float(weight)
        self.ramp_length = float(ramp_length)
        self.unit = unit
        self.until = None if until is None else float(until)

    def active(self, *, epoch: float, step: int) -> bool:
        """Whether the unlabeled branch still runs at this point (before `until`)."""
        return self.until is None or (epoch if self.unit == "epoch" else step) < self.until

    def __call__(self, *, epoch: float, step: int) -> float:
        """The weight at this point of training; both counters are given, `unit` picks one."""
        if not self.active(epoch=epoch, step=step):
            return 0.0
        if self.ramp_length == 0:
            return self.weight
        progress = epoch if self.unit == "epoch" else step
        phase = 1.0 - min(max(progress, 0.0), self.ramp_length) / self.ramp_length
        return self.weight * math.exp(-5.0 * phase * phase)

    def __repr__(self) -> str:
        return (
            f"RampedWeight(weight={self.weight}, ramp_length={self.ramp_length}, unit={self.unit!r}, "
            f"until={self.until})"
        )
