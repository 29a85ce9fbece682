"""The reliable bank: update rule, lossless entries, crash safety, sharding across ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from semi_llie.bank import ReliableBank, quantize
from semi_llie.errors import UserError
from semi_llie.scoring import FunctionScorer, PyiqaScorer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def brightness(lower_better: bool = False) -> FunctionScorer:
    """Scores an image by its mean: easy to steer in tests."""
    return FunctionScorer(lambda x: x.mean(dim=(1, 2, 3)), name="brightness", lower_better=lower_better)


def flat(*levels: float, size: int = 8) -> torch.Tensor:
    """(B, 3, size, size) images, image i filled with levels[i]."""
    return torch.stack([torch.full((3, size, size), level) for level in levels])


def seeded_bank(tmp_path, scorer, key: str, level: float) -> ReliableBank:
    bank = ReliableBank(tmp_path / "bank", scorer)
    bank.write(key, flat(level)[0], score=level, step=0)
    return bank


def test_empty_entry_teacher_beats_student_seeds_the_entry(tmp_path):
    bank = ReliableBank(tmp_path / "bank", brightness())
    result = bank.update(["a"], teacher_output=flat(0.6), student_output=flat(0.4), step=7)
    assert result.accepted.tolist() == [True] and result.acceptance_rate == 1.0
    entry = bank.read("a")
    assert entry.score == pytest.approx(0.6, abs=1e-5) and entry.step == 7
    assert torch.equal(entry.image, result.positives[0])  # the positive is exactly what was stored


def test_empty_entry_student_beats_teacher_uses_teacher_without_storing(tmp_path):
    bank = ReliableBank(tmp_path / "bank", brightness())
    result = bank.update(["a"], teacher_output=flat(0.4), student_output=flat(0.6), step=1)
    assert result.accepted.tolist() == [False]
    torch.testing.assert_close(result.positives, flat(0.4), atol=1e-5, rtol=0)
    assert bank.read("a") is None


@pytest.mark.parametrize(
    ("teacher", "student", "stored", "accepted"),
    [
        (0.9, 0.5, 0.7, True),  # teacher beats both: replaces the entry
        (0.6, 0.5, 0.7, False),  # entry beats teacher: entry is the positive
        (0.8, 0.9, 0.7, False),  # student beats teacher: entry is the positive
    ],
)
def test_update_rule_with_an_entry(tmp_path, teacher, student, stored, accepted):
    bank = seeded_bank(tmp_path, brightness(), "k", stored)
    result = bank.update(["k"], teacher_output=flat(teacher), student_output=flat(student), step=3)
    assert result.accepted.tolist() == [accepted]
    winner = teacher if accepted else stored
    torch.testing.assert_close(result.positives, flat(winner), atol=1e-5, rtol=0)
    assert bank.read("k").score == pytest.approx(winner, abs=1e-5)


def test_lower_better_metric_flips_the_comparisons(tmp_path):
    bank = seeded_bank(tmp_path, brightness(lower_better=True), "k", 0.5)
    result = bank.update(
        ["k", "new", "k2"], teacher_output=flat(0.3, 0.3, 0.3), student_output=flat(0.4, 0.2, 0.4), step=1
    )
    # k: 0.3 < 0.4 and < 0.5 -> accepted; new: student 0.2 beats teacher -> not stored; k2: empty -> seeded
    assert result.accepted.tolist() == [True, False, True]
    assert bank.read("k").score == pytest.approx(0.3, abs=1e-5) and bank.read("new") is None
    assert bank.acceptance_rate == pytest.approx(2 / 3)
    assert bank.state_dict() == {"committed": 3, "seen": 3, "accepted": 2}  # 1 seed write + 2 accepted


def test_nan_teacher_score_never_wins(tmp_path):
    scorer = FunctionScorer(lambda x: torch.full((x.shape[0],), float("nan")), name="nan")
    bank = ReliableBank(tmp_path / "bank", scorer)
    assert bank.update(["a"], flat(0.5), flat(0.5), step=0).accepted.tolist() == [False]


def test_entries_are_lossless_and_flat_by_key(tmp_path):
    bank = ReliableBank(tmp_path / "bank", brightness())
    image = torch.rand(3, 16, 16) * 1.2 - 0.1  # out of range on purpose: clamped
    bank.write("scene_001", image, score=0.5, step=2)
    path = bank.path("scene_001")
    assert path.parent.parent == tmp_path / "bank" and "rank" not in str(path)
    assert torch.equal(bank.read("scene_001").image, quantize(image))
    assert bank.keys() == ["scene_001"]
    with pytest.raises(ValueError, match="safe"):
        bank.path("../escape")


def test_a_different_metric_or_size_is_refused(tmp_path):
    seeded_bank(tmp_path, brightness(), "k", 0.9)
    other = ReliableBank(tmp_path / "bank", FunctionScorer(lambda x: x.std(dim=(1, 2, 3)), name="contrast"))
    with pytest.raises(UserError, match="brightness"):
        other.read("k")
    bank = ReliableBank(tmp_path / "bank", brightness())
    with pytest.raises(UserError, match="unlabeled_size"):
        bank.update(["k"], flat(0.1, size=4), flat(0.1, size=4), step=1)


def test_two_ranks_write_disjoint_keys_one_rank_reads_all(tmp_path):
    keys = [f"img_{i:03d}" for i in range(8)]
    for rank in range(2):  # world size 2: each rank owns every other key
        bank = ReliableBank(tmp_path / "bank", brightness())
        mine = keys[rank::2]
        levels = [0.1 + 0.1 * keys.index(k) for k in mine]
        bank.update(mine, teacher_output=flat(*levels), student_output=flat(*[0.0] * len(mine)), step=5)
    resumed = ReliableBank(tmp_path / "bank", brightness())  # world size 1 after resume
    assert resumed.keys() == keys
    for i, key in enumerate(keys):
        assert resumed.read(key).score == pytest.approx(0.1 + 0.1 * i, abs=1e-5)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from semi_llie.bank import ReliableBank
    from semi_llie.scoring import FunctionScorer
    bank = ReliableBank(sys.argv[1], FunctionScorer(lambda x: x.mean(dim=(1, 2, 3)), name="brightness"))
    step = 0
    while True:  # rewrite 4 entries forever; each image is flat at the level recorded as its score
        level = (step % 997) / 997
        bank.write(f"k{step % 4}", torch.full((3, 256, 256), level), score=level, step=step)
        step += 1
    """
)


def test_sigkill_mid_update_leaves_every_entry_whole(tmp_path):
    root = tmp_path / "bank"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(list(root.glob("*/*.pt"))) < 4:
            assert writer.poll() is None and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # let it overwrite entries for a while, then kill it mid-stream
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    bank = ReliableBank(root, brightness())
    assert bank.keys() == ["k0", "k1", "k2", "k3"]
    for key in bank.keys():
        entry = bank.read(key)
        assert entry.image.shape == (3, 256, 256)
        assert torch.all(entry.image == entry.image[0, 0, 0])  # not torn: one write's pixels throughout
        assert entry.image[0, 0, 0].item() == pytest.approx(entry.score, abs=1e-5)  # score matches image


def test_pyiqa_piqe_scorer_works_offline_and_is_lower_better(tmp_path):
    scorer = PyiqaScorer("piqe", batch_size=2)
    assert scorer.lower_better and scorer.name == "piqe"
    torch.manual_seed(0)
    scores = scorer(torch.rand(3, 3, 64, 64))
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    bank = ReliableBank(tmp_path / "bank", scorer)
    smooth = torch.linspace(0, 1, 64).expand(2, 3, 64, 64).contiguous()
    result = bank.update(["a", "b"], teacher_output=smooth, student_output=torch.rand(2, 3, 64, 64), step=0)
    assert result.positives.shape == (2, 3, 64, 64)
    assert set(bank.keys()) == {k for k, ok in zip(["a", "b"], result.accepted.tolist(), strict=True) if ok}
