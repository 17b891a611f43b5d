"""benchmarks/op_count.py: the counting mode sees every op and the bytes it returns, views excluded."""

from __future__ import annotations

import torch

from tests.helpers import benchmark

op_count = benchmark("op_count")


def test_counts_ops_and_the_bytes_they_return():
    x = torch.ones(4, 8)
    with op_count.Counts() as counts:
        y = x * 2  # mul: 4 * 8 float32 = 128 bytes
        y.view(32)  # a view: counted, no bytes
        y.to(torch.bfloat16)  # _to_copy: 64 bytes
    assert counts.calls["mul"] == 1 and counts.calls["view"] == 1
    assert counts.bytes["mul", "float32"] == 128
    assert counts.bytes["_to_copy", "bfloat16"] == 64
    assert not any(op == "view" for op, _ in counts.bytes)


def test_the_table_compares_one_step(tmp_path, capsys):
    out = tmp_path / "counts.md"
    assert (
        op_count.main(["--layers", "1", "--batch", "1", "--seq", "8", "--top", "3", "--out", str(out)]) == 0
    )
    text = out.read_text()
    ops_row = next(line for line in text.splitlines() if line.startswith("| ops |"))
    peft_ops, moe_ops, extra = (int(cell) for cell in ops_row.strip("|").split("|")[1:])
    assert moe_ops > peft_ops > 0 and extra == moe_ops - peft_ops  # routing adds ops to the same layers
    assert text == capsys.readouterr().out
