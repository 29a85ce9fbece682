"""The reliable bank (METHOD §4, from Semi-UIR): the best pseudo-label seen so far for each unlabeled sample.

Ownership: every unlabeled sample has one owner rank for the whole run (`semi_llie.data.streams.owner_ranks`:
the rank that streams it), so each rank holds only its own entries, in memory, and no two ranks ever write
one entry. Each entry records the sample's split index (which decides its owner under any world size) and
the rank that wrote it.

Persistence is part of the checkpoint (`semi_llie.engine.bank_store`): a checkpoint holds the bank exactly as
it
was after its step, so resuming from any kept checkpoint restores that state, and a resume with another
world size re-partitions it by owner. Nothing is written to disk between checkpoints, so a step never
waits on the file system.

Entries hold the pseudo-label clamped to [0, 1] as 16-bit integers (like a 16-bit PNG). The tensor that is
stored is exactly the one scored and used as the positive, so the bank is lossless with respect to what it
returns: a positive read back later is bit-identical to the one accepted.

Update rule, per sample (s_t teacher output, s_s student strong-view output, s_b bank entry):
  * s_t beats s_s and s_b -> the entry becomes the teacher output, which is the positive ("accepted");
  * otherwise, if the entry exists -> the entry is the positive;
  * otherwise (no entry, and the student beat the teacher) -> the teacher output is the positive, but
    it is not stored: a missing entry counts as the worst score (as in Semi-UIR), so only a teacher
    output that also beats the student may seed it.
"beats" honours the metric's direction (`lower_better`); a NaN score never beats anything. Scoring runs
in fp32 outside autocast, and a batch with a non-finite output is left out of the bank entirely (its loss is
non-finite too, and the trainer skips the step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from semi_llie.config import BankConfig
from semi_llie.errors import UserError
from semi_llie.metrics.scorers import Scorer, build_scorer

QUANTIZATION_LEVELS = 65535  # 16-bit


def quantize(images: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to the 16-bit grid the bank stores; same dtype and device (a new tensor)."""
    return images.clamp(0, 1).mul_(QUANTIZATION_LEVELS).round_().div_(QUANTIZATION_LEVELS)


def all_finite(images: Tensor) -> bool:
    """No NaN or infinity in `images` (two reductions, no image-sized temporary)."""
    low, high = torch.aminmax(images)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def to_pixels(image: Tensor) -> Tensor:
    """(3, H, W) float -> (3, H, W) uint16 on the CPU, as stored."""
    return image.detach().float().clamp(0, 1).mul_(QUANTIZATION_LEVELS).round_().to(torch.uint16).cpu()


@dataclass(frozen=True)
class BankEntry:
    pixels: Tensor  # (3, H, W) uint16
    score: float
    step: int  # the global step it was written at
    index: int  # the sample's split index: decides its owner rank
    writer: int  # the rank that wrote it

    @property
    def image(self) -> Tensor:
        """(3, H, W) float32 in [0, 1]."""
        return self.pixels.to(torch.float32) / QUANTIZATION_LEVELS


@dataclass(frozen=True)
class BankUpdate:
    positives: Tensor  # (B, 3, H, W): the positive sample of each input, on the input's device
    accepted: Tensor  # (B,) bool: the teacher output replaced (or seeded) the entry

    @property
    def acceptance_rate(self) -> float:
        return self.accepted.float().mean().item()


class ReliableBank:
    """This rank's share of the bank: the entries of the unlabeled samples it owns, in memory."""

    def __init__(self, scorer: Scorer, rank: int = 0) -> None:
        self.scorer = scorer
        self.rank = rank
        self._entries: dict[str, BankEntry] = {}
        self.dirty: set[str] = set()  # keys written since the last checkpoint (bank_store writes them)
        self.chain: list[dict[str, Any]] = []  # segments of the checkpoint this state extends (bank_store)
        self.seen = 0  # samples decided
        self.accepted = 0  # of which the teacher output was stored
        self.nonfinite_batches = 0  # batches left out because an output was not finite
        self._window = (0, 0)  # (seen, accepted) at the last `take_window`

    @classmethod
    def from_config(cls, cfg: BankConfig, device: str | torch.device = "cpu", rank: int = 0) -> ReliableBank:
        """The bank `cfg.bank` describes, its scorer built by name (semi_llie.metrics.scorers.SCORERS)."""
        return cls(build_scorer(cfg.metric, device=device, batch_size=cfg.score_batch_size), rank=rank)

    # -- entries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> BankEntry | None:
        return self._entries.get(key)

    def items(self) -> Iterator[tuple[str, BankEntry]]:
        return iter(sorted(self._entries.items()))

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def put(self, key: str, entry: BankEntry, *, dirty: bool = True) -> None:
        self._entries[key] = entry
        if dirty:
            self.dirty.add(key)

    def clear(self) -> None:
        self._entries.clear()
        self.dirty.clear()
        self.chain = []

    # -- the update rule -----------------------------------------------------------------------

    def _beats(self, a: Tensor, b: Tensor) -> Tensor:
        return a < b if self.scorer.lower_better else a > b

    @torch.no_grad()
    def update(
        self,
        keys: Sequence[str],
        indices: Tensor,
        teacher_output: Tensor,
        student_output: Tensor,
        step: int,
    ) -> BankUpdate:
        """Decide the positive of each sample and store accepted teacher outputs.

        keys: B sample keys; indices: (B,) their split indices; teacher_output: teacher(weak view)
        (B, 3, H, W); student_output: student(strong view) (B, 3, H, W). Returns the positives (detached,
        in the teacher output's dtype) and the accepted mask.
        """
        if len(keys) != teacher_output.shape[0] or teacher_output.shape != student_output.shape:
            raise ValueError(
                f"bank.update got {len(keys)} keys, teacher {tuple(teacher_output.shape)}, "
                f"student {tuple(student_output.shape)}"
            )
        if not (all_finite(teacher_output) and all_finite(student_output)):
            self.nonfinite_batches += 1
            accepted = torch.zeros(len(keys), dtype=torch.bool)
            return BankUpdate(positives=teacher_output.detach().clamp(0, 1), accepted=accepted)
        with torch.autocast(teacher_output.device.type, enabled=False):  # scores in fp32
            candidates = quantize(teacher_output.detach().float())  # (B, 3, H, W): exactly what is stored
            teacher_scores = self.scorer(candidates).double().cpu()  # float64, like the stored scores
            student_scores = self.scorer(student_output.detach().float().clamp(0, 1)).double().cpu()

        worst = math.inf if self.scorer.lower_better else -math.inf
        # A student output the metric cannot score (NaN, e.g. a flat early output) is beaten by any finite
        # teacher score; a NaN teacher score never wins, since every comparison with NaN is false.
        student_scores = torch.nan_to_num(student_scores, nan=worst)
        entries = [self._entries.get(key) for key in keys]
        bank_scores = torch.tensor([worst if e is None else e.score for e in entries], dtype=torch.float64)
        accepted = self._beats(teacher_scores, student_scores) & self._beats(teacher_scores, bank_scores)

        positives = candidates  # an accepted row is copied into the bank before any row is replaced
        for i, (key, entry) in enumerate(zip(keys, entries, strict=True)):
            if accepted[i]:
                pixels = to_pixels(candidates[i])
                self.put(key, BankEntry(pixels, float(teacher_scores[i]), step, int(indices[i]), self.rank))
            elif entry is not None:
                if entry.pixels.shape != candidates[i].shape:
                    raise UserError(
                        f"the bank entry of {key!r} is {tuple(entry.pixels.shape)} but this run's unlabeled "
                        f"images are {tuple(candidates[i].shape)}; keep data.unlabeled_size or start a new "
                        "output_dir"
                    )
                positives[i] = entry.image.to(positives.device)
        self.seen += len(keys)
        self.accepted += int(accepted.sum())
        return BankUpdate(positives=positives.to(teacher_output.dtype), accepted=accepted)

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the samples this process decided whose teacher output was stored."""
        return self.accepted / self.seen if self.seen else 0.0

    def take_window(self) -> dict[str, float]:
        """{"bank_seen", "bank_accepted"}: this rank's counts since the previous call (a logging window)."""
        seen, accepted = self.seen - self._window[0], self.accepted - self._window[1]
        self._window = (self.seen, self.accepted)
        return {"bank_seen": float(seen), "bank_accepted": float(accepted)}
