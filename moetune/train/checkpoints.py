"""Complete Trainer checkpoints: a marker written last, so resume never picks a half-written one.

The Trainer writes `checkpoint-N/` file by file (adapter, optimizer, scheduler, RNG, trainer state); a
crash or `kill -9` in between leaves a directory that looks like a checkpoint. `MoETrainerMixin` writes
`moetune_checkpoint.json` after every other file of the checkpoint is on disk (each file fsynced,
then the marker atomically). The marker lists every file with its size, so a checkpoint whose files
were later truncated or removed is not complete either. `last_complete_checkpoint` is what
`resume_from_checkpoint=True` resumes from: the complete checkpoint with the highest step.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from moetune.io.atomic import atomic_write_text, fsync_dir

MARKER = "moetune_checkpoint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _files(directory: str) -> dict[str, int]:
    """Every regular file under `directory` (relative path -> size in bytes), the marker excepted."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MARKER and os.path.isfile(path):
                found[rel] = os.path.getsize(path)
    return found


def mark_complete(directory: str, step: int) -> None:
    """Flush every file of the checkpoint to disk, then write the marker (atomically) last."""
    files = _files(directory)
    for rel in files:
        with open(os.path.join(directory, rel), "rb") as fh:
            os.fsync(fh.fileno())
    for root, _, _ in os.walk(directory):
        fsync_dir(root)
    record = {"step": step, "files": files}
    atomic_write_text(os.path.join(directory, MARKER), json.dumps(record, indent=1, sort_keys=True))


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether the marker is there and every file it lists exists with its recorded size."""
    directory = os.fspath(directory)
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        return all(os.path.getsize(os.path.join(directory, rel)) == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` directory under `output_dir`, by step; complete or not."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest step (incomplete ones are skipped), or None."""
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def clear_for_rewrite(directory: str) -> None:
    """Remove an existing `checkpoint-N` before the Trainer writes it again (a half-written one left by a
    crash, or one from a run resumed at an earlier step): marker first, so it is never complete meanwhile."""
    if not os.path.isdir(directory):
        return
    marker = os.path.join(directory, MARKER)
    if os.path.exists(marker):
        os.unlink(marker)
        fsync_dir(directory)
    shutil.rmtree(directory)
