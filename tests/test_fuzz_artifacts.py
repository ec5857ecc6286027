"""The artifact reader under 2,000 mutated artifacts (bench/fuzz_artifacts.py, seeded): each one
loads or is refused with lowbit's error, never another exception, never an allocation beyond the
artifact's size plus 256 MB (the address-space limit is set in the fuzzing process, and shown to
bite), never a read outside the artifact directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_thousand_mutated_artifacts(tmp_path):
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "bench.fuzz_artifacts", "--n", "2000", "--seed", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["limit_enforced"], "the memory bound did not hold in the fuzzing process"
    assert result["failures"] == [], proc.stdout[-3000:]
    assert result["reads_outside"] == []
    assert result["n"] == 2000 and result["loaded"] > 100 and result["refused"] > 1000  # both outcomes exercised
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
