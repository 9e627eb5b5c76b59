"""Reading HF checkpoints: index validation, headers, and per-tensor slices.

Nothing here loads a whole model: callers ask for one tensor or one slice at a time and
safetensors memory-maps the shard. Pickle weights are refused unless explicitly allowed,
because unpickling can execute code. Opening a checkpoint parses the JSON headers only, so
callers that work on bytes (`data_location`) never import torch; `read` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.arch.schema import AnyValue, MapOf, Object, String, validate
from builder.dtypes import BY_CODE, Dtype, dtype_of
from builder.errors import UserError
from builder.io.safetensors_stream import read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "model*.bin")

SAFETENSORS_DTYPES: dict[str, Dtype] = BY_CODE  # header code -> Dtype (== the torch dtype)


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable or inconsistent."""


# model.safetensors.index.json: tensor name -> shard file name (metadata is free-form).
INDEX_SCHEMA = Object(
    {"weight_map": MapOf(String(non_empty=True)), "metadata": AnyValue()},
    required=frozenset({"weight_map"}),
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: Dtype


HUB_REPO_PREFIX = "models--"  # huggingface_hub cache: models--ORG--NAME/{blobs,refs,snapshots}


def allowed_root(root: Path) -> Path:
    """The folder a checkpoint's files may resolve into.

    Normally the checkpoint directory itself. A snapshot of the Hugging Face hub cache
    (models--ORG--NAME/snapshots/REV/) holds only symlinks to ../../blobs/SHA, so for it the
    repository folder models--ORG--NAME/ is the boundary: links into the repository's own
    blobs are fine, links anywhere else are not.
    """
    real = root.resolve()
    snapshots = real.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith(HUB_REPO_PREFIX):
        return snapshots.parent
    return real


def _inside(root: Path, relative: str, index_path: Path) -> Path:
    """The weight file `relative` (as the index names it), refused if it leaves the checkpoint:
    by name (absolute, '..'), or through links that resolve outside `allowed_root`."""
    path = (root / relative).resolve()
    name = Path(relative)
    escapes = name.is_absolute() or ".." in name.parts
    if escapes or allowed_root(root) not in path.parents:
        raise CheckpointError(
            f"{index_path}: weight file {relative!r} lies outside the checkpoint directory"
            + ("" if escapes else f" (it resolves to {path})")
        )
    return root / name  # as the user sees it (a hub snapshot's name, not the blob's hash)


def _read_index(root: Path) -> dict[str, Path]:
    index_path = root / INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index_path}: unreadable safetensors index ({err})") from None
    validate(index, INDEX_SCHEMA, str(index_path), CheckpointError)
    weight_map = index["weight_map"]
    files = {rel: _inside(root, rel, index_path) for rel in set(weight_map.values())}
    missing = sorted(rel for rel, path in files.items() if not path.is_file())
    if missing:
        raise CheckpointError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
    return {name: files[rel] for name, rel in weight_map.items()}


def find_pickle_files(root: Path) -> list[Path]:
    return sorted({p for pattern in PICKLE_PATTERNS for p in root.glob(pattern)})


class HFCheckpoint:
    """Headers and lazy tensor access for an HF checkpoint directory (safetensors)."""

    def __init__(self, directory: str | Path, allow_pickle: bool = False):
        self.root = Path(directory)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")
        self._pickle: dict[str, Any] | None = None  # name -> torch.Tensor
        self._data_starts: dict[Path, tuple[int, dict[str, Any]]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        if (self.root / INDEX_NAME).exists():
            self._load_headers(_read_index(self.root))
        elif (self.root / SINGLE_NAME).exists():
            self._load_headers(None)
        else:
            self._open_pickle(allow_pickle)

    # ---- opening --------------------------------------------------------------------------
    def _load_headers(self, weight_map: dict[str, Path] | None) -> None:
        if weight_map is None:
            files = [_inside(self.root, SINGLE_NAME, self.root / SINGLE_NAME)]
        else:
            files = sorted(set(weight_map.values()))
        for file in files:
            for name, shape, dtype in _header(file):
                if weight_map is not None and weight_map.get(name) != file:
                    where = weight_map.get(name)
                    raise CheckpointError(
                        f"{file}: holds tensor {name!r} which the index "
                        + (f"places in {where.name}" if where else "does not list")
                    )
                self.tensors[name] = TensorInfo(name, file, shape, dtype)
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise CheckpointError(
                    f"{self.root / INDEX_NAME}: lists tensor {absent[0]!r} in "
                    f"{weight_map[absent[0]].name}, which does not hold it"
                    + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                )

    def _open_pickle(self, allow_pickle: bool) -> None:
        pickles = find_pickle_files(self.root)
        if not pickles:
            raise CheckpointError(
                f"{self.root}: no weights found (expected {SINGLE_NAME} or {INDEX_NAME})"
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]}: pickle weights are refused because loading them can run "
                "arbitrary code; convert them to safetensors, or pass --allow-pickle if you "
                "trust this file"
            )
        import torch

        self._pickle = {}
        for file in pickles:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # noqa: BLE001 (torch raises many types for corrupt archives)
                raise CheckpointError(f"{file}: unreadable pickle checkpoint ({err})") from None
            for name, tensor in state.items():
                self._pickle[name] = tensor
                info = TensorInfo(name, file, tuple(tensor.shape), dtype_of(tensor.dtype))
                self.tensors[name] = info

    # ---- access ---------------------------------------------------------------------------
    @property
    def is_pickle(self) -> bool:
        """True for a pickle checkpoint (opened because the caller allowed it)."""
        return self._pickle is not None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing") from None

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Any:
        """One tensor, or a row/column slice of it, read from disk without the rest."""
        info = self.info(name)
        if self._pickle is not None:
            tensor = self._pickle[name]
            return _apply(tensor, rows, cols).clone()
        with _open(info.file) as handle:
            if (rows is None and cols is None) or not info.shape:
                return handle.get_tensor(name)
            view = handle.get_slice(name)
            if len(info.shape) == 1:
                return view[rows or slice(None)]
            return view[rows or slice(None), cols or slice(None)]

    def data_location(self, name: str) -> tuple[Path, int, int] | None:
        """(file, absolute byte offset, byte length) of a tensor's data, for raw reads.

        None for pickle checkpoints. Lets a caller copy or map byte ranges directly
        (os.preadv, copy_file_range, mmap) instead of materialising tensors.
        """
        info = self.info(name)
        if self._pickle is not None:
            return None
        if info.file not in self._data_starts:
            self._data_starts[info.file] = read_header(info.file)
        start, header = self._data_starts[info.file]
        begin, end = header[name]["data_offsets"]
        return info.file, start + begin, end - begin


def _apply(tensor: Any, rows: slice | None, cols: slice | None) -> Any:
    if rows is not None:
        tensor = tensor[rows]
    if cols is not None:
        tensor = tensor[:, cols]
    return tensor


def _open(file: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None


def _header(file: Path) -> Iterator[tuple[str, tuple[int, ...], Dtype]]:
    """(name, shape, dtype) of every tensor of a safetensors file, from its JSON header,
    which must describe data that fits the file."""
    try:
        start, header = read_header(file)
    except UserError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: unreadable safetensors file (header is not an object)")
    size = file.stat().st_size - start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(n) for n in shape)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(
                f"{file}: unreadable safetensors file (bad header entry for {name!r})"
            ) from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {code}")
        need = math.prod(shape) * SAFETENSORS_DTYPES[code].itemsize
        if not (0 <= begin <= end <= size) or end - begin != need:
            raise CheckpointError(
                f"{file}: unreadable safetensors file (tensor {name!r}: data offsets "
                f"[{begin}, {end}] do not fit its shape or the file)"
            )
        yield name, shape, SAFETENSORS_DTYPES[code]
