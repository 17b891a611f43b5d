"""Complete checkpoints: resume never picks a half-written one (moetune.train.checkpoints, the mixin)."""

from __future__ import annotations

import os

import pytest
import torch

from moetune.train import checkpoints
from tests.helpers.models import snapshot, trainer


def half_write(checkpoint: str) -> None:
    """What a kill -9 in the middle of writing leaves: some files, one of them cut short, no marker."""
    os.unlink(os.path.join(checkpoint, checkpoints.MARKER))
    os.unlink(os.path.join(checkpoint, "trainer_state.json"))
    with open(os.path.join(checkpoint, "optimizer.pt"), "r+b") as fh:
        fh.truncate(100)


def test_resume_true_skips_a_half_written_checkpoint(tmp_path) -> None:
    full = trainer(str(tmp_path / "a"))
    full.train()
    expected = snapshot(full)
    out = str(tmp_path / "b")
    trainer(out).train()  # save_steps=3: checkpoints 3, 6 (and 8, the end)
    steps = [step for step, _ in checkpoints.checkpoints(out)]
    assert steps[:2] == [3, 6] and all(checkpoints.is_complete(p) for _, p in checkpoints.checkpoints(out))
    for step, path in checkpoints.checkpoints(out):
        if step > 6:
            os.rename(path, os.path.join(out, "later-run-removed"))
    half_write(os.path.join(out, "checkpoint-6"))
    assert checkpoints.last_complete_checkpoint(out) == os.path.join(out, "checkpoint-3")

    with pytest.raises(ValueError, match=r"checkpoint-6: not a complete moetune checkpoint.*checkpoint-3"):
        trainer(out).train(resume_from_checkpoint=os.path.join(out, "checkpoint-6"))
    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=True)
    got = snapshot(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert checkpoints.is_complete(os.path.join(out, "checkpoint-6"))  # rewritten from scratch
    assert "trainer_state.json" in os.listdir(os.path.join(out, "checkpoint-6"))


def test_marker_lists_sizes_and_rotation_keeps_complete_ones(tmp_path) -> None:
    out = str(tmp_path)
    trainer(out, max_steps=6, save_total_limit=1).train()
    assert [step for step, _ in checkpoints.checkpoints(out)] == [6]
    last = os.path.join(out, "checkpoint-6")
    assert checkpoints.is_complete(last)
    with open(os.path.join(last, "scheduler.pt"), "ab") as fh:  # a file changed after the marker
        fh.write(b"x")
    assert not checkpoints.is_complete(last)
    assert checkpoints.last_complete_checkpoint(out) is None
    with pytest.raises(ValueError, match="no complete checkpoint to resume from"):
        trainer(out, max_steps=6).train(resume_from_checkpoint=True)
