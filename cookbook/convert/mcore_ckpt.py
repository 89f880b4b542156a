"""The Megatron side of conversion: a meta-device model gives every tensor's checkpoint key and sharding,
and a torch_dist checkpoint is written as one small ``dist_checkpointing`` save per unit, merged at the end.

Building the model on the ``meta`` device costs no memory even for 671B, and its ``sharded_state_dict``
is exactly what a training run under any TP/PP/EP layout asks the checkpoint for, so the converted
checkpoint loads there. Writing per unit (a layer, or a slice of its experts) keeps memory at one unit and
lets processes or nodes write disjoint units; the finalizer merges the units' DCP metadata into one
``.metadata`` whose storage entries point into the unit folders.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from cookbook.atomic import write_json
from cookbook.config import CookbookConfig, ParallelConfig

UNITS_DIR = "units"


def single_process_config(cfg: CookbookConfig) -> CookbookConfig:
    """The same architecture on one CPU process (TP = PP = EP = 1), as conversion sees it. A converted checkpoint
    always holds the routers' expert bias (the HF checkpoint's ``e_score_correction_bias``), also for a trainer built
    without it (``moe.trainer_expert_bias=false``), which leaves it unread."""
    moe = dataclasses.replace(cfg.moe, token_dispatcher_type="allgather", trainer_expert_bias=True)
    return dataclasses.replace(cfg, parallel=ParallelConfig(), moe=moe)


def meta_sharded_state_dict(cfg: CookbookConfig) -> dict[str, Any]:
    """``{local name: ShardedTensor | ShardedTensorFactory | ShardedObject}`` of the whole model, no memory."""
    from cookbook.megatron.model import build_model, init_parallel

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("checkpoint conversion runs in its own single process; this process is already part "
                           f"of a {dist.get_world_size()}-process group (split the job with layers/part instead)")
    single = single_process_config(cfg)
    init_parallel(single)
    with torch.device("meta"):
        model = build_model(single)
    return model.sharded_state_dict()


def base_name(name: str) -> str:
    """A state-dict entry's tensor name (``..._extra_state`` belongs with its module's weight)."""
    return name.removesuffix("._extra_state") + ".weight" if name.endswith("._extra_state") else name


def _chunks(entry: Any) -> list[Any]:
    """The ShardedTensors (or ShardedObject) an entry saves as: a factory (the fused GLU fc1) builds its
    halves, each a chunk of the global tensor."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        built = entry.build()
        return list(built.values()) if isinstance(built, dict) else list(built)
    return [entry]


def with_data(entry: Any, pieces: list[torch.Tensor]) -> list[Any]:
    """The chunks a meta-device entry saves as, each given its HF tensor: a fused fc1 gets gate and up as its two
    halves directly (no concatenated copy); a plain weight its one tensor, cast to the entry's dtype."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    chunks = _chunks(entry)
    if len(chunks) == 1 and isinstance(chunks[0], ShardedObject):
        return chunks
    if len(chunks) != len(pieces):
        raise RuntimeError(f"'{chunks[0].key}': Megatron saves it as {len(chunks)} chunk(s), the rule gives "
                           f"{len(pieces)} HF tensor(s)")
    out = []
    for sh, piece in zip(sorted(chunks, key=lambda c: tuple(c.global_offset)), pieces):  # gate rows before up
        if tuple(piece.shape) != tuple(sh.local_shape):
            raise RuntimeError(f"'{sh.key}' at {sh.global_offset}: HF tensor of shape {tuple(piece.shape)}, "
                               f"Megatron expects {tuple(sh.local_shape)}")
        out.append(dataclasses.replace(sh, data=piece.to(sh.data.dtype).contiguous()))
    return out


def save_unit(entries: dict[str, list[Any]], unit_dir: Path) -> None:
    """One single-process ``dist_checkpointing`` save of a subset of the model (``{name: with_data(...)}``).

    A single process cannot save a *part* of a larger tensor (torch's ShardedTensor wants the other parts
    on other ranks), so every chunk is saved whole under a temporary key, and ``chunks.json`` records its
    real key, global shape and offset; ``merge_units`` puts them back in place.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if unit_dir.exists():  # a unit interrupted before its marker: start it again
        shutil.rmtree(unit_dir)
    unit_dir.mkdir(parents=True)
    whole: dict[str, Any] = {}
    chunks: dict[str, dict] = {}
    for name, entry_chunks in entries.items():
        for sh in entry_chunks:
            if isinstance(sh, ShardedObject):
                whole[name] = sh
                continue
            data = sh.data.reshape((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            tmp_key = f"{sh.key}@" + ".".join(map(str, sh.global_offset))
            whole[tmp_key] = ShardedTensor.from_rank_offsets(tmp_key, data)
            chunks[tmp_key] = {"key": sh.key, "global_shape": list(sh.global_shape),
                               "offset": list(sh.global_offset)}
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # torch.load never checks it; it cost ~10% of conversion CPU
    try:
        dist_checkpointing.save(whole, str(unit_dir), validate_access_integrity=False)
    finally:
        torch.serialization.set_crc32_options(crc32)
    write_json(unit_dir / "chunks.json", chunks)


def merge_units(ckpt_dir: Path, units: list[str]) -> None:
    """Merge the units' DCP metadata into ``ckpt_dir/.metadata``: chunks go back under their real keys at
    their global offsets, storage paths point into the unit folders; then check that every tensor is
    covered exactly."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorStorageMetadata)

    state_dict_metadata: dict[str, Any] = {}
    storage_data: dict[Any, Any] = {}
    version = None
    for unit in units:
        unit_dir = ckpt_dir / UNITS_DIR / unit
        md = FileSystemReader(str(unit_dir)).read_metadata()
        chunks = json.loads((unit_dir / "chunks.json").read_text())
        version = md.version
        for key, entry in md.state_dict_metadata.items():
            if key not in chunks:
                state_dict_metadata[key] = entry
                continue
            c = chunks[key]
            target = state_dict_metadata.setdefault(c["key"], TensorStorageMetadata(
                properties=entry.properties, size=torch.Size(c["global_shape"]), chunks=[]))
            target.chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offset"]), sizes=entry.size))
        for index, info in md.storage_data.items():
            if index.fqn in chunks:
                c = chunks[index.fqn]
                index = MetadataIndex(c["key"], torch.Size(c["offset"]))
            storage_data[index] = dataclasses.replace(info, relative_path=f"{UNITS_DIR}/{unit}/{info.relative_path}")
    for key, entry in state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            covered = sum(int(torch.Size(c.sizes).numel()) for c in entry.chunks)
            if covered != entry.size.numel():
                raise RuntimeError(f"merged checkpoint: '{key}' has {covered} of {entry.size.numel()} elements "
                                   f"covered by its chunks; a unit is missing or duplicated")
    merged = Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data, version=version)
    with open(ckpt_dir / ".metadata.tmp", "wb") as f:
        pickle.dump(merged, f)
    first = ckpt_dir / UNITS_DIR / units[0]
    for name in ("metadata.json", "common.pt"):
        shutil.copy2(first / name, ckpt_dir / name)
    for unit in units:
        for name in (".metadata", "metadata.json", "common.pt", "chunks.json"):
            (ckpt_dir / UNITS_DIR / unit / name).unlink(missing_ok=True)
    os.replace(ckpt_dir / ".metadata.tmp", ckpt_dir / ".metadata")


class CheckpointReader:
    """Reads any region of any tensor of a torch_dist checkpoint (written by conversion or by training
    under any layout), loading only the chunks that overlap it."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(ckpt_dir)
        if not (self.dir / ".metadata").is_file():
            raise FileNotFoundError(f"{self.dir} is not a Megatron-Core torch_dist checkpoint (no .metadata)")
        self.metadata = FileSystemReader(str(self.dir)).read_metadata()
        self._cache: tuple[Any, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def _load_chunk(self, key: str, offsets: torch.Size) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        index = MetadataIndex(key, offsets)
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        info = self.metadata.storage_data[index]
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            tensor = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
        self._cache = (index, tensor)
        return tensor

    def read(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.metadata.state_dict_metadata:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor '{key}'")
        meta = self.metadata.state_dict_metadata[key]
        out = torch.empty(shape, dtype=meta.properties.dtype)
        filled = 0
        for chunk in meta.chunks:
            lo = [max(o, c) for o, c in zip(offset, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offset, shape, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            data = self._load_chunk(key, chunk.offsets)
            src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
            out[dst] = data[src]
            filled += int(torch.Size([b - a for a, b in zip(lo, hi)]).numel())
        if filled != out.numel():
            raise RuntimeError(f"{self.dir}: '{key}' region {offset}+{shape} is not fully covered by the checkpoint")
        return out

    def read_entry(self, entry: Any) -> torch.Tensor:
        """A model state-dict entry (ShardedTensor, or the fc1 factory: its halves concatenated)."""
        parts = []
        for sh in _chunks(entry):
            full = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            parts.append(self.read(sh.key, tuple(sh.global_offset), full).reshape(sh.local_shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
