"""`moetune train` (moetune.app.cli.main) in a subprocess of tests/test_interrupt.py, paused at a known point.

    python -m tests.helpers.interrupt_worker MODE:STEP CLI-ARGS...

Before pausing the worker creates `OUTPUT_DIR/ready`; it goes on when `OUTPUT_DIR/go` exists (60 s at
most), so the test can send a signal at a point it knows:
- `after-step:K`: at the end of optimizer step K (before moetune's Ctrl-C check of that step);
- `in-save:K`: while checkpoint-K is half written (adapter, optimizer and scheduler there; RNG state,
  trainer state and completion marker not yet): a kill -9 there leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from transformers import TrainerCallback


def pause(output_dir: str) -> None:
    open(os.path.join(output_dir, "ready"), "w").close()
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(output_dir, "go")) and time.time() < deadline:
        time.sleep(0.02)


class PauseAfterStep(TrainerCallback):
    def __init__(self, step: int, output_dir: str) -> None:
        self.step, self.output_dir = step, output_dir

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            pause(self.output_dir)


def main(argv: list[str]) -> int:
    from moetune.app import cli
    from moetune.train.trainer import MoETrainer

    torch.set_num_threads(1)
    mode, step = argv[0].split(":")
    cli_args = argv[1:]
    output_dir = cli_args[cli_args.index("--output-dir") + 1]
    os.makedirs(output_dir, exist_ok=True)
    original_init, original_save_rng = MoETrainer.__init__, MoETrainer._save_rng_state

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if mode == "after-step":  # before moetune.app.run adds its SaveOnInterrupt: it runs after this one
            self.add_callback(PauseAfterStep(int(step), output_dir))

    def save_rng(self, checkpoint_dir, *args, **kwargs):
        if mode == "in-save" and self.state.global_step == int(step):
            pause(output_dir)
        return original_save_rng(self, checkpoint_dir, *args, **kwargs)

    MoETrainer.__init__, MoETrainer._save_rng_state = init, save_rng
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
