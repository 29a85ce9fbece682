"""The reliable bank (METHOD §4, from Semi-UIR): the best pseudo-label seen so far for each unlabeled sample.

Layout: one file per sample key, `OUTPUT_DIR/bank/<sha1(key)[:2]>/<key>.pt`, holding the image and its
score together, so they can never disagree. No rank appears in the path: a rank reads and writes only
the keys of the shards it streams, and a run resumed with another world size finds every entry.
Nothing is cached in memory beyond the current batch.

Entry file (torch.save, loadable with weights_only=True):
    {"key": str, "image": uint16 (3, H, W), "score": float, "metric": str, "step": int}
Pseudo-labels are clamped to [0, 1] and stored as 16-bit integers (like a 16-bit PNG). The tensor
that is stored is exactly the one scored and used as the positive, so the bank is lossless with
respect to what it returns: a positive read back later is bit-identical to the one accepted.

Writes are atomic: a temporary file in the same folder, fsync, os.replace, fsync of the folder. A
process killed at any moment leaves each entry either old or new; at worst a stray `.*.tmp` file,
which readers ignore.

Update rule, per sample (s_t teacher output, s_s student strong-view output, s_b bank entry):
  * s_t beats s_s and s_b -> the entry becomes the teacher output, which is the positive ("accepted");
  * otherwise, if the entry exists -> the entry is the positive;
  * otherwise (no entry, and the student beat the teacher) -> the teacher output is the positive, but
    it is not stored: a missing entry counts as the worst score (as in Semi-UIR), so only a teacher
    output that also beats the student may seed it.
"beats" honours the metric's direction (`lower_better`); a NaN score never beats anything.

Consistency marker: `state_dict()` -> {"committed", "seen", "accepted"} counts this bank object's
committed writes and decisions; the trainer stores it in `trainer_state.json`. Each entry also
records the global `step` it was written at. Entries written after the last checkpoint are kept on
resume: each is still a real teacher output that beat its predecessor, so the bank stays valid.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from semi_llie.errors import UserError
from semi_llie.scoring import Scorer

QUANTIZATION_LEVELS = 65535  # 16-bit


def quantize(images: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to the 16-bit grid the bank stores; same dtype and device."""
    return torch.round(images.clamp(0, 1) * QUANTIZATION_LEVELS) / QUANTIZATION_LEVELS


@dataclass(frozen=True)
class BankEntry:
    image: Tensor  # (3, H, W) float32 in [0, 1]
    score: float
    step: int


@dataclass(frozen=True)
class BankUpdate:
    positives: Tensor  # (B, 3, H, W): the positive sample of each input, on the input's device
    accepted: Tensor  # (B,) bool: the teacher output replaced (or seeded) the entry

    @property
    def acceptance_rate(self) -> float:
        return self.accepted.float().mean().item()


class ReliableBank:
    def __init__(self, root: str | Path, scorer: Scorer) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.scorer = scorer
        self.committed = 0  # entry files written by this object (plus those of a loaded marker)
        self.seen = 0  # samples decided
        self.accepted = 0  # of which the teacher output was stored

    # -- storage -------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        if not key or key.startswith(".") or "/" in key or os.sep in key or "\0" in key:
            raise ValueError(f"bank key {key!r} is not a safe file name")
        return self.root / hashlib.sha1(key.encode()).hexdigest()[:2] / f"{key}.pt"

    def read(self, key: str) -> BankEntry | None:
        path = self.path(key)
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as error:  # a torn file is impossible by construction: this is outside damage
            raise UserError(
                f"bank entry {path} is unreadable ({error}); delete it to let the bank re-seed it"
            ) from error
        if record["metric"] != self.scorer.name:
            raise UserError(
                f"bank entry {path} was scored with {record['metric']!r} but this run scores with "
                f"{self.scorer.name!r}; scores are incomparable: use the same bank.metric or a new OUTPUT_DIR"
            )
        image = record["image"].to(torch.float32) / QUANTIZATION_LEVELS
        return BankEntry(image=image, score=float(record["score"]), step=int(record["step"]))

    def write(self, key: str, image: Tensor, score: float, step: int) -> None:
        """Atomically store `image` (3, H, W) in [0, 1] (quantized to 16 bit) with its score."""
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        pixels = torch.round(image.detach().clamp(0, 1) * QUANTIZATION_LEVELS).to(torch.uint16)
        record = {
            "key": key,
            "image": pixels.cpu(),
            "score": float(score),
            "metric": self.scorer.name,
            "step": step,
        }
        temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            torch.save(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
        self.committed += 1

    def keys(self) -> list[str]:
        """Every stored key (scans the folder: for tests and tools, not the training loop)."""
        return sorted(p.name[: -len(".pt")] for p in self.root.glob("*/*.pt") if not p.name.startswith("."))

    # -- the update rule -----------------------------------------------------------------------

    def _beats(self, a: Tensor, b: Tensor) -> Tensor:
        return a < b if self.scorer.lower_better else a > b

    @torch.no_grad()
    def update(
        self, keys: Sequence[str], teacher_output: Tensor, student_output: Tensor, step: int
    ) -> BankUpdate:
        """Decide the positive of each sample and store accepted teacher outputs.

        keys: B sample keys; teacher_output: teacher(weak view) (B, 3, H, W); student_output:
        student(strong view) (B, 3, H, W). Returns the positives (detached) and the accepted mask.
        """
        if len(keys) != teacher_output.shape[0] or teacher_output.shape != student_output.shape:
            raise ValueError(
                f"bank.update got {len(keys)} keys, teacher {tuple(teacher_output.shape)}, "
                f"student {tuple(student_output.shape)}"
            )
        candidates = quantize(teacher_output.detach().float())  # (B, 3, H, W): exactly what would be stored
        scores = self.scorer(torch.cat([candidates, student_output.detach().float().clamp(0, 1)]))
        teacher_scores, student_scores = scores.chunk(2)  # (B,), (B,)

        worst = math.inf if self.scorer.lower_better else -math.inf
        entries = [self.read(key) for key in keys]
        bank_scores = torch.tensor([worst if e is None else e.score for e in entries])
        accepted = self._beats(teacher_scores, student_scores) & self._beats(teacher_scores, bank_scores)

        positives = candidates.clone()
        for i, (key, entry) in enumerate(zip(keys, entries, strict=True)):
            if accepted[i]:
                self.write(key, candidates[i], teacher_scores[i].item(), step)
            elif entry is not None:
                if entry.image.shape != candidates[i].shape:
                    raise UserError(
                        f"bank entry {self.path(key)} is {tuple(entry.image.shape)} but this run's unlabeled "
                        f"images are {tuple(candidates[i].shape)}; keep data.unlabeled_size or use a new "
                        f"OUTPUT_DIR"
                    )
                positives[i] = entry.image.to(positives.device)
        self.seen += len(keys)
        self.accepted += int(accepted.sum())
        return BankUpdate(positives=positives.to(teacher_output.dtype), accepted=accepted)

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def acceptance_rate(self) -> float:
        """Fraction of decided samples whose teacher output was stored, since creation or `reset_stats`."""
        return self.accepted / self.seen if self.seen else 0.0

    def reset_stats(self) -> None:
        self.seen = self.accepted = 0

    def state_dict(self) -> dict[str, Any]:
        return {"committed": self.committed, "seen": self.seen, "accepted": self.accepted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.committed = int(state["committed"])
        self.seen = int(state["seen"])
        self.accepted = int(state["accepted"])
