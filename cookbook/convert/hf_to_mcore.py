"""HF DeepSeek-V3-architecture safetensors -> Megatron-Core torch_dist checkpoint, streaming.

Everything is checked before anything is written (the preset against config.json, every shard, every
tensor name and shape). Then units (a layer, or a slice of a layer's experts, each about one HF shard of
bytes) are read tensor by tensor (the next unit in a thread while the current one is written, into two reused
buffers: ``read_ahead``, ``hf_io.ReadBuffer``), mapped through ``names.RULES`` and saved; a unit's marker makes an
interrupted run resume after it. With ``layers``/``part`` a process converts only its layer range; the
process with ``finalize=True`` waits for every unit and merges them (see ``mcore_ckpt``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import torch
from tqdm.auto import tqdm

from cookbook.config import ConfigError, CookbookConfig
from cookbook.convert.hf_io import ReadBuffer, ShardReader, check_checkpoint
from cookbook.convert.mcore_ckpt import (UNITS_DIR, base_name, merge_units, meta_sharded_state_dict, save_unit,
                                         with_data)
from cookbook.convert.names import Mapping, all_mappings
from cookbook.convert.staging import Staging
from cookbook.models.hf_config import check_hf_config, read_hf_config

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: list[T], load: Callable[[T], R]) -> Iterator[R]:
    """``load(item)`` for each item in order, the next one loading in a thread while the caller works on the
    current one: a unit's reads overlap the previous unit's write and fsync (at most two units in memory)."""
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(load, items[0])
        for nxt in items[1:] + [None]:
            current = pending.result()
            pending = pool.submit(load, nxt) if nxt is not None else None
            yield current
            del current


def part_layers(num_layers: int, part: tuple[int, int]) -> range:
    """Layer range of part ``i`` of ``n`` (contiguous, sizes differing by at most one)."""
    i, n = part
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"part {i}/{n} is not valid: need 0 <= i < n")
    start = i * num_layers // n
    return range(start, (i + 1) * num_layers // n)


@dataclasses.dataclass
class Unit:
    name: str
    mappings: list[Mapping]
    nbytes: int


def plan_units(mappings: list[Mapping], reader: ShardReader, max_bytes: int) -> list[Unit]:
    """Group the table into units: embeddings, final norm/output, and per layer its non-expert tensors plus
    routed experts in slices of at most ``max_bytes``."""
    groups: dict[str, list[Mapping]] = {}
    for mp in mappings:
        if mp.layer is None:
            key = "top-embed" if "embed" in mp.hf[0] else "top-final"
        else:
            key = f"layer-{mp.layer:04d}" + ("-experts" if mp.expert is not None else "")
        groups.setdefault(key, []).append(mp)
    units = []
    for key, maps in groups.items():
        sizes = [sum(reader.nbytes(h) for h in mp.hf) for mp in maps]
        if not key.endswith("-experts"):
            units.append(Unit(key, maps, sum(sizes)))
            continue
        current: list[Mapping] = []
        total = 0
        for mp, size in zip(maps, sizes):
            expert_starts = mp.hf[0].endswith("gate_proj.weight")
            if current and expert_starts and total + size > max_bytes:
                units.append(Unit(f"{key}-{current[0].expert:05d}", current, total))
                current, total = [], 0
            current.append(mp)
            total += size
        units.append(Unit(f"{key}-{current[0].expert:05d}", current, total))  # named by first expert: stable
    return units


def _checked_source(cfg: CookbookConfig, hf_dir: Path) -> ShardReader:
    hf_cfg = read_hf_config(hf_dir)
    if hf_cfg.get("quantization_config"):
        raise ConfigError(f"{hf_dir}/config.json has a quantization_config (fp8 weights): cast to bf16 first "
                          "with cookbook.convert.fp8.cast_fp8_to_bf16 (the notebook does this for DeepSeek-V3)")
    check_hf_config(hf_cfg, cfg.model, where=str(hf_dir / "config.json"))
    reader = ShardReader(hf_dir)
    check_checkpoint(reader, cfg.model, all_mappings(cfg.model))
    return reader


def hf_to_mcore(cfg: CookbookConfig, hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
                overwrite: bool = False, part: tuple[int, int] = (0, 1), finalize: Optional[bool] = None,
                max_unit_bytes: Optional[int] = None, progress: bool = True) -> Optional[Path]:
    """Convert; returns the checkpoint folder once finalized (None for a part that does not finalize).

    ``part=(i, n)`` converts layer range i of n (part 0 also the embeddings, part n-1 the final norm and
    output layer); by default part 0 finalizes after waiting for the others' markers.
    """
    hf_dir = Path(hf_dir)
    reader = _checked_source(cfg, hf_dir)
    m = cfg.model
    finalize = part[0] == 0 if finalize is None else finalize
    max_unit_bytes = max_unit_bytes or max((hf_dir / s).stat().st_size for s in set(reader.index.values()))
    job = {"job": "hf_to_mcore", "src": str(hf_dir.resolve()), "preset": m.name, "dtype": m.params_dtype,
           "parts": part[1], "max_unit_bytes": max_unit_bytes}
    staging = Staging(out_dir, job, overwrite).open()

    sharded = meta_sharded_state_dict(cfg)
    by_mcore = {base_name(name): [] for name in sharded}
    for name, entry in sharded.items():
        by_mcore[base_name(name)].append((name, entry))
    table = {mp.mcore for mp in all_mappings(m)}
    untabled = sorted(set(by_mcore) - table)
    if untabled:
        raise RuntimeError(f"Megatron tensors without a rule in cookbook.convert.names.RULES: {untabled[:5]}")

    all_units = plan_units(all_mappings(m), reader, max_unit_bytes)
    mine = plan_units(all_mappings(m, part_layers(m.num_layers, part)), reader, max_unit_bytes)
    todo = [u for u in mine if not staging.done(u.name)]
    bar = tqdm(total=sum(u.nbytes for u in mine), unit="B", unit_scale=True, disable=not progress,
               desc=f"HF -> Megatron part {part[0]}/{part[1]}")
    bar.update(sum(u.nbytes for u in mine if staging.done(u.name)))
    # two buffers, alternating: read_ahead holds at most two units, so unit k+2 is read only after unit k is saved
    size = max((ReadBuffer.bytes_for(reader.nbytes(h) for mp in u.mappings for h in mp.hf) for u in todo), default=0)
    buffers = [ReadBuffer(size) for _ in range(min(2, len(todo)))]

    def load(job: tuple[Unit, ReadBuffer]) -> tuple[Unit, dict[str, list]]:
        unit, buffer = job
        buffer.clear()
        entries = {}
        for mp in unit.mappings:
            pieces = None
            for name, entry in by_mcore[mp.mcore]:
                if pieces is None and not name.endswith("._extra_state"):
                    pieces = [reader.get(h, into=buffer) for h in mp.hf]
                entries[name] = with_data(entry, pieces or [])
        return unit, entries

    for unit, entries in read_ahead([(u, buffers[k % 2]) for k, u in enumerate(todo)], load):
        save_unit(entries, staging.dir / UNITS_DIR / unit.name)
        del entries
        staging.mark(unit.name)
        bar.update(unit.nbytes)
    bar.close()
    if not finalize:
        return None
    staging.wait_for([u.name for u in all_units])
    merge_units(staging.dir, [u.name for u in all_units])
    (staging.dir / "cookbook_convert.json").write_text(json.dumps(
        {"source": str(hf_dir.resolve()), "preset": m.name, "params_dtype": m.params_dtype,
         "format": "megatron-core torch_dist", "num_units": len(all_units)}, indent=2) + "\n")
    from cookbook.convert.hf_io import copy_tokenizer_files

    copy_tokenizer_files(hf_dir, staging.dir)
    shutil.copy2(hf_dir / "config.json", staging.dir / "hf_config.json")  # token ids etc. for the way back
    return staging.finish()


def load_megatron_checkpoint(model, ckpt_dir: str | os.PathLike, strict: bool = True) -> None:
    """Load a converted (or trained) torch_dist checkpoint into a model built under any layout."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    model.load_state_dict(state, strict=strict)

