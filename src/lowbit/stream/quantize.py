"""Quantize a model that does not fit in memory: one block in float32 at a time.

The model is built on the meta device (no weight allocated); tensors are read from the
checkpoint's safetensors on demand (`CheckpointReader`, shards honoured) and each quantized module
goes to the artifact as soon as it is made (`ArtifactWriter`), its float weights freed. RTN needs
no forward pass: layer by layer, the peak is one layer's float32 weight. Methods that calibrate
(GPTQ, PTQ1.61, format searches) walk the blocks as the in-memory path does (`walk_blocks`): the
modules before the first block are loaded to compute its inputs, then each block is loaded in
float32, its Hessians gathered, its layers quantized, its quantized outputs computed for the next
block, and freed; the peak is one block plus the calibration activations. The same quantization
code runs on the same values in the same order, so the artifact is byte for byte the in-memory
path's (tested).

Resume: the work goes into `.NAME.lowbit-stream/` beside the output: the artifact being written,
and after every finished block (RTN: every layer) a progress record (the quantized tensors'
offsets, durable on disk first, and the next block's hidden-state inputs). A run that dies, kill -9
included, leaves it there; `--resume` continues from the last finished block and gives the same
artifact, byte for byte. The record names the model, the recipe and the lowbit version, and a
resume with other ones is refused.

Not streamed (refused with the reason): the preprocessing and the end-to-end tuning, which train
the whole model; calibrated layers outside the block list; GGUF sources and hub ids (give a local
safetensors directory).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..artifact import ArtifactWriter, dense_state
from ..calib.text import read_text
from ..calib.walker import walk_blocks
from ..errors import LowbitError
from ..models import find_blocks
from ..models.loading import LoadedModel, auto_class, check_local_model, checkpoint_dtype, model_kind, resolve, _source_format
from ..nn import QuantModule
from ..quantize import LayerPlan, QuantizeReport, _progress, _quantize_layer, plan_layers
from ..recipe import Recipe
from ..runtime.dense import HALF, HalfEmbedding
from ..validation.finite import NonFiniteError
from .safetensors_io import CheckpointReader

if TYPE_CHECKING:
    from ..parallel import Parallel

PROGRESS = "progress.json"
ARTIFACT = "artifact"
#: fault injection for the resume tests: SIGKILL this process once this many blocks/layers are recorded
KILL_AFTER = "LOWBIT_FAULT_KILL_AFTER"


class StreamError(LowbitError):
    pass


def _set_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put `value` in place of the parameter or buffer `key` (a dotted name) of `root`."""
    owner_name, _, leaf = key.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class _Source:
    """The checkpoint's tensors under the skeleton's state-dict keys, read in float32 (for work)
    or in their stored dtype (to store), every floating one checked finite as it is read."""

    def __init__(self, ckpt: CheckpointReader, aliases: dict[str, str], where: str) -> None:
        self.ckpt, self.aliases, self.where = ckpt, aliases, where

    def _name(self, key: str) -> str:
        return key if key in self.ckpt else self.aliases.get(key, key)  # a tied tensor may be stored once, under its owner

    def _non_finite(self, name: str) -> NonFiniteError:
        return NonFiniteError(f"{self.where}: tensor {name} holds NaN or infinite values; fix the checkpoint first "
                              "(nothing was written)")

    def read(self, key: str) -> torch.Tensor:
        name = self._name(key)
        t = self.ckpt.read(name)
        if t.is_floating_point() and not _all_finite(t):
            raise self._non_finite(name)
        return t

    def map(self, key: str) -> torch.Tensor:
        """`read`, mapped from the file instead (`CheckpointReader.map`): for the embedding table."""
        name = self._name(key)
        t = self.ckpt.map(name)
        if t.is_floating_point() and not self.ckpt.all_finite(name):
            raise self._non_finite(name)
        return t

    def load_into(self, root: nn.Module, prefix: str, module: nn.Module) -> None:
        """Every parameter (and stored buffer) of `module`, named `prefix`, in float32."""
        for key, value in module.state_dict(keep_vars=True).items():
            full = f"{prefix}.{key}" if prefix else key
            if full in self.ckpt or full in self.aliases:
                t = self.read(full)
                _set_tensor(root, full, t.float() if t.is_floating_point() else t)
            elif value.is_meta:
                raise StreamError(f"{self.where}: the checkpoint has no tensor {full}")


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """torch.isfinite(t).all(), a slice at a time: on a whole vocabulary-sized bf16 table the
    check's temporaries alone would be about a gigabyte."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _check_keys(model: nn.Module, ckpt: CheckpointReader, aliases: dict[str, str], where: str) -> None:
    wanted = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in aliases]
    missing = [k for k in wanted if k not in ckpt]
    if missing:
        raise StreamError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs ({', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}); is it this architecture's checkpoint, and complete?")


def _free(module: nn.Module) -> None:
    """Drop a module's tensors and hand the freed memory back to the system: glibc keeps freed
    blocks below its (self-raising, up to 32 MB) mmap threshold in the heap, so without the trim
    the resident size creeps up layer after layer."""
    module.to("meta")
    _trim_heap()


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _trim_heap() -> None:
    lib = _libc()
    if lib:
        lib.malloc_trim(0)


#: glibc's mallopt parameter for the size from which a block is mapped on its own (and unmapped when freed)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20


def _fix_mmap_threshold() -> None:
    """Map every block of 4 MB or more on its own, for the rest of the process. glibc raises its
    threshold to the largest block freed (up to 32 MB), after which a block's activations and
    temporaries come from the heap, which fragments and creeps up block after block (Qwen2.5-1.5B:
    the resident size between blocks grew 1.43 -> 1.61 GB over two blocks; fixed, it stays at 1.1)."""
    lib = _libc()
    if lib:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_LIBC = None


def work_dir(out: Path) -> Path:
    """Where a streamed run of `out` keeps its progress (beside it, hidden)."""
    return out.parent / f".{out.name}.lowbit-stream"


def _fingerprint(source: str, root: Path, ckpt: CheckpointReader, recipe: Recipe) -> str:
    from .. import __version__

    files = sorted({(info.file.name, info.file.stat().st_size) for info in ckpt.tensors.values()})
    blob = json.dumps({"source": source, "path": str(root.resolve()), "files": files, "recipe": recipe.to_dict(),
                       "lowbit": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """The resumable record of a streamed run (see the module docstring)."""

    def __init__(self, work: Path, fingerprint: str) -> None:
        self.work, self.fingerprint, self.saves = work, fingerprint, 0
        self.kill_after = int(os.environ.get(KILL_AFTER, "0") or 0)

    def load(self) -> dict:
        try:
            record = json.loads((self.work / PROGRESS).read_text())
        except (OSError, ValueError) as exc:
            raise StreamError(f"{self.work} holds no readable progress ({exc}); delete it to start over") from None
        if record.get("fingerprint") != self.fingerprint:
            raise StreamError(f"{self.work} is the progress of a run with another model, recipe or lowbit version; "
                              "delete it to start over, or resume with the same arguments")
        return record

    def hidden(self, block: int) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        stored = load_file(str(self.work / f"hidden-{block}.safetensors"))
        return [stored[str(i)] for i in range(len(stored))]

    def save(self, writer: ArtifactWriter, modules: dict, done: set[str], next_block: int,
             hidden: list[torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        if hidden is not None:  # written before the record that points at it
            tmp = self.work / f"hidden-{next_block}.safetensors.tmp"
            save_file({str(i): h.contiguous() for i, h in enumerate(hidden)}, str(tmp))
            os.replace(tmp, self.work / f"hidden-{next_block}.safetensors")
        _write_json(self.work / PROGRESS, {"fingerprint": self.fingerprint, "writer": writer.state(), "modules": modules,
                                           "done": sorted(done), "next_block": next_block})
        for old in self.work.glob("hidden-*.safetensors"):
            if old.name != f"hidden-{next_block}.safetensors":
                old.unlink()
        self.saves += 1
        if self.kill_after and self.saves >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def stream_quantize(source: str, recipe: Recipe, out: str | Path, *, force: bool = False, resume: bool = False,
                    show_progress: bool = True, max_shard_bytes: int | None = None,
                    parallel: "Parallel | None" = None) -> tuple[Path, QuantizeReport]:
    """Quantize the safetensors model `source` by `recipe` into the artifact `out`, holding one
    block (RTN: one layer) in float32 at a time. `resume`: continue an interrupted run of the same
    arguments from its last finished block. `parallel`: this process's rank in a data-parallel run
    (every rank calls this with the same arguments): the calibration batches are split, each
    block's Hessians all-reduced and its layers solved round-robin and shared, as the in-memory
    path does (`lowbit.parallel`); rank 0 alone writes the artifact. A data-parallel streamed run
    keeps no progress record (each rank would need its own hidden states): it is not resumable.
    Returns (artifact path, report)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    from ..pipeline import calibration_batches

    started = time.perf_counter()
    _fix_mmap_threshold()
    if recipe.cnn_only():
        raise StreamError(recipe.cnn_only())
    if recipe.preprocess.steps > 0 or recipe.tune.steps > 0:
        raise StreamError("preprocessing and end-to-end tuning train the whole model at once; they do not stream "
                          "(quantize without --stream, or set preprocess.steps / tune.steps to 0)")
    if recipe.scaling != "none":
        raise StreamError(f"scaling: {recipe.scaling} rescales the norms, which a streamed run copies from the checkpoint; it does not "
                          "stream yet (quantize without --stream, or drop scaling)")
    if recipe.hessian == "fisher":
        raise StreamError("hessian: fisher takes the loss gradients from a backward pass through the whole float model, "
                          "which a streamed run never holds; quantize without --stream, or use hessian: inputs")
    if recipe.rounding != "nearest":
        raise StreamError("rounding: learned keeps a float copy of the original model's hidden states, which a streamed "
                          "run does not yet; quantize without --stream, or drop rounding")
    if parallel is not None and resume:
        raise StreamError("a data-parallel streamed run keeps no progress to resume: run --resume in one process, "
                          "or start over without --resume")
    if recipe.calib.path:
        read_text(recipe.calib.path)
    path = resolve(source)
    root = Path(path)
    if not root.is_dir():
        what = "a GGUF file" if path.endswith(".gguf") else "a hub id"
        raise StreamError(f"{source} is {what}; streaming reads a local safetensors model directory (quantize it without "
                          "--stream, or download the model's safetensors first)")
    check_local_model(root, allow_pickle=False)
    ckpt = CheckpointReader(root)
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    kind = model_kind(config)
    dtype = checkpoint_dtype(config)
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    with init_empty_weights():
        model = auto_class(kind).from_config(config, dtype=torch.float32)
    model.tie_weights()  # empty-weight construction skips the tying that loading does
    model.eval()

    plans, skipped = plan_layers(model, recipe)
    quantized_keys = {f"{n}.{k}" for n in plans for k in model.get_submodule(n).state_dict()}
    dense_keys, aliases = dense_state(model, quantized_keys)  # before anything is loaded: ties are object identity
    src = _Source(ckpt, aliases, f"model {source}")
    _check_keys(model, ckpt, aliases, f"model {source}")
    needs_hessian = {n for n, p in plans.items() if p.scheme.needs_calibration}
    loaded = LoadedModel(model, tokenizer, kind, str(source), path, dtype, _source_format(str(source), path))
    batches, calib = calibration_batches(loaded, recipe) if needs_hessian else (None, {})
    blocks = find_blocks(model) if needs_hessian else None
    if needs_hessian and blocks is None:
        raise StreamError(f"model {source}: no block list found to calibrate block by block; quantize without --stream")
    if blocks is not None:
        outside = sorted(n for n in needs_hessian if not n.startswith(blocks[0] + "."))
        if outside:
            raise StreamError(f"{', '.join(outside[:3])}: calibrated layers outside the blocks do not stream; keep them "
                              "unquantized (--ignore) or give them RTN in a recipe override")

    report = QuantizeReport(skipped=skipped)
    out = Path(out)
    if parallel is not None:
        return _stream_parallel(parallel, model, ckpt, src, plans, recipe, report, out, force, max_shard_bytes, blocks,
                                batches, kind, needs_hessian, dense_keys, aliases, dtype, source, path, root, loaded,
                                calib, tokenizer, started, show_progress)
    work = work_dir(out)
    record = _Progress(work, _fingerprint(str(source), root, ckpt, recipe))
    state, done, start, start_hidden = None, set(), 0, None
    if work.exists() and not (work / PROGRESS).exists():  # died before its first record: nothing to resume
        shutil.rmtree(work)
    if work.exists():
        if not resume:
            raise StreamError(f"an interrupted streamed run of {out} left its progress in {work}: pass --resume to "
                              "continue it, or delete that directory to start over")
        saved = record.load()
        state, done, start = saved["writer"], set(saved["done"]), saved["next_block"]
        report.modules.update(saved["modules"])
        start_hidden = record.hidden(start) if start and needs_hessian else None
    writer = ArtifactWriter(out, force=force, sources=(root,), work=work / ARTIFACT, state=state,
                            max_shard_bytes=max_shard_bytes, entropy_code=recipe.entropy_code)
    try:
        job = _Job(model, src, plans, recipe, report, writer, record, done, start)
        _run(job, blocks, batches, kind, needs_hessian, start_hidden, show_progress)
        result = _finish(job, writer, dense_keys, aliases, dtype, source, path, kind, loaded, calib, tokenizer, started)
    except BaseException as exc:
        kept = (work / PROGRESS).exists()
        if kept:
            print(f"lowbit: progress kept in {work}; rerun with --resume to continue", file=sys.stderr)
        else:
            writer.abort()
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StreamError(f"out of disk space writing {out} (in {work}): free space"
                              + (" and rerun with --resume" if kept else " and rerun") + "; the output was not written") from exc
        raise
    shutil.rmtree(work, ignore_errors=True)
    return result, report


def _finish(job: "_Job", writer: ArtifactWriter, dense_keys: dict, aliases: dict, dtype: torch.dtype, source: str,
            path: str, kind: str, loaded: LoadedModel, calib: dict, tokenizer, started: float) -> Path:
    """The unquantized tensors, then the header: the artifact complete and in place."""
    _write_dense(job, dense_keys, aliases, dtype, str(source))
    source_info = {"model": str(source), "path": path, "kind": kind, "dtype": str(dtype).removeprefix("torch."),
                   "source_format": loaded.source_format, "calibration": calib}
    job.report.seconds = time.perf_counter() - started
    return writer.finish(config=job.model.config, tokenizer=tokenizer, source=source_info, recipe=job.recipe.to_dict(),
                         skipped=job.report.skipped, dense_dtype=dtype)


class _NoRecord:
    """A data-parallel run's stand-in for `_Progress`: it records nothing (not resumable)."""

    def save(self, *_args, **_kwargs) -> None:
        pass


def _stream_parallel(parallel: "Parallel", model, ckpt, src, plans, recipe, report, out, force, max_shard_bytes, blocks,
                     batches, kind, needs_hessian, dense_keys, aliases, dtype, source, path, root, loaded, calib, tokenizer,
                     started, show_progress) -> tuple[Path, QuantizeReport]:
    """`stream_quantize` under torchrun: every rank walks the blocks on its share of the batches;
    rank 0 writes (its writer's work directory is an ordinary fresh one, removed on failure)."""
    writer = (ArtifactWriter(out, force=force, sources=(root,), max_shard_bytes=max_shard_bytes,
                             entropy_code=recipe.entropy_code) if parallel.is_main else None)
    try:
        job = _Job(model, src, plans, recipe, report, writer, _NoRecord(), set(), 0, parallel)
        _run(job, blocks, parallel.shard(batches) if batches else batches, kind, needs_hessian, None,
             show_progress and parallel.is_main)
        if writer is None:
            return out, report
        result = _finish(job, writer, dense_keys, aliases, dtype, source, path, kind, loaded, calib, tokenizer, started)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return result, report


@dataclass
class _Job:
    """One streamed run's state: the meta model, where tensors come from and go to, what is done."""

    model: nn.Module
    src: _Source
    plans: dict[str, LayerPlan]
    recipe: Recipe
    report: QuantizeReport
    writer: ArtifactWriter | None
    record: "_Progress | _NoRecord"
    done: set[str]
    next_block: int  # the first block not finished (a resumed run starts there)
    parallel: "Parallel | None" = None  # a data-parallel run: this rank (rank 0 holds the writer)

    def quantize(self, name: str, hessian: torch.Tensor | None) -> None:
        """Quantize one (loaded) layer in place."""
        self.report.modules[name] = _quantize_layer(self.model, name, self.plans[name], hessian, self.recipe)

    def store(self, name: str) -> None:
        """Write a quantized layer to the artifact (rank 0 of a data-parallel run) and free it."""
        layer = self.model.get_submodule(name)
        assert isinstance(layer, QuantModule)
        m = self.report.modules[name]
        if self.writer is not None:
            self.writer.add_module(name, layer, {k: m[k] for k in ("method", "target", "target_note") if k in m})
        _free(layer)
        self.done.add(name)

    def save(self, hidden: list[torch.Tensor] | None = None) -> None:
        self.record.save(self.writer, self.report.modules, self.done, self.next_block, hidden)


def _run(job: _Job, blocks, batches, kind: str, needs_hessian: set[str], start_hidden, show_progress: bool) -> None:
    """Quantize every planned layer of `job`: calibrated ones block by block, the rest layer by layer."""
    model, plans = job.model, job.plans
    with torch.inference_mode(), _progress() as progress:
        task = progress.add_task("quantizing (streamed)", total=len(plans), completed=len(job.done), layer="",
                                 visible=show_progress)

        def quantize(name: str, hessian: torch.Tensor | None) -> None:
            progress.update(task, layer=name)
            job.quantize(name, hessian)
            progress.advance(task)

        if blocks is not None:
            blocks_name, block_list = blocks
            head = model.get_output_embeddings()
            for name, module in model.named_children():  # what runs before the first block: everything but the blocks
                _load_outside_blocks(model, job.src, name, module, blocks_name, head)

            def prepare(i: int, block: nn.Module) -> None:
                job.src.load_into(model, f"{blocks_name}.{i}", block)

            par = job.parallel

            def on_block(_i: int, prefix: str, _block: nn.Module, hessians: dict[str, torch.Tensor]) -> None:
                names = [n for n in plans if n.startswith(prefix + ".")]
                for k, name in enumerate(names):
                    hessian = hessians.pop(name, None)  # dropped once its layer is done (shared ones: at the last)
                    if par is None or par.owner(k) == par.rank:
                        quantize(name, hessian)
                    else:
                        progress.advance(task)
                    del hessian
                if par is not None:  # every rank needs the whole quantized block for the next one's inputs
                    for k, name in enumerate(names):
                        job.report.modules[name] = par.share_module(model, name, par.owner(k), job.report.modules.get(name))

            def release(i: int, block: nn.Module, next_hidden: list[torch.Tensor] | None) -> None:
                for name in [n for n in plans if n.startswith(f"{blocks_name}.{i}.")]:
                    job.store(name)  # only now: the quantized block made the next block's inputs
                _free(block)
                job.next_block = i + 1
                job.save(next_hidden)

            if job.next_block < len(block_list):
                walk_blocks(model, blocks_name, block_list, batches, kind, needs_hessian, on_block, prepare, release,
                            job.next_block, start_hidden, reduce=None if par is None else par.reduce_hessian)
        if job.writer is None:  # a data-parallel rank other than 0: the rest is rank 0's to write
            return
        for name in plans:  # RTN layers (all of them without calibration): one at a time
            if name not in job.done:
                job.src.load_into(model, name, model.get_submodule(name))
                quantize(name, None)
                job.store(name)
                job.save()


def _write_dense(job: _Job, dense_keys: dict[str, torch.Tensor], aliases: dict[str, str], dtype: torch.dtype,
                 source: str) -> None:
    """Every unquantized tensor, read from the checkpoint in its stored precision (buffers the
    checkpoint does not hold: the model's own), and the tied aliases."""
    for key, own in dense_keys.items():
        value = job.src.read(key) if key in job.src.ckpt or key in aliases else own
        if value.is_meta:
            raise StreamError(f"model {source}: the checkpoint has no tensor {key}")
        job.writer.add_dense(key, value, dtype)
        del value  # before the next read: two vocabulary-sized tensors (embedding, output) never at once
    for key, target in aliases.items():
        job.writer.add_alias(key, target)


def _load_outside_blocks(model: nn.Module, src: _Source, name: str, module: nn.Module, blocks_name: str,
                         head: nn.Module | None) -> None:
    """Load the parts of `module` (a child of the model, `name`) that lie outside the block list
    and are not the output head (which runs after the blocks, never during calibration)."""
    if module is head or blocks_name == name:
        return
    if isinstance(module, nn.Embedding):  # a half-precision table stays so: lookups widen only their rows (exact)
        weight = src.map(f"{name}.weight")  # mapped: only the rows the calibration text looks up become resident
        if weight.dtype in HALF:
            model.set_submodule(name, HalfEmbedding(weight, module.padding_idx))
            return
        del weight
    if blocks_name.startswith(name + "."):
        for child_name, child in module.named_children():
            _load_outside_blocks(model, src, f"{name}.{child_name}", child, blocks_name, head)
        for key in list(module._parameters) + list(module._buffers):
            _load_direct(model, src, f"{name}.{key}")
        return
    src.load_into(model, name, module)


def _load_direct(model: nn.Module, src: _Source, key: str) -> None:
    if key in src.ckpt:
        t = src.read(key)
        _set_tensor(model, key, t.float() if t.is_floating_point() else t)
