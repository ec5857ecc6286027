"""Fuzz the artifact reader: mutated (and re-signed) headers, mutated safetensors headers,
truncated and extended files. Every mutated artifact must either load (and run, and inspect)
or be refused with lowbit's own error; never another exception, never an allocation beyond the
artifact's size plus a fixed margin (enforced: the address-space limit is set to what the process
uses after a clean load plus `--margin-mb`), never a read outside the artifact directory (an
audit hook watches every `open`).

    python -m bench.fuzz_artifacts --n 20000            # the long run (make test runs 2,000)

Prints a summary and writes it as JSON (`--out`); exit code 1 if anything failed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POOL: list[Any] = [
    None, True, False, -1, 0, 1, 3, 2**31, 2**63, 10**30, 1.5, -0.0, "", "x", "int4", "linear", "ptq161",
    "../secret.txt", "/etc/passwd", "..", "a/b", [], {}, [1, 2, 3], [2**14, 2**17], [16, -16], [0, 16],
    {"format": "int4"}, {"format": "lut", "levels": [0.5] * 3}, {"format": "nf4", "symmetric": 7},
]


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


def build_artifact(root: Path) -> Path:
    """A tiny Llama (1 block, width 16) with several grids, saved as an artifact."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.artifact import save
    from lowbit.quantize import quantize_model
    from lowbit.recipe import Recipe

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    recipe = Recipe.from_dict({
        "method": "rtn", "format": "int4", "group_size": 8,
        "overrides": [{"pattern": "down_proj", "format": "ternary"}, {"pattern": "k_proj", "format": "nf4"},
                      {"pattern": "v_proj", "format": "int3", "symmetric": True, "group_size": -1}],
    })
    quantize_model(model, recipe, "causal-lm", None, show_progress=False)
    return save(model, root / "art", source={"model": "tiny", "kind": "causal-lm"}, recipe=recipe.to_dict())


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sign(header: dict) -> bytes:
    h = {k: v for k, v in header.items() if k != "header_sha256"}
    h["header_sha256"] = hashlib.sha256(_canonical(h)).hexdigest()
    return json.dumps(h, allow_nan=True).encode()


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(doc: dict, rng: random.Random) -> tuple[dict, str]:
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent, key = _get(doc, path[:-1]), path[-1]
    op = rng.random()
    if op < 0.55:
        value = rng.choice(POOL + ["<DEEP>", float("nan"), float("inf")])
        parent[key] = _deep(rng.choice([40, 400])) if value == "<DEEP>" and rng.random() < 0.5 else copy.deepcopy(value)
        what = f"set {path} = {str(value)[:40]}"
    elif op < 0.75 and isinstance(parent, dict):
        del parent[key]
        what = f"delete {path}"
    elif op < 0.85 and isinstance(parent, dict):
        parent[rng.choice(["extra", "../x", "/abs", "kind", "shape"])] = rng.choice(POOL)
        what = f"add key beside {path}"
    else:
        v = parent[key]
        if isinstance(v, bool):
            parent[key] = not v
        elif isinstance(v, int):
            parent[key] = v + rng.choice([-1, 1, 2**20, -v - 1])
        elif isinstance(v, str):
            parent[key] = v[::-1] if rng.random() < 0.5 else v + "x"
        elif isinstance(v, list) and v:
            v.append(copy.deepcopy(v[0]))
        what = f"perturb {path}"
    return doc, what


def forge_module(doc: dict, rng: random.Random) -> tuple[dict, str]:
    """A self-consistent forgery: one module's shape (and group size) changed, with its numel and
    stored bytes recomputed the way lowbit computes them, so that only the stored tensors can tell."""
    from lowbit.nn.base import module_class
    from lowbit.validation.stored import _nbytes

    doc = copy.deepcopy(doc)
    name = rng.choice(sorted(doc["modules"]))
    entry = doc["modules"][name]
    entry["shape"] = rng.choice([[2**14, 2**17], [2**20, 2**12], [entry["shape"][0], entry["shape"][1] * 2], [1, 1]])
    entry["group_size"] = rng.choice([entry["group_size"], -1, 0])
    entry["numel"] = entry["shape"][0] * entry["shape"][1]
    try:
        specs = module_class(entry).state_specs(entry)
        entry["stored_bytes"] = {k: _nbytes(v) for k, v in specs.items() if k != "bias"}
    except (ValueError, KeyError, TypeError):
        pass
    return doc, f"forge {name} shape {entry['shape']} g{entry['group_size']}"


def mutate_safetensors(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    keys = [k for k in meta if k != "__metadata__"]
    key = rng.choice(keys)
    entry = meta[key]
    op = rng.randrange(5)
    if op == 0:
        entry["shape"] = rng.choice([[2**14, 2**17], [0], [len(body) * 4], [1, 1, 1]])
    elif op == 1:
        entry["dtype"] = rng.choice(["F32", "U8", "F16", "I64", "F8_E4M3", "XX"])
    elif op == 2:
        entry["data_offsets"] = [0, rng.choice([1, len(body) + 8, 2**40])]
    elif op == 3:
        meta[key + ".extra"] = dict(entry)
    else:
        del meta[key]
    text = json.dumps(meta).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + body, f"safetensors {key} op {op}"


def run(n: int, seed: int, margin_mb: int) -> dict:
    import torch

    import lowbit
    from lowbit.artifact import validate
    from lowbit.checksum import sha256_file
    from lowbit.errors import LowbitError

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    try:
        art = build_artifact(work)
        secret = work / "secret.txt"
        secret.write_text("outside the artifact")
        pristine = {p.name: p.read_bytes() for p in art.iterdir()}
        header0 = json.loads(pristine["lowbit.json"])
        art_bytes = sum(len(b) for b in pristine.values())
        ids = torch.tensor([[1, 2, 3, 4]])
        lowbit.load(art)(input_ids=ids)  # warm up: libraries loaded, thread pools started

        outside: list[str] = []
        watching = True
        art_real = str(art.resolve())

        def audit(event: str, args: tuple) -> None:
            if watching and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(args[0]))
                if p.startswith(str(work)) and not p.startswith(art_real):
                    outside.append(p)

        sys.addaudithook(audit)
        vm_now = _vm_bytes()
        limit = vm_now + art_bytes + margin_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

        try:  # the bound is real: one allocation beyond it fails
            torch.empty(art_bytes + ((margin_mb + 64) << 20), dtype=torch.uint8)
            enforced = False
        except RuntimeError:
            enforced = True

        rng = random.Random(seed)
        counts = {"loaded": 0, "refused": 0}
        failures: list[dict] = []
        start = time.perf_counter()
        for i in range(n):
            for name, data in pristine.items():
                (art / name).write_bytes(data)
            header = copy.deepcopy(header0)
            r = rng.random()
            if r < 0.1:
                header, what = forge_module(header, rng)
                (art / "lowbit.json").write_bytes(sign(header))
            elif r < 0.7:
                header, what = mutate_json(header, rng)
                text = sign(header)  # "<DEEP>" left as a string: nested past any parser's recursion limit
                (art / "lowbit.json").write_bytes(text.replace(b'"<DEEP>"', b"[" * 100000 + b"]" * 100000))
            else:
                target = rng.choice(["quantized.safetensors", "dense.safetensors", "config.json"])
                data = pristine[target]
                if target.endswith(".safetensors") and r < 0.85:
                    data, what = mutate_safetensors(data, rng)
                elif r < 0.92:
                    cut = rng.randrange(len(data))
                    data, what = data[:cut], f"truncate {target} at {cut}"
                else:
                    data, what = data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), f"extend {target}"
                (art / target).write_bytes(data)
                if rng.random() < 0.8:  # re-signed: the attacker recomputes every checksum
                    header["files"][target] = sha256_file(art / target)
                    what += " (re-signed)"
                (art / "lowbit.json").write_bytes(sign(header))
            try:
                validate(art)
                model = lowbit.load(art)
                with torch.inference_mode():
                    model(input_ids=ids)
                _inspect(art)
                counts["loaded"] += 1
            except LowbitError:
                counts["refused"] += 1
            except BaseException as exc:  # noqa: BLE001 - anything else is a finding
                failures.append({"i": i, "mutation": what, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        seconds = time.perf_counter() - start
        watching = False  # the harness's own clean-up below is not the loader's
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n, "seed": seed, **counts, "failures": failures, "reads_outside": sorted(set(outside)),
        "artifact_bytes": art_bytes, "memory_margin_mb": margin_mb, "limit_enforced": enforced, "seconds": round(seconds, 2),
    }


def _inspect(art: Path) -> None:
    """`lowbit inspect` on an artifact that loaded: it must print, not crash."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    res = CliRunner().invoke(app, ["inspect", str(art)])
    if res.exit_code != 0:
        raise RuntimeError(f"inspect failed on a loadable artifact: {res.output[-300:]}")


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="mutated artifacts to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin-mb", type=int, default=256, help="address space allowed beyond the warm process + artifact size")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fuzz_artifacts.json"))
    args = ap.parse_args()
    result = run(args.n, args.seed, args.margin_mb)
    print(f"{result['n']} mutated artifacts in {result['seconds']} s: {result['loaded']} loaded, {result['refused']} refused, "
          f"{len(result['failures'])} failures, {len(result['reads_outside'])} reads outside the artifact")
    for f in result["failures"][:20]:
        print(f"  #{f['i']}: {f['mutation']}: {f['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if result["failures"] or result["reads_outside"] or not result["limit_enforced"] else 0)


if __name__ == "__main__":
    main()
