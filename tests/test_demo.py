"""`make demo-encoder` on the embedded MiniLM (small settings): every row present, GPTQ above RTN at 4 and 3 bits."""

import pytest

from lowbit.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_table(tmp_path):
    rows = run_demo(tmp_path, model="minilm-l6", fast=True)
    by = {(r["method"], r["bits"]): r for r in rows}
    assert set(by) == {(m, b) for m in ("rtn", "gptq") for b in (8, 4, 3)}
    assert by[("rtn", 8)]["cosine"] > 0.999
    for bits in (4, 3):
        assert by[("gptq", bits)]["cosine"] > by[("rtn", bits)]["cosine"]
        assert by[("gptq", bits)]["bpw"] == by[("rtn", bits)]["bpw"]
