"""The lowbit artifact: a directory that holds a quantized model, and how to write and read it.

    out/
      lowbit.json             header: lowbit version, source model, recipe, per-module kind
                              (the runtime class: "linear", "ptq161"), grid, layout and bits per
                              weight, totals, sha256 of every other file, and a sha256 of the
                              header itself
      quantized.safetensors   per quantized module: packed codes and packed/fp16 grid parameters
                              (past --max-shard-size: quantized-0000k-of-0000n.safetensors shards,
                              listed in the header's quantized_shards)
      dense.safetensors       every other tensor (embeddings, norms, biases of skipped layers ...)
      config.json, tokenizer files   to rebuild the model and its tokenizer offline

Written piece by piece (`ArtifactWriter`: a model in memory, or one streamed block by block)
into a temporary directory beside the target, then renamed into place: an interrupted
save leaves nothing half-written, and with `force` only an existing *artifact* is replaced
(`validation.paths`). Reading treats every byte as untrusted: the header is parsed with bounds
and checked against a schema (`validation.header`), every file against its sha256, every stored
tensor's shape against what the header's modules need (`validation.stored`), and the model
skeleton is built on the meta device, so nothing is allocated from a claimed shape.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .checksum import sha256_file
from .coding import CodedSymbols, CodingError, decode_symbols, encode_symbols
from .errors import ArtifactError  # noqa: F401  (re-exported: callers catch lowbit.artifact.ArtifactError)
from .formats import grid_from_spec
from .models import auto_class, is_linear, linear_weight
from .nn import QuantModule, module_from_entry
from .runtime.dense import keep_half_precision
from .stream.safetensors_io import SafetensorsWriter
from .validation.header import MAX_DIM, MAX_HEADER_BYTES, HeaderError, parse_json, validate_header
from .validation.paths import check_output, clean_stale_work_dirs, make_work_dir, swap_into_place
from .validation.stored import StoredTensorError, check_stored_tensors

HEADER = "lowbit.json"
QUANTIZED = "quantized.safetensors"
DENSE = "dense.safetensors"
FORMAT_VERSION = 1




def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def quantized_modules(model: nn.Module) -> dict[str, QuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}


def dense_state(model: nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state that is not in `skip` (the quantized modules' tensors), each shared
    (tied) tensor once: (key -> tensor, alias key -> the key it shares). Identity decides ties:
    the tensor object, or for real tensors also the same storage and shape."""
    dense: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in skip:
            continue
        idents = [("obj", id(value))] + ([] if value.is_meta else [("ptr", value.data_ptr(), tuple(value.shape))])
        first = next((owner[i] for i in idents if i in owner), None)
        if first is not None:  # a tied tensor: store once
            aliases[key] = first
            continue
        for i in idents:
            owner[i] = key
        dense[key] = value
    return dense, aliases


def _module_entry(name: str, module: QuantModule, info: dict, coded: CodedSymbols | None = None) -> dict:
    stored = module.storage_bytes()
    numel = module.in_features * module.out_features
    extra: dict = {}
    if coded is not None:  # the codes are stored as an ANS stream and its model (`coding.ans`)
        extra = {"coding": {"codes": {"kind": "ans", "n": coded.n, "words": int(coded.words.size),
                                      "alphabet": int(coded.counts.size)}},
                 "bpw_packed": 8 * sum(stored.values()) / numel}
        stored = {**stored, "codes": coded.nbytes}
    return {**info, **module.entry(), "numel": numel, "stored_bytes": stored, "bpw": 8 * sum(stored.values()) / numel,
            **extra}


#: module kinds whose main codes (the `codes` buffer of one QuantizedWeight) can be stored entropy-coded
CODED_KINDS = ("linear", "rotated-linear")


def _entropy_code(module: QuantModule) -> CodedSymbols | None:
    """The module's codes as an ANS stream, or None where that would not be smaller than packed."""
    if module.kind not in CODED_KINDS:
        return None
    qw = module.quantized_weight()
    coded = encode_symbols(qw.codes.numpy(), 2**qw.grid.bits)
    return coded if coded.nbytes < qw.grid.packed_nbytes(qw.codes.numel()) else None


def _coded_tensors(coded: CodedSymbols) -> dict[str, torch.Tensor]:
    words = np.ascontiguousarray(coded.words, dtype="<u4").view(np.uint8)
    return {"codes_ans": torch.from_numpy(words.copy()), "codes_ans_counts": torch.from_numpy(coded.counts.astype(np.int32))}


def decode_coded_modules(header: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Replace every entropy-coded module's stream in `tensors` by its packed `codes`, in place."""
    for name, entry in header["modules"].items():
        spec = (entry.get("coding") or {}).get("codes")
        if spec is None:
            continue
        words = tensors.pop(f"{name}.codes_ans")
        counts = tensors.pop(f"{name}.codes_ans_counts")
        grid = grid_from_spec(entry["grid"])
        coded = CodedSymbols(np.frombuffer(words.numpy().tobytes(), dtype="<u4"), counts.numpy(), int(spec["n"]))
        try:
            codes = decode_symbols(coded)
        except CodingError as exc:
            raise ArtifactError(f"{where}: module {name}: {exc}") from None
        out_f, in_f = entry["shape"]
        if coded.n != out_f * in_f or codes.size and int(codes.max()) >= 2**grid.bits:
            raise ArtifactError(f"{where}: module {name}: its coded codes do not fit its {out_f}x{in_f} {grid.bits}-bit grid")
        tensors[f"{name}.codes"] = grid.pack(torch.from_numpy(codes.astype(np.uint8)).reshape(out_f, in_f))


class ArtifactWriter:
    """Write an artifact piece by piece: quantized modules as they are made, dense tensors, then
    the header (`finish`). Everything goes into a work directory beside `out` that replaces it
    only once complete. `save` uses it for a model in memory, `stream.quantize` block by block:
    the same pieces give the same bytes, whatever order they came in."""

    def __init__(self, out: str | Path, *, force: bool = False, sources: tuple[Path, ...] = (), work: Path | None = None,
                 state: dict | None = None, max_shard_bytes: int | None = None, entropy_code: bool = False) -> None:
        """`work`: a work directory of the caller's choosing (one a resumed run finds again) instead
        of a fresh one; `state` (from `state()`): continue what a previous writer there recorded.
        `entropy_code`: store each linear's codes as an ANS stream where that is smaller (`coding`)."""
        self.out = Path(out)
        self.entropy_code = entropy_code
        self.max_shard_bytes = max_shard_bytes
        check_output(self.out, force=force, sources=sources)
        clean_stale_work_dirs(self.out)
        if work is None:
            self.tmp = make_work_dir(self.out)
        else:
            work.mkdir(parents=True, exist_ok=state is not None)
            self.tmp = work
        self.quantized = SafetensorsWriter(self.tmp / QUANTIZED, state and state["quantized"])
        self.modules: dict[str, dict] = dict(state["modules"]) if state else {}
        self.dense = SafetensorsWriter(self.tmp / DENSE)
        self.aliases: dict[str, str] = {}
        self.dense_numel = self.dense_bytes = 0

    def state(self) -> dict:
        """The quantized modules written so far, durable on disk (dense tensors and aliases are
        written at the end, so a resumed writer redoes them)."""
        return {"quantized": self.quantized.state(), "modules": self.modules}

    def add_module(self, name: str, module: QuantModule, info: dict | None = None) -> None:
        coded = _entropy_code(module) if self.entropy_code else None
        state = module.state_dict()
        if coded is not None:
            del state["codes"]
            state.update(_coded_tensors(coded))
        for key, value in state.items():
            self.quantized.add(f"{name}.{key}", value)
        self.modules[name] = _module_entry(name, module, info or {}, coded)

    def add_dense(self, key: str, value: torch.Tensor, dtype: torch.dtype) -> None:
        """A dense tensor, floating ones stored in `dtype` (the source checkpoint's)."""
        v = value.detach()
        v = v.to(dtype) if v.is_floating_point() else v
        self.dense.add(key, v)
        self.dense_numel += v.numel()
        self.dense_bytes += v.numel() * v.element_size()

    def add_alias(self, key: str, target: str) -> None:
        self.aliases[key] = target

    def finish(self, *, config=None, tokenizer=None, source: dict | None = None, recipe: dict | None = None,
               skipped: dict[str, str] | None = None, dense_dtype: torch.dtype = torch.float32) -> Path:
        if not self.modules:
            raise ArtifactError("the model holds no quantized module; quantize it before saving")
        shards = [p.name for p in self.quantized.finish(max_shard_bytes=self.max_shard_bytes)]
        self.dense.finish()
        tmp = self.tmp
        if config is not None:
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modules = dict(sorted(self.modules.items()))
        q_numel = sum(m["numel"] for m in modules.values())
        q_bytes = sum(sum(m["stored_bytes"].values()) for m in modules.values())
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        header = {
            "lowbit_version": __version__,
            "format_version": FORMAT_VERSION,
            "source": source or {},
            "recipe": recipe or {},
            "dense_dtype": str(dense_dtype).removeprefix("torch."),
            "modules": modules,
            "skipped": dict(sorted((skipped or {}).items())),
            "aliases": dict(sorted(self.aliases.items())),
            "summary": {
                "quantized_params": q_numel,
                "quantized_bytes": q_bytes,
                "bpw": 8 * q_bytes / q_numel,
                "dense_params": self.dense_numel,
                "dense_bytes": self.dense_bytes,
            },
            "files": files,
        }
        if shards != [QUANTIZED]:
            header["quantized_shards"] = shards
        header["header_sha256"] = hashlib.sha256(_canonical(header)).hexdigest()
        (tmp / HEADER).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        swap_into_place(tmp, self.out)  # with force, the old artifact (checked above) goes only once the new one is in
        return self.out

    def abort(self) -> None:
        self.quantized.abort()
        self.dense.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def save(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    source: dict | None = None,
    recipe: dict | None = None,
    module_info: dict[str, dict] | None = None,
    skipped: dict[str, str] | None = None,
    dense_dtype: torch.dtype = torch.float32,
    force: bool = False,
    max_shard_bytes: int | None = None,
    entropy_code: bool = False,
) -> Path:
    """Write `model` (with quantized modules) as an artifact directory; returns its path.
    `force` replaces an existing artifact, never anything else. `max_shard_bytes`: split the
    quantized tensors into shards of at most that much data (one tensor per shard at least)."""
    out = Path(out_dir)
    sources = tuple(Path(p) for p in [(source or {}).get("path")] if p and Path(p).exists())
    qmods = quantized_modules(model)
    writer = ArtifactWriter(out, force=force, sources=sources, max_shard_bytes=max_shard_bytes, entropy_code=entropy_code)
    with writer:
        if not qmods:
            raise ArtifactError("the model holds no quantized module; quantize it before saving")
        for name, module in qmods.items():
            writer.add_module(name, module, (module_info or {}).get(name, {}))
        skip = {f"{n}.{k}" for n, m in qmods.items() for k in m.state_dict()}
        dense, aliases = dense_state(model, skip)
        for key, value in dense.items():
            writer.add_dense(key, value, dense_dtype)
        for key, target in aliases.items():
            writer.add_alias(key, target)
        return writer.finish(config=getattr(model, "config", None), tokenizer=tokenizer, source=source, recipe=recipe,
                             skipped=skipped, dense_dtype=dense_dtype)


def read_header(path: str | Path, verify: bool = True) -> dict:
    """The artifact's header, after checking its bounds, its own checksum and its schema, and
    (with `verify`) every file's sha256. Files are plain names inside the directory; a file
    that is a symbolic link is refused (it could point anywhere)."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{root} not found; give the output directory of `lowbit quantize`")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory; give the output directory of `lowbit quantize`")
    hfile = root / HEADER
    if not hfile.is_file():
        raise ArtifactError(f"{root} is not a lowbit artifact: {HEADER} is missing")
    if hfile.stat().st_size > MAX_HEADER_BYTES:
        raise ArtifactError(f"{hfile} is {hfile.stat().st_size:,} bytes, too large for a lowbit header; it is not one")
    header = parse_json(hfile.read_bytes(), str(hfile))
    if not isinstance(header, dict) or "files" not in header or not isinstance(header.get("header_sha256"), str):
        raise ArtifactError(f"{hfile} is not a lowbit header (fields missing)")
    claimed = header.pop("header_sha256")
    if hashlib.sha256(_canonical(header)).hexdigest() != claimed:
        raise ArtifactError(f"{hfile} was edited or is corrupt: its content does not match its own checksum")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{hfile}: format version {header.get('format_version')!r} is not supported by lowbit {__version__}")
    validate_header(header, str(hfile))
    for needed in (*quantized_files(header), DENSE):
        if needed not in header["files"]:
            raise ArtifactError(f"{hfile}: {needed} is not listed among the checked files; the artifact is incomplete")
    if verify:
        for name, digest in header["files"].items():
            f = root / name
            if f.is_symlink():
                raise ArtifactError(f"artifact file {f} is a symbolic link; lowbit reads only files inside the artifact")
            if not f.is_file():
                raise ArtifactError(f"artifact file {f} is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"artifact file {f} does not match its sha256 in {HEADER}: it was truncated or edited")
    return header


def validate(path: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """Everything `load` checks before building anything: the header (`read_header`) and every
    stored tensor against the header's modules. Returns (header, dense tensor specs)."""
    root = Path(path)
    header = read_header(root, verify)
    parsed = validate_header(header, str(root / HEADER))
    for name in (*quantized_files(header), DENSE):
        if (root / name).is_symlink():
            raise ArtifactError(f"artifact file {root / name} is a symbolic link; lowbit reads only files inside the artifact")
    dense_specs = check_stored_tensors(parsed, [root / f for f in quantized_files(header)], root / DENSE, str(root / HEADER))
    return header, dense_specs


def quantized_files(header: dict) -> list[str]:
    """The files that hold the quantized tensors: one, or the shards the header lists."""
    return list(header.get("quantized_shards") or [QUANTIZED])


def load_quantized(root: Path, header: dict) -> dict[str, torch.Tensor]:
    """Every quantized tensor of the artifact, from its one file or all its shards (memory-mapped);
    entropy-coded codes come back decoded and packed, as an uncoded artifact stores them."""
    tensors: dict[str, torch.Tensor] = {}
    for name in quantized_files(header):
        tensors.update(_load_tensors(root / name))
    decode_coded_modules(header, tensors, str(root))
    return tensors


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"artifact file {path} cannot be read: {exc}") from None


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _check_config(config, root: Path, stored_keys: list[str]) -> None:
    """Refuse a config whose numbers could not describe the stored tensors, before a skeleton
    is built from it: sizes beyond 2^31, or more layers than the stored tensors index."""
    values = config.to_dict()
    for key, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_DIM:
            raise ArtifactError(f"{root / 'config.json'}: {key} = {value} is beyond any model lowbit loads")
    indices = [int(i) for k in stored_keys for i in re.findall(r"\.(\d+)(?=\.)", k)]
    most = max(indices, default=-1) + 1
    for key in _LAYER_COUNT_KEYS:
        n = values.get(key)
        if isinstance(n, int) and n > most:
            raise ArtifactError(f"{root / 'config.json'}: {key} = {n}, but the stored tensors hold at most {most} layers")


def _skeleton(root: Path, header: dict, stored_keys: list[str]) -> nn.Module:
    """The model described by the artifact's config.json, with every parameter on the meta device
    (buffers computed at init, such as rotary frequencies, stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    if header["source"].get("kind") == "image-classifier":  # an architecture lowbit builds (`vision.models`)
        from .vision.models import VisionModelError, skeleton

        try:
            return skeleton(header["source"])
        except VisionModelError as exc:
            raise ArtifactError(f"{root / HEADER}: {exc}") from None
    if "config.json" not in header["files"]:
        raise ArtifactError(f"{root / HEADER}: config.json is not among the checked files; pass a model skeleton to lowbit.load")
    try:
        config = AutoConfig.from_pretrained(root)
    except Exception as exc:  # unknown model type, remote code, malformed JSON
        raise ArtifactError(f"{root / 'config.json'} cannot be used: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    _check_config(config, root, stored_keys)
    try:
        with init_empty_weights():
            return auto_class(header["source"].get("kind", "causal-lm")).from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise ArtifactError(f"{root / 'config.json'} does not describe a model transformers can build: {exc}") from None


def _check_fits(model: nn.Module, root: Path, header: dict, dense_specs: dict) -> None:
    """Every quantized module replaces a linear layer of the same shape, and the dense file holds
    exactly the skeleton's other tensors with their shapes, before any data is read."""
    for name, entry in header["modules"].items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{root / HEADER}: module {name} is not part of the model") from None
        conv = entry.get("kind") == "conv2d"
        if not (isinstance(target, nn.Conv2d) if conv else is_linear(target)):
            raise ArtifactError(f"{root / HEADER}: module {name} replaces a {type(target).__name__}, not a "
                                f"{'Conv2d' if conv else 'linear layer'}")
        shape = [target.weight.shape[0], target.weight[0].numel()] if conv else list(linear_weight(target).shape)
        if shape != list(entry["shape"]):
            raise ArtifactError(f"{root / HEADER}: module {name} is {entry['shape']} but the model's layer is {shape}")
        if conv:
            from .nn.quant_conv import conv_geometry

            if entry.get("conv") != conv_geometry(target):
                raise ArtifactError(f"{root / HEADER}: module {name}'s conv {entry.get('conv')} is not the model's {conv_geometry(target)}")
    qnames = tuple(f"{n}." for n in header["modules"])
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(qnames)}
    have = {k: v[0] for k, v in dense_specs.items()}
    have.update({a: have[t] for a, t in header["aliases"].items()})
    missing = sorted(set(wanted) - set(have))
    unexpected = sorted(set(have) - set(wanted))
    if missing or unexpected:
        raise ArtifactError(f"{root / DENSE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in wanted.items():
        if have[key] != shape:
            raise ArtifactError(f"{root / DENSE}: tensor {key} is {list(have[key])}, the model needs {list(shape)}")


def load(
    path: str | Path,
    model: nn.Module | None = None,
    verify: bool = True,
    cache_weights: bool = False,
    bits: int | None = None,
    widen_dense: bool = False,
) -> nn.Module:
    """Rebuild the quantized model from an artifact. `model`: a skeleton to fill instead of the
    one built from the stored config (for models that are not Hugging Face models; a CNN's batch
    norms are folded into it as they were when it was quantized).
    `cache_weights`: keep each layer's dequantized weight after its first use (faster repeated
    forwards, such as evaluation or generation, at the memory cost of a float model).
    `bits`: decode every nested module (`nested8`, Double Rounding) at this precision; other
    modules are unaffected; an artifact without nested modules refuses it.
    `widen_dense`: make every stored bf16/fp16 dense tensor an fp32 parameter (to train the
    loaded model). By default plain embeddings and unquantized linear layers keep their stored
    precision in `runtime.dense`'s modules (the same values, computed in fp32), so a tied
    embedding costs its stored bytes, not twice them; norms and biases are widened.

    Nothing is allocated before every check has passed; then the stored tensors are, once."""
    root = Path(path)
    header, dense_specs = validate(root, verify)
    if model is None:
        model = _skeleton(root, header, [*dense_specs, *header["modules"]])
    elif header["source"].get("folded_batchnorms"):  # a CNN quantized with its batch norms folded in
        from .vision.fold import fold_batchnorm

        fold_batchnorm(model)
    _check_fits(model, root, header, dense_specs)
    quantized = load_quantized(root, header)
    switched = 0
    for name, entry in header["modules"].items():
        try:
            layer = module_from_entry(entry)
            if bits is not None:
                switched += layer.set_precision(bits)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{root / HEADER}: module {name} cannot be rebuilt: {exc}") from None
        own = {k.removeprefix(name + "."): v for k, v in quantized.items() if k.startswith(name + ".")}
        try:
            layer.load_state_dict(own, strict=True, assign=True)  # the read tensors become the buffers: no second copy
            layer.cache_weight = cache_weights
            model.set_submodule(name, layer)
        except (RuntimeError, AttributeError) as exc:
            raise ArtifactError(f"{root / QUANTIZED}: tensors of module {name} do not fit: {exc}") from None
    del quantized
    if bits is not None and not switched:
        formats = sorted({e["grid"]["format"] for e in header["modules"].values()})
        raise ArtifactError(
            f"{root}: bits={bits} selects the precision of nested modules (format nested8), but this artifact has "
            f"none ({', '.join(formats)}); load it without bits"
        )
    dense = _load_tensors(root / DENSE)
    for alias, target in header.get("aliases", {}).items():
        dense[alias] = dense[target]
    held = set() if widen_dense else keep_half_precision(model, dense)
    dense = {k: (v.float() if v.is_floating_point() else v) for k, v in dense.items() if k not in held}
    try:
        model.load_state_dict(dense, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{root / DENSE} does not match the model: {exc}") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ArtifactError(f"{root / DENSE} does not hold {left[:5]}; the artifact is incomplete")
    model.eval()
    model.lowbit_header = header
    model.lowbit_precision = bits
    return model
