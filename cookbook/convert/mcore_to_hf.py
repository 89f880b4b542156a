"""Megatron-Core torch_dist checkpoint -> HF safetensors (sharded, with index, config and tokenizer files).

Reads only the chunks each output shard needs (``CheckpointReader``), so memory stays at about one
output shard whatever the model size, and works on checkpoints written under any TP/PP/EP layout.
Output shards are planned up front from the name table, written atomically and marked done, so an
interrupted export resumes; ``part=(i, n)`` writes every n-th shard for a split job.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cookbook.atomic import write_json
from cookbook.config import CookbookConfig
from cookbook.convert.hf_io import copy_tokenizer_files
from cookbook.convert.mcore_ckpt import CheckpointReader, base_name, meta_sharded_state_dict
from cookbook.convert.names import FP32_MCORE_SUFFIXES, Mapping, all_mappings, hf_shape, to_hf_tensors
from cookbook.convert.staging import Staging
from cookbook.models.hf_config import hf_config_dict

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def plan_shards(cfg: CookbookConfig, max_shard_bytes: int) -> list[list[Mapping]]:
    """The table in order, cut into shards of at most ``max_shard_bytes`` (at the output dtype)."""
    m = cfg.model
    size = HF_DTYPES[m.params_dtype].itemsize
    shards: list[list[Mapping]] = [[]]
    total = 0
    for mp in all_mappings(m):
        nbytes = sum(int(torch.Size(hf_shape(m, h)).numel()) * size for h in mp.hf)
        if shards[-1] and total + nbytes > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(mp)
        total += nbytes
    return shards


def mcore_to_hf(cfg: CookbookConfig, ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                tokenizer_dir: Optional[str | os.PathLike] = None, overwrite: bool = False,
                max_shard_bytes: int = 4 << 30, part: tuple[int, int] = (0, 1), finalize: Optional[bool] = None,
                progress: bool = True) -> Optional[Path]:
    """Export; returns the HF folder once finalized. Weights are written in ``model.params_dtype``, the
    router's ``e_score_correction_bias`` in float32 (as in the original checkpoints).

    A policy trained with ``moe.trainer_expert_bias=false`` has no expert bias in its checkpoint; the rollout engine
    sampled it with the bias it loaded, and that bias, read from ``tokenizer_dir`` (the HF checkpoint training
    started from), is what the export writes."""
    ckpt_dir = Path(ckpt_dir)
    reader = CheckpointReader(ckpt_dir)
    sharded = meta_sharded_state_dict(cfg)
    entries = {base_name(n): e for n, e in sharded.items() if not n.endswith("._extra_state")}
    missing = [e.key for e in entries.values() if e.key not in reader.metadata.state_dict_metadata]
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else ckpt_dir
    bias_source = None
    if missing and not cfg.moe.trainer_expert_bias and all(k.endswith(FP32_MCORE_SUFFIXES) for k in missing):
        from cookbook.convert.hf_io import ShardReader

        bias_source, missing = ShardReader(tokenizer_dir), []
    if missing:
        raise KeyError(f"{ckpt_dir} lacks {len(missing)} tensors of preset '{cfg.model.name}', e.g. {missing[:3]}; "
                       "is it a checkpoint of this preset?")
    finalize = part[0] == 0 if finalize is None else finalize
    job = {"job": "mcore_to_hf", "src": str(ckpt_dir.resolve()), "preset": cfg.model.name,
           "dtype": cfg.model.params_dtype, "max_shard_bytes": max_shard_bytes, "parts": part[1]}
    staging = Staging(out_dir, job, overwrite).open()
    shards = plan_shards(cfg, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    dtype = HF_DTYPES[cfg.model.params_dtype]
    mine = [i for i in range(len(shards)) if i % part[1] == part[0]]
    bar = tqdm(total=len(mine), unit="shard", disable=not progress, desc=f"Megatron -> HF part {part[0]}/{part[1]}")
    written_bytes = 0
    for i in mine:
        if not staging.done(names[i]):
            tensors: dict[str, torch.Tensor] = {}
            for mp in shards[i]:
                if bias_source is not None and mp.mcore.endswith(FP32_MCORE_SUFFIXES):  # the rollout's bias
                    tensors[mp.hf[0]] = bias_source.get(mp.hf[0]).to(torch.float32).contiguous()
                    continue
                tensor = reader.read_entry(entries[mp.mcore])
                out_dtype = torch.float32 if mp.mcore.endswith(FP32_MCORE_SUFFIXES) else dtype
                for hf_name, t in to_hf_tensors(mp, tensor):
                    tensors[hf_name] = t.to(out_dtype).contiguous()
            tmp = staging.dir / f".part-{names[i]}"
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, staging.dir / names[i])
            written_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            staging.mark(names[i])
        bar.update(1)
        bar.set_postfix_str(f"{written_bytes / max(bar.format_dict['elapsed'], 1e-9) / 2**20:.0f} MiB/s")
    bar.close()
    if not finalize:
        return None
    staging.wait_for(names)
    weight_map = {h: names[i] for i, shard in enumerate(shards) for mp in shard for h in mp.hf}
    total = sum((staging.dir / n).stat().st_size for n in names)
    write_json(staging.dir / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = hf_config_dict(cfg.model)
    source_config = tokenizer_dir / "config.json"
    if not source_config.is_file():
        source_config = ckpt_dir / "hf_config.json"
    if source_config.is_file():  # keep the source's token ids and extras; the architecture comes from the preset
        import json

        original = json.loads(source_config.read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "auto_map"):
            if key in original:
                config[key] = original[key]
    write_json(staging.dir / "config.json", config)
    copy_tokenizer_files(tokenizer_dir, staging.dir)
    return staging.finish()
