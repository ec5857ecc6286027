"""What an artifact really costs on disk."""

from __future__ import annotations

from pathlib import Path

from ..artifact import DENSE, quantized_files


def artifact_size(path: str | Path, header: dict) -> dict:
    """Bytes on disk (all files, and the quantized tensor file alone) next to the header's claim."""
    root = Path(path)
    files = {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    summary = header["summary"]
    return {
        "bpw": summary["bpw"],  # quantized linear layers: codes + scales + zero points
        "size_bytes": sum(files.values()),
        "quantized_file_bytes": sum(files.get(f, 0) for f in quantized_files(header)),
        "dense_file_bytes": files.get(DENSE, 0),
        "quantized_params": summary["quantized_params"],
        "dense_params": summary["dense_params"],
        # every byte of the directory per model parameter (embeddings, tokenizer ... included)
        "whole_model_bpw": 8 * sum(files.values()) / max(1, summary["quantized_params"] + summary["dense_params"]),
    }
