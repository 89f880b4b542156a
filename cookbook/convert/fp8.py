"""DeepSeek-V3's fp8 checkpoint -> bf16, shard by shard.

DeepSeek-V3 stores its projection weights as float8 e4m3 with one float32 ``<name>_scale_inv`` per
128 x 128 block (edge blocks cover what is left where a dimension is not a multiple of 128); the weight
is ``q * scale_inv`` block-wise. The tutorial casts to bf16 before conversion, drops
``quantization_config`` from config.json and sets ``num_nextn_predict_layers`` to 0; the MTP layer's
tensors (layers numbered >= ``num_hidden_layers``) are dropped with it.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from cookbook.atomic import write_json
from cookbook.convert.hf_io import ST_TORCH, ShardReader, copy_tokenizer_files, read_index, stream_safetensors
from cookbook.convert.staging import Staging

BLOCK = 128
E4M3_MAX = 448.0
_QUANTIZED = re.compile(r"model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")


def is_fp8_quantized_name(name: str) -> bool:
    """The tensors DeepSeek-V3 quantizes: every projection inside the layers (not embeddings, norms,
    router or lm_head)."""
    return bool(_QUANTIZED.match(name))


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight -> (e4m3 weight, float32 scale_inv per block); the inverse of ``dequantize_fp8_blocks``."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[: w.shape[0], : w.shape[1]] = w.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = (amax / E4M3_MAX).float()
    q = (w.float() / _expand(scale_inv, tuple(w.shape), block)).to(torch.float8_e4m3fn)
    return q, scale_inv


# every e4m3 bit pattern's value: a table lookup is bit-exact and ~3x faster than torch's fp8 -> fp32 cast on CPU
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                          block: int = BLOCK) -> torch.Tensor:
    """e4m3 weight and its per-block scale_inv -> ``dtype`` (``q * scale_inv`` in fp32, then rounded, as
    DeepSeek's own cast does); checks that the scale grid covers the weight."""
    want = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {list(scale_inv.shape)} does not match weight {list(q.shape)} "
                         f"in {block}x{block} blocks (expected {list(want)})")
    if q.device.type != "cpu":
        return (q.float() * _expand(scale_inv.float(), tuple(q.shape), block)).to(dtype)
    values = torch.from_numpy(_E4M3_VALUES[q.contiguous().view(torch.uint8).numpy()])
    rows, cols = q.shape
    if rows % block == 0 and cols % block == 0:
        values.view(want[0], block, want[1], block).mul_(scale_inv.float()[:, None, :, None])
    else:
        values.mul_(_expand(scale_inv.float(), tuple(q.shape), block))
    return values.to(dtype)


def _row_blocks(rows: int, row_bytes: int, target_bytes: int = 64 << 20) -> list[tuple[int, int]]:
    """Row ranges of about ``target_bytes`` each, in whole 128-row scale blocks."""
    step = max(BLOCK, (target_bytes // max(row_bytes, 1)) // BLOCK * BLOCK)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def _bf16_pieces(reader: ShardReader, index: dict[str, str], name: str) -> Iterator[torch.Tensor]:
    """A tensor of the fp8 checkpoint as bf16 (or as stored, if not quantized), in row blocks."""
    shape = reader.shape(name)
    if len(shape) < 2:
        yield reader.get(name)
        return
    scale = reader.get(name + "_scale_inv") if name + "_scale_inv" in index else None
    for r0, r1 in _row_blocks(shape[0], math.prod(shape[1:]) * 4):
        rows = reader.rows(name, r0, r1)
        if scale is not None:
            rows = dequantize_fp8_blocks(rows, scale[r0 // BLOCK: -(-r1 // BLOCK)])
        yield rows


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def fixed_config(config: dict) -> dict:
    """The tutorial's config fixes for the bf16 copy: no quantization_config, no MTP layer, bf16."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["num_nextn_predict_layers"] = 0
    config["torch_dtype"] = "bfloat16"
    return config


def _check_fp8_source(src: Path, index: dict[str, str], reader: ShardReader) -> None:
    """Before any write: every shard present, every scale with its weight, every fp8 weight with its scale."""
    missing = sorted({s for s in index.values() if not (src / s).is_file()})
    if missing:
        raise FileNotFoundError(f"{src}: shards listed in the index are missing: {', '.join(missing)}")
    for name in index:
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") not in index:
            raise ValueError(f"{src}: '{name}' has no weight '{name.removesuffix('_scale_inv')}'")
    for name, shard in index.items():
        if not name.endswith("_scale_inv") and name + "_scale_inv" not in index and reader.dtype(name) == "F8_E4M3":
            raise ValueError(f"{src / shard}: fp8 tensor '{name}' has no '{name}_scale_inv'; the checkpoint is "
                             "incomplete (download its scale tensors again)")


def cast_fp8_to_bf16(src_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                     progress: bool = True, part: tuple[int, int] = (0, 1)) -> Optional[Path]:
    """Write a bf16 copy of an fp8 DeepSeek-V3 checkpoint: same shard files without the scale tensors,
    a new index, config without ``quantization_config`` and with ``num_nextn_predict_layers`` 0, and the
    tokenizer files. Each output shard is written tensor by tensor in row blocks of about 64 MiB (peak memory:
    one block, its fp32 products and the scales, whatever the shard size). ``part=(i, n)`` casts every n-th shard
    from the i-th, as the nodes of a job split it; part 0 then waits for the others and finalizes (others return
    None). Resumable."""
    src = Path(src_dir)
    config = json.loads((src / "config.json").read_text())
    index = read_index(src)
    reader = ShardReader(src, index)
    _check_fp8_source(src, index, reader)
    num_layers = config["num_hidden_layers"]
    staging = Staging(out_dir, {"job": "fp8_to_bf16", "src": str(src.resolve())}, overwrite).open()
    shards = sorted(set(index.values()))
    keep: dict[str, list[str]] = {s: [] for s in shards}
    for name, shard in index.items():
        if not name.endswith("_scale_inv") and (_layer_of(name) is None or _layer_of(name) < num_layers):
            keep[shard].append(name)
    mine = shards[part[0]::part[1]]
    bar = tqdm(total=sum((src / s).stat().st_size for s in mine), unit="B", unit_scale=True,
               desc=f"fp8 -> bf16 part {part[0]}/{part[1]}", disable=not progress)
    for shard in mine:
        if keep[shard] and not staging.done(shard):
            layout = {n: (torch.bfloat16 if n + "_scale_inv" in index else ST_TORCH[reader.dtype(n)], reader.shape(n))
                      for n in keep[shard]}
            stream_safetensors(staging.dir / shard, layout, lambda n: _bf16_pieces(reader, index, n))
        staging.mark(shard)
        bar.update((src / shard).stat().st_size)
    bar.close()
    if part[0] != 0:
        return None
    staging.wait_for(shards)
    weight_map = {n: shard for shard in shards for n in keep[shard]}
    total_size = sum((staging.dir / s).stat().st_size for s in set(weight_map.values()))
    write_json(staging.dir / "model.safetensors.index.json",
               {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    write_json(staging.dir / "config.json", fixed_config(config))
    copy_tokenizer_files(src, staging.dir)
    return staging.finish()
