"""Peers that live in an environment of their own (their pins clash with lowbit's): the adapter
saves the float model and the calibration windows into a temporary directory, runs a script of
bench/peers with the peer's interpreter, and reads the checkpoint the peer saved back in lowbit's
environment (bench/peers/gptq_layout.py for GPTQ-layout checkpoints).

The child's stdout and stderr go to a log file in the temporary directory; a failed child becomes
an exception whose first line is the child's last error line (the end of its log follows). The
child's CPU time and peak RSS (which the bench's own counters, taken in the parent, do not see)
are given back for the notes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .common import PeerUnavailable

HERE = Path(__file__).resolve().parent
UNAVAILABLE_RC = 3  # a child's exit status for "the peer's package cannot be imported here"


@dataclass
class ChildRun:
    report: dict  # what the child wrote to report.json
    wall_seconds: float
    cpu_seconds: float  # user + system time of the child
    peak_rss_mb: float  # the largest peak RSS of any child this process waited for so far


def interpreter(env_var: str, default: str, install: str) -> str:
    """The peer environment's python: $env_var, else `default`; PeerUnavailable with the install
    command when it is not there."""
    python = os.environ.get(env_var, default)
    if not Path(python).is_file():
        raise PeerUnavailable(f"no interpreter at {python} (set {env_var}); install the peer's environment: {install}")
    return python


def save_inputs(model: nn.Module, calib: torch.Tensor | None, tmp: Path) -> tuple[Path, Path | None]:
    """The float model (with its tokenizer, when its directory has one) and the calibration windows
    as the child reads them: tmp/float (save_pretrained) and tmp/calib.safetensors (input_ids)."""
    from safetensors.torch import save_file

    model_dir = tmp / "float"
    model.save_pretrained(model_dir)
    source = getattr(model, "name_or_path", "") or ""
    if source and Path(source).is_dir():
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
        except (OSError, ValueError):  # no tokenizer there: the child works from token ids
            pass
    calib_path = None
    if calib is not None:
        calib_path = tmp / "calib.safetensors"
        save_file({"input_ids": calib.to(torch.int64).contiguous()}, str(calib_path))
    return model_dir, calib_path


def run_child(python: str, script: str, spec: dict, tmp: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run bench/peers/`script` with `python` on spec (written to tmp/spec.json); the child writes
    tmp/report.json. Raises PeerUnavailable for exit status 3, RuntimeError for any other failure."""
    (tmp / "spec.json").write_text(json.dumps(spec))
    log = tmp / "child.log"
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | (env or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run([python, str(HERE / script), str(tmp / "spec.json")], stdout=out, stderr=subprocess.STDOUT,
                            env=child_env, cwd=tmp, check=False).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        text = log.read_text(errors="replace")
        if rc == UNAVAILABLE_RC:
            raise PeerUnavailable(_last_error(text))
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"{script} exited with status {rc}: {_last_error(text)}\n--- end of its log ---\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return ChildRun(json.loads((tmp / "report.json").read_text()), wall, cpu, after.ru_maxrss / 1024)


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or ln.startswith("UNAVAILABLE"):
            return ln.removeprefix("UNAVAILABLE: ")[:400]
    return lines[-1][:400] if lines else "no output"
