"""The reliable bank: update rule, lossless entries, checkpointed segments, re-partitioning, garbage."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from semi_llie.engine import bank_store, checkpointing
from semi_llie.errors import UserError
from semi_llie.fileio import write_text_atomic
from semi_llie.method.bank import BankEntry, ReliableBank, quantize
from semi_llie.metrics.scorers import FunctionScorer, PyiqaScorer

torch.set_num_threads(1)


def brightness(lower_better: bool = False) -> FunctionScorer:
    """Scores an image by its mean: easy to steer in tests."""
    return FunctionScorer(lambda x: x.mean(dim=(1, 2, 3)), name="brightness", lower_better=lower_better)


def flat(*levels: float, size: int = 8) -> torch.Tensor:
    """(B, 3, size, size) images, image i filled with levels[i]."""
    return torch.stack([torch.full((3, size, size), level) for level in levels])


def indices(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n)


def seeded_bank(scorer, key: str, level: float) -> ReliableBank:
    bank = ReliableBank(scorer)
    bank.update([key], indices(1), flat(level), flat(-1.0), step=0)  # any teacher beats a black student
    assert bank.get(key) is not None
    return bank


def test_empty_entry_teacher_beats_student_seeds_the_entry():
    bank = ReliableBank(brightness(), rank=3)
    result = bank.update(
        ["a"], torch.tensor([17]), teacher_output=flat(0.6), student_output=flat(0.4), step=7
    )
    assert result.accepted.tolist() == [True] and result.acceptance_rate == 1.0
    entry = bank.get("a")
    assert entry.score == pytest.approx(0.6, abs=1e-5)
    assert (entry.step, entry.index, entry.writer) == (7, 17, 3)
    assert torch.equal(entry.image, result.positives[0])  # the positive is exactly what was stored
    assert bank.dirty == {"a"}


def test_empty_entry_student_beats_teacher_uses_teacher_without_storing():
    bank = ReliableBank(brightness())
    result = bank.update(["a"], indices(1), teacher_output=flat(0.4), student_output=flat(0.6), step=1)
    assert result.accepted.tolist() == [False]
    torch.testing.assert_close(result.positives, flat(0.4), atol=1e-5, rtol=0)
    assert bank.get("a") is None and not bank.dirty


@pytest.mark.parametrize(
    ("teacher", "student", "stored", "accepted"),
    [
        (0.9, 0.5, 0.7, True),  # teacher beats both: replaces the entry
        (0.6, 0.5, 0.7, False),  # entry beats teacher: entry is the positive
        (0.8, 0.9, 0.7, False),  # student beats teacher: entry is the positive
    ],
)
def test_update_rule_with_an_entry(teacher, student, stored, accepted):
    bank = seeded_bank(brightness(), "k", stored)
    result = bank.update(
        ["k"], indices(1), teacher_output=flat(teacher), student_output=flat(student), step=3
    )
    assert result.accepted.tolist() == [accepted]
    winner = teacher if accepted else stored
    torch.testing.assert_close(result.positives, flat(winner), atol=1e-5, rtol=0)
    assert bank.get("k").score == pytest.approx(winner, abs=1e-5)


def test_lower_better_metric_flips_the_comparisons():
    bank = ReliableBank(brightness(lower_better=True))
    bank.update(["k"], indices(1), flat(0.5), flat(0.9), step=0)
    result = bank.update(
        ["k", "new", "k2"],
        indices(3),
        teacher_output=flat(0.3, 0.3, 0.3),
        student_output=flat(0.4, 0.2, 0.4),
        step=1,
    )
    # k: 0.3 < 0.4 and < 0.5 -> accepted; new: student 0.2 beats teacher -> not stored; k2: empty -> seeded
    assert result.accepted.tolist() == [True, False, True]
    assert bank.get("k").score == pytest.approx(0.3, abs=1e-5) and bank.get("new") is None
    assert (bank.seen, bank.accepted) == (4, 3)


def test_nan_score_or_non_finite_output_never_enters_the_bank():
    scorer = FunctionScorer(lambda x: torch.full((x.shape[0],), float("nan")), name="nan")
    bank = ReliableBank(scorer)
    assert bank.update(["a"], indices(1), flat(0.5), flat(0.5), step=0).accepted.tolist() == [False]
    bank = ReliableBank(brightness())
    result = bank.update(["a", "b"], indices(2), flat(0.9, float("inf")), flat(0.1, 0.1), step=0)
    assert result.accepted.tolist() == [False, False] and len(bank) == 0


@pytest.mark.parametrize("lower_better", [False, True])
def test_a_student_output_the_metric_cannot_score_loses_to_a_scored_teacher(lower_better):
    # NaN for dark images (the student's flat 0.1), the brightness otherwise.
    scorer = FunctionScorer(
        lambda x: torch.where(x.mean((1, 2, 3)) < 0.2, float("nan"), x.mean((1, 2, 3))),
        name="dark-is-nan",
        lower_better=lower_better,
    )
    bank = ReliableBank(scorer)
    result = bank.update(["a", "b"], indices(2), flat(0.5, 0.1), flat(0.1, 0.1), step=0)
    assert result.accepted.tolist() == [True, False]  # b: the teacher's own score is NaN
    assert bank.get("a").score == pytest.approx(0.5, abs=1e-5) and bank.get("b") is None


def test_entries_are_lossless_16_bit():
    bank = ReliableBank(brightness())
    image = (torch.rand(1, 3, 16, 16) * 1.2 - 0.1).clamp(0.01, 1)  # in range, any values
    bank.update(["scene_001"], indices(1), image, flat(0.0, size=16), step=2)
    entry = bank.get("scene_001")
    assert entry.pixels.dtype == torch.uint16
    assert torch.equal(entry.image, quantize(image[0]))
    assert (entry.image - image[0]).abs().max() <= 0.5 / 65535 + 1e-7


def test_a_different_size_is_refused():
    bank = seeded_bank(brightness(), "k", 0.9)
    with pytest.raises(UserError, match="unlabeled_size"):
        bank.update(["k"], indices(1), flat(0.1, size=4), flat(0.1, size=4), step=1)


# -- on disk: segments referenced by checkpoints ---------------------------------------------------------


def entry(level: float, index: int, step: int = 1, writer: int = 0) -> BankEntry:
    pixels = torch.full((3, 4, 4), round(level * 65535), dtype=torch.int32).to(torch.uint16)
    return BankEntry(pixels=pixels, score=level, step=step, index=index, writer=writer)


def save(accelerator, bank, root, step):
    staging = root / f".tmp-step-{step}"
    staging.mkdir(parents=True)
    bank_store.save(accelerator, bank, root, step, staging)
    final = root / f"step-{step}"
    staging.rename(final)
    return final


def load(step_dir, rank=0, world=1, scorer=None) -> ReliableBank:
    bank = ReliableBank(scorer or brightness(), rank=rank)
    bank_store.load(bank, step_dir, world, owns=lambda i: i % world == rank)
    return bank


def as_dict(bank: ReliableBank) -> dict:
    return {k: (e.pixels.tolist(), e.score, e.step, e.index, e.writer) for k, e in bank.items()}


def test_checkpoints_hold_the_bank_of_their_step_as_deltas_then_compact(tmp_path):
    accelerator = Accelerator(cpu=True)
    bank = ReliableBank(brightness())
    for i in range(4):
        bank.put(f"k{i}", entry(0.1 * i, i))
    first = save(accelerator, bank, tmp_path, 3)
    snapshot_3 = as_dict(bank)
    bank.put("k1", entry(0.9, 1, step=4))  # one entry changes after the checkpoint
    second = save(accelerator, bank, tmp_path, 6)

    segments = json.loads((second / "bank.json").read_text())["segments"]
    assert [s["records"] for s in segments] == [4, 1]  # the second checkpoint wrote only the change
    assert as_dict(load(first)) == snapshot_3  # the older checkpoint still reads as it was
    assert as_dict(load(second)) == as_dict(bank)
    assert load(second).get("k1").score == 0.9 and not bank.dirty

    def chain(step):
        return [
            s["records"]
            for s in json.loads((tmp_path / f"step-{step}" / "bank.json").read_text())["segments"]
        ]

    for step in (7, 8, 9, 10):  # rewriting one entry grows the chain ...
        bank.put("k1", entry(0.5, 1, step=step))
        save(accelerator, bank, tmp_path, step)
    assert chain(9) == [4, 1, 1, 1, 1]  # 8 records for 4 entries: 2 per entry
    assert chain(10) == [4]  # ... until it would hold more than 2 per entry: all rewritten
    assert load(tmp_path / "step-9").get("k1").step == 9  # each checkpoint reads as it was
    assert as_dict(load(tmp_path / "step-10")) == as_dict(bank)


def test_a_bank_saved_by_two_ranks_is_repartitioned_for_one_and_three(tmp_path):
    everything, chain = {}, []
    (tmp_path / bank_store.SEGMENTS).mkdir()
    for rank in range(2):  # what the collective save of a two-rank run writes
        bank = ReliableBank(brightness(), rank=rank)
        for index in range(rank, 9, 2):
            bank.put(f"k{index}", entry(index / 10, index, writer=rank))
            everything[f"k{index}"] = (index / 10, rank)
        name = f"00000005-r{rank}-test.seg"
        bank_store.write_segment(tmp_path / bank_store.SEGMENTS / name, bank, bank.keys(), world_size=2)
        chain.append({"file": name, "rank": rank, "world_size": 2, "records": len(bank)})
    (tmp_path / "step-5").mkdir()
    manifest = {"format": 1, "metric": "brightness", "segments": chain}
    (tmp_path / "step-5" / "bank.json").write_text(json.dumps(manifest))

    one = load(tmp_path / "step-5")
    assert {k: (e.score, e.writer) for k, e in one.items()} == everything
    three = [load(tmp_path / "step-5", rank=r, world=3) for r in range(3)]
    assert sorted(k for bank in three for k in bank.keys()) == sorted(everything)
    assert all(e.index % 3 == bank.rank for bank in three for _, e in bank.items())
    # Under the same world size a rank reads only its own segments.
    rank_1 = load(tmp_path / "step-5", rank=1, world=2)
    assert rank_1.keys() == ["k1", "k3", "k5", "k7"]


def test_a_bank_scored_with_another_metric_is_refused(tmp_path):
    bank = ReliableBank(brightness())
    bank.put("k", entry(0.5, 0))
    step_dir = save(Accelerator(cpu=True), bank, tmp_path, 1)
    contrast = FunctionScorer(lambda x: x.std(dim=(1, 2, 3)), name="contrast")
    with pytest.raises(UserError, match="scored with 'brightness'"):
        load(step_dir, scorer=contrast)


def test_rotation_deletes_segments_no_kept_checkpoint_needs(tmp_path):
    accelerator = Accelerator(cpu=True)
    root = checkpointing.checkpoints_root(tmp_path)
    bank = ReliableBank(brightness())
    for step in range(1, 5):
        for i in range(3):
            bank.put(f"k{i}", entry(step / 10, i, step=step))  # every entry changes at every checkpoint
        save(accelerator, bank, root, step)
        (root / f"step-{step}" / checkpointing.STATE_FILE).write_text("{}")
    (root / bank_store.SEGMENTS / "00000005-r0-dead.seg").write_bytes(b"left by a killed save")
    write_text_atomic(root / "latest", "step-4\n")
    checkpointing.rotate(tmp_path, total_limit=1)
    remaining = sorted(p.name for p in (root / bank_store.SEGMENTS).iterdir())
    assert remaining == sorted(bank_store.referenced_segments([root / "step-4"]))
    assert as_dict(load(root / "step-4")) == as_dict(bank)


def test_pyiqa_piqe_scorer_works_offline_and_is_lower_better():
    scorer = PyiqaScorer("piqe", batch_size=2)
    assert scorer.lower_better and scorer.name == "piqe"
    torch.manual_seed(0)
    scores = scorer(torch.rand(3, 3, 64, 64))
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    bank = ReliableBank(scorer)
    smooth = torch.linspace(0, 1, 64).expand(2, 3, 64, 64).contiguous()
    result = bank.update(["a", "b"], indices(2), smooth, torch.rand(2, 3, 64, 64), step=0)
    assert result.positives.shape == (2, 3, 64, 64)
    assert set(bank.keys()) == {k for k, ok in zip(["a", "b"], result.accepted.tolist(), strict=True) if ok}


def test_the_bank_is_built_from_its_config_block_through_the_scorer_registry(monkeypatch):
    from semi_llie.config import BankConfig
    from semi_llie.errors import ConfigError
    from semi_llie.metrics import scorers

    monkeypatch.setitem(scorers.SCORERS, "darkness", lambda device, batch_size: brightness(lower_better=True))
    bank = ReliableBank.from_config(BankConfig(metric="darkness"), rank=2)
    assert bank.scorer.name == "brightness" and bank.scorer.lower_better and bank.rank == 2
    assert ReliableBank.from_config(BankConfig(metric="piqe", score_batch_size=3)).scorer.batch_size == 3
    with pytest.raises(ConfigError, match="not a registered scorer"):
        ReliableBank.from_config(BankConfig(metric="psnr"))  # full-reference: it cannot score a candidate


def test_the_bank_counts_its_decisions_per_logging_window():
    bank = ReliableBank(brightness())
    bank.update(["a", "b"], indices(2), flat(0.6, 0.2), flat(0.4, 0.4), step=1)  # a accepted, b not
    assert bank.take_window() == {"bank_seen": 2.0, "bank_accepted": 1.0}
    bank.update(["c"], indices(1, 2), flat(float("nan")), flat(0.4), step=2)
    bank.update(["c"], indices(1, 2), flat(0.9), flat(0.4), step=3)
    assert bank.take_window() == {
        "bank_seen": 1.0,
        "bank_accepted": 1.0,
    }  # the non-finite batch is not decided
    assert (bank.seen, bank.accepted, bank.nonfinite_batches) == (3, 2, 1)
    assert bank.take_window() == {"bank_seen": 0.0, "bank_accepted": 0.0}
