"""Read and write safetensors files one tensor at a time.

`CheckpointReader` reads a checkpoint's tensors on demand with plain positioned reads (a memory
map's pages count against the process's resident memory as they are touched, so a 13 GB
checkpoint read through a map looks like a 13 GB process; `map` is for the one table read a few
rows at a time, the embedding), honouring a sharded
checkpoint's `model.safetensors.index.json`. `SafetensorsWriter` appends tensors to a data file
as they are produced and writes the real file (header, then the tensors sorted by name) at the
end, so a writer never holds more than one tensor; the same inputs give the same bytes, whatever
order they were added in. Both follow the format's definition: an 8-byte little-endian header
length, a JSON header (name -> dtype, shape, data_offsets; "__metadata__"), padded with spaces
to a multiple of 8, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
INDEX = "model.safetensors.index.json"


class CheckpointError(LowbitError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, the byte offset where tensor data starts) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header of {n:,} bytes; it is not a safetensors file")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


class CheckpointReader:
    """Every tensor of a safetensors checkpoint directory (one file, several, or shards listed in
    an index), read on demand in its stored dtype."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: list[mmap.mmap] = []
        for file in self._files():
            header, base = read_header(file)
            size = file.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype = DTYPES[info["dtype"]]
                    shape = tuple(int(d) for d in info["shape"])
                    start, end = (int(x) for x in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{file}: tensor {name} has a malformed or unsupported entry {info!r}") from None
                numel = 1
                for d in shape:
                    numel *= d
                if end - start != numel * torch.empty(0, dtype=dtype).element_size() or base + end > size or start < 0:
                    raise CheckpointError(f"{file}: tensor {name}'s bytes do not match its shape or lie past the file's end "
                                          "(truncated?)")
                self.tensors[name] = TensorInfo(file, dtype, shape, base + start, end - start)

    def _files(self) -> list[Path]:
        index = self.root / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index ({exc})") from None
            files = sorted({self.root / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) {', '.join(missing)} that are not in {self.root}; "
                                      "the download is incomplete: fetch the missing shards")
            return files
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.root} holds no .safetensors file; streaming reads safetensors checkpoints")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.root}")
        return info

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype, read from disk into fresh memory."""
        info = self._info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(buf.numpy())
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {name} is cut short ({got} of {info.nbytes} bytes)")
        return buf.view(info.dtype).reshape(info.shape)

    def map(self, name: str) -> torch.Tensor:
        """The tensor `name` mapped from its file, private and copy-on-write (the file is never
        written), without read-ahead and with its cached pages dropped first: only the pages a
        reader touches become resident. For a table read a few rows at
        a time, such as an embedding during calibration (a few thousand distinct tokens of a
        150k-row vocabulary), where `read` would hold all of it."""
        info = self._info(name)
        with open(info.file, "rb") as f:
            if hasattr(os, "posix_fadvise"):  # a cached large folio is mapped whole by the first lookup into it
                os.posix_fadvise(f.fileno(), info.start, info.nbytes, os.POSIX_FADV_DONTNEED)
            base = info.start - info.start % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(f.fileno(), info.start + info.nbytes - base, access=mmap.ACCESS_COPY, offset=base)
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_RANDOM)  # no read-ahead: a lookup brings in its own pages
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start - base)
        self._maps.append(mapped)  # the map lives as long as the reader: tensors made from it stay valid
        return raw.view(info.dtype).reshape(info.shape)

    def all_finite(self, name: str, chunk_bytes: int = 4 << 20) -> bool:
        """Whether a floating tensor holds no NaN or infinity, read a slice at a time into one reused
        buffer (the whole tensor is never resident). Each slice is checked by its minimum and maximum,
        a reduction: `isfinite(slice)` made a temporary half the slice's size, which glibc may keep
        in the heap once freed (16 MB stayed resident after 32 MB slices)."""
        info = self._info(name)
        size = torch.empty(0, dtype=info.dtype).element_size()
        step = max(size, chunk_bytes - chunk_bytes % size)
        buf = torch.empty(step, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            for done in range(0, info.nbytes, step):
                n = min(step, info.nbytes - done)
                if f.readinto(buf[:n].numpy()) != n:
                    raise CheckpointError(f"{info.file}: tensor {name} is cut short")
                values = buf[:n].view(info.dtype)
                if values.element_size() < 2:  # fp8 has no reductions of its own on the CPU
                    values = values.float()
                lo, hi = torch.aminmax(values)  # a reduction: no temporary the size of the slice
                if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):  # NaN propagates; inf is an end
                    return False
        return True


def _write_tensor(f, t: torch.Tensor) -> int:
    """Write a tensor's raw little-endian bytes from its own memory (no copy); returns their count."""
    t = t.detach().contiguous().cpu()
    if not t.numel():
        return 0
    raw = t.reshape(-1).view(torch.uint8).numpy()
    f.write(memoryview(raw))
    return raw.nbytes


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor (see the module docstring). `data` is a scratch
    file beside the result; `finish` writes the result and removes it."""

    def __init__(self, path: str | Path, state: dict | None = None) -> None:
        """`state` (from `state()`): reopen a writer whose process died, keeping what it recorded."""
        self.path = Path(path)
        self.data_path = self.path.with_name(self.path.name + ".data")
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, offset in data, nbytes)
        if state is None:
            self._data = open(self.data_path, "wb")
            return
        self.entries = {k: (d, list(s), int(o), int(n)) for k, (d, s, o, n) in state["entries"].items()}
        if not self.data_path.is_file() or self.data_path.stat().st_size < state["size"]:
            raise CheckpointError(f"{self.data_path} is shorter than its recorded progress; it cannot be resumed")
        self._data = open(self.data_path, "r+b")
        self._data.truncate(state["size"])  # bytes written after the last recorded state are dropped
        self._data.seek(state["size"])

    def state(self) -> dict:
        """What `__init__(path, state)` needs to continue: the data written so far is made durable first."""
        self._data.flush()
        os.fsync(self._data.fileno())
        return {"entries": self.entries, "size": self._data.tell()}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name here")
        at = self._data.tell()
        n = _write_tensor(self._data, tensor)
        self.entries[name] = (NAMES[tensor.dtype], list(tensor.shape), at, n)

    def finish(self, metadata: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> list[Path]:
        """Write the file (or, past `max_shard_bytes` of tensor data, shards `STEM-0000k-of-0000n
        .safetensors` holding consecutive runs of the sorted names) and remove the scratch data.
        Returns the files written."""
        self._data.close()
        order = sorted(self.entries)
        runs: list[list[str]] = [[]]
        size = 0
        for name in order:
            n = self.entries[name][3]
            if max_shard_bytes and runs[-1] and size + n > max_shard_bytes:
                runs.append([])
                size = 0
            runs[-1].append(name)
            size += n
        if len(runs) == 1:
            paths = [self.path]
        else:
            stem = self.path.name.removesuffix(".safetensors")
            paths = [self.path.with_name(f"{stem}-{i + 1:05d}-of-{len(runs):05d}.safetensors") for i in range(len(runs))]
        with open(self.data_path, "rb") as src:
            for path, names in zip(paths, runs):
                self._write_file(src, path, names, metadata)
        self.data_path.unlink()
        return paths

    def _write_file(self, src, path: Path, names: list[str], metadata: dict[str, str] | None) -> None:
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name in names:
            dtype, shape, _, n = self.entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for name in names:
                _, _, at, n = self.entries[name]
                src.seek(at)
                left = n
                while left:
                    chunk = src.read(min(left, 64 << 20))
                    out.write(chunk)
                    left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())

    def abort(self) -> None:
        self._data.close()
        self.data_path.unlink(missing_ok=True)
