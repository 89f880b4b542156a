"""Reading an HF safetensors checkpoint lazily and checking it against the name table before any write."""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open

from cookbook.config import ModelConfig
from cookbook.convert.names import Mapping, hf_shape

# Files a model directory carries besides weights and config (copied to every HF output).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "tiktoken.model")
# HF tensors that carry no weights of the architecture and are skipped everywhere.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype codes and their element sizes
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
             torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
ST_TORCH = {code: dtype for dtype, code in ST_DTYPES.items()}
ST_ITEMSIZE = {code: torch.empty(0, dtype=dtype).element_size() for dtype, code in ST_DTYPES.items()}


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the preset's architecture; the message lists every problem found."""


def read_index(hf_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> shard file name, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}
    raise FileNotFoundError(f"{hf_dir}: neither model.safetensors.index.json nor model.safetensors found")


class ReadBuffer:
    """Memory that one unit's tensors are read into, reused from unit to unit.

    A fresh allocation per tensor costs a page fault and a zeroed page per 4 KiB; with the page cache's copy on
    top, that was most of the conversion's CPU time on the VMs measured (BENCHMARKS.md). The buffer is page
    aligned, so reads into it bypass the page cache (``O_DIRECT``) where the file system allows it."""

    ALIGN = 4096

    def __init__(self, nbytes: int):
        self._mem = mmap.mmap(-1, max(nbytes, self.ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._mem)
        self._used = 0

    @classmethod
    def bytes_for(cls, sizes: Iterable[int]) -> int:
        """A buffer size that holds tensors of these byte sizes read at any file offsets."""
        return sum(-(-n // cls.ALIGN) * cls.ALIGN + 2 * cls.ALIGN for n in sizes)

    def clear(self) -> None:
        """Start over; the tensors taken since the last clear must no longer be in use."""
        self._used = 0

    def take(self, nbytes: int) -> memoryview:
        """A page-aligned region of ``nbytes`` rounded up to whole pages."""
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        if self._used + size > len(self._view):
            raise MemoryError(f"read buffer of {len(self._view)} bytes cannot take {size} more after {self._used}: "
                              "size it with ReadBuffer.bytes_for over the tensors of one unit")
        region = self._view[self._used:self._used + size]
        self._used += size
        return region


def _read_into(path: Path, offset: int, nbytes: int, buffer: ReadBuffer) -> memoryview:
    """Bytes ``offset:offset+nbytes`` of a file, read into ``buffer`` with O_DIRECT (whole pages at page offsets),
    or through the page cache where the file system refuses O_DIRECT."""
    lo = offset - offset % ReadBuffer.ALIGN
    region = buffer.take(offset + nbytes - lo)
    try:
        _pread_all(path, region, lo, offset + nbytes - lo, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _pread_all(path, region, lo, offset + nbytes - lo, os.O_RDONLY)
    return region[offset - lo:offset - lo + nbytes]


def _pread_all(path: Path, region: memoryview, start: int, need: int, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        got = 0
        while got < need:
            n = os.preadv(fd, [region[got:]], start + got)
            if not n:
                raise EOFError(f"{path}: data ends at byte {start + got}, before {start + need} "
                               "(a truncated download?)")
            got += n
    finally:
        os.close(fd)


class ShardReader:
    """Lazy tensor access across shards: only the requested tensors (or rows of them) are read into memory.

    Reads go through the file with large sequential ``readinto`` calls at the offsets of the safetensors header,
    not through a memory map, so a process holds only what it asked for (mapped pages count as its resident memory,
    which made the conversion's peak look like whole shards) and the disk sees large sequential reads."""

    def __init__(self, hf_dir: str | os.PathLike, index: Optional[dict[str, str]] = None):
        self.dir = Path(hf_dir)
        self.index = index if index is not None else read_index(hf_dir)
        self._headers: dict[str, tuple[dict, int]] = {}

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        """The tensor's shard, header entry and the shard's data offset."""
        shard = self.index[name]
        if shard not in self._headers:
            with open(self.dir / shard, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[shard] = (json.loads(f.read(size)), 8 + size)
        header, start = self._headers[shard]
        if name not in header:
            raise KeyError(f"{self.dir / shard}: no tensor '{name}' (the index lists it in this shard)")
        return self.dir / shard, header[name], start

    def _read(self, name: str, first_row: int, rows: Optional[int], into: Optional[ReadBuffer] = None
              ) -> torch.Tensor:
        path, info, start = self._entry(name)
        shape = list(info["shape"])
        row_bytes = ST_ITEMSIZE[info["dtype"]] * math.prod(shape[1:]) if shape else 0
        if rows is not None:
            shape[0] = rows
        nbytes = ST_ITEMSIZE[info["dtype"]] * math.prod(shape)
        if into is not None and nbytes:
            data = _read_into(path, start + info["data_offsets"][0] + first_row * row_bytes, nbytes, into)
            return torch.frombuffer(data, dtype=ST_TORCH[info["dtype"]]).view(shape)
        out = torch.empty(shape, dtype=ST_TORCH[info["dtype"]])
        if out.numel():
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(path, "rb", buffering=0) as f:
                f.seek(start + info["data_offsets"][0] + first_row * row_bytes)
                while buf:
                    n = f.readinto(buf)
                    if not n:
                        raise EOFError(f"{path}: '{name}' ends before its header says (a truncated download?)")
                    buf = buf[n:]
        return out

    def get(self, name: str, into: Optional[ReadBuffer] = None) -> torch.Tensor:
        """The whole tensor; with ``into``, read into that buffer (no allocation, no page-cache copy)."""
        return self._read(name, 0, None, into)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (dimension 0), read without loading the rest."""
        stop = min(stop, self.shape(name)[0])
        return self._read(name, start, max(0, stop - start))

    def dtype(self, name: str) -> str:
        """The safetensors dtype code ("BF16", "F8_E4M3", ...)."""
        return self._entry(name)[1]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def nbytes(self, name: str) -> int:
        b0, b1 = self._entry(name)[1]["data_offsets"]
        return b1 - b0


def check_checkpoint(reader: ShardReader, m: ModelConfig, mappings: Iterable[Mapping],
                     full: bool = True) -> None:
    """Every expected tensor present with the right shape, every shard present, and (with ``full``) no
    tensor the table does not know. Raises ``CheckpointMismatch`` naming each problem and the fix."""
    problems: list[str] = []
    missing_shards = sorted({s for s in reader.index.values() if not (reader.dir / s).is_file()})
    for shard in missing_shards:
        problems.append(f"shard {shard} is listed in the index but missing from {reader.dir}")
    expected = [name for mp in mappings for name in mp.hf]
    known = set(expected)
    for name in expected:
        if name not in reader.index:
            problems.append(f"tensor '{name}' is missing")
        elif reader.index[name] not in missing_shards:
            have, want = reader.shape(name), hf_shape(m, name)
            if have != want:
                problems.append(f"tensor '{name}' has shape {list(have)}, the preset needs {list(want)}")
    if full:
        unexpected = [n for n in reader.index if n not in known and not n.endswith(IGNORED_SUFFIXES)]
        for name in unexpected[:20]:
            problems.append(f"unexpected tensor '{name}' (not in the DeepSeek-V3 name table)")
        if len(unexpected) > 20:
            problems.append(f"... and {len(unexpected) - 20} more unexpected tensors")
        if any(n.endswith("_scale_inv") for n in unexpected):
            problems.append("the checkpoint is fp8-quantized: cast it first (cookbook.convert.fp8.cast_fp8_to_bf16)")
    if problems:
        raise CheckpointMismatch(f"{reader.dir} does not fit preset '{m.name}':\n  " + "\n  ".join(problems))


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files that exist in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def stream_safetensors(path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       pieces: Callable[[str], Iterable[torch.Tensor]], metadata: Optional[dict[str, str]] = None
                       ) -> None:
    """Write a safetensors file tensor by tensor, each from ``pieces(name)`` (row blocks in order), so memory is
    one piece, not the file (``safetensors.torch.save_file`` needs every tensor in memory at once). The header is
    computed from ``layout`` (name -> dtype, shape); the file appears under ``path`` only when complete."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        nbytes = ST_ITEMSIZE[ST_DTYPES[dtype]] * int(torch.Size(shape).numel())
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(f".part-{path.name}")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, (dtype, shape) in layout.items():
            start, stop = header[name]["data_offsets"]  # type: ignore[index]
            written = 0
            for piece in pieces(name):
                if piece.dtype != dtype:
                    raise TypeError(f"{path}: '{name}' piece has dtype {piece.dtype}, the header says {dtype}")
                data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != stop - start:
                raise ValueError(f"{path}: '{name}' got {written} bytes, its shape {list(shape)} needs {stop - start}")
    os.replace(tmp, path)
