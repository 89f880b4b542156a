"""The conversion steps as the notebook and ``cookbook convert`` run them, and the checks that prove them:
the HF -> Megatron -> HF round trip (bit-exact) and the HF-vs-Megatron logit comparison.

Two levels, one implementation, shared by notebook 20 and the CLI:

- ``convert_policy`` and ``verify_conversion`` are notebook 20's sequence: prepare the source (the tiny build, or
  the user's download cast fp8 -> bf16 and given the tutorial's config fixes, ``source.prepare_hf_dir``), convert
  it into the run's Megatron-Core folder, then check it. Notebook 20 calls them; so do ``cookbook convert`` (no
  ``--direction``: the run's preset; ``--direction hf_to_mcore --src/--out``: a given folder, prepared the
  same way), ``cookbook convert --verify`` and ``cookbook verify-convert``.
- ``convert`` is one raw step (hf_to_mcore, mcore_to_hf, fp8_to_bf16) on exactly the folders it is given; the
  steps above are built from it, and ``cookbook convert --direction mcore_to_hf|fp8_to_bf16`` runs it alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from cookbook.config import ConfigError, CookbookConfig
from cookbook.convert.hf_io import read_index
from cookbook.models.hf_config import read_hf_config

DIRECTIONS = ("hf_to_mcore", "mcore_to_hf", "fp8_to_bf16")


def part_from_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of a batch job (PyTorchJob sets them), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def needs_fp8_cast(hf_dir: str | os.PathLike) -> bool:
    return bool(read_hf_config(hf_dir).get("quantization_config"))


def convert(cfg: CookbookConfig, direction: str, src: str | os.PathLike, out: str | os.PathLike,
            overwrite: bool = False, part: Optional[tuple[int, int]] = None,
            tokenizer_dir: Optional[str | os.PathLike] = None, progress: bool = True,
            max_shard_bytes: int = 4 << 30) -> Optional[Path]:
    """One conversion step (the CLI's ``cookbook convert``). ``part=(i, n)`` (default: RANK/WORLD_SIZE)
    splits it across processes or nodes; part 0 finalizes. ``max_shard_bytes`` sizes the HF shards written by
    mcore_to_hf (peak memory is about one of them). Returns the output folder once complete."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction '{direction}' is unknown; choose one of {', '.join(DIRECTIONS)}")
    part = part or part_from_env()
    if direction == "hf_to_mcore":
        from cookbook.convert.hf_to_mcore import hf_to_mcore

        return hf_to_mcore(cfg, src, out, overwrite=overwrite, part=part, progress=progress)
    if direction == "mcore_to_hf":
        from cookbook.convert.mcore_to_hf import mcore_to_hf

        return mcore_to_hf(cfg, src, out, tokenizer_dir=tokenizer_dir, overwrite=overwrite, part=part,
                           max_shard_bytes=max_shard_bytes, progress=progress)
    from cookbook.convert.fp8 import cast_fp8_to_bf16

    return cast_fp8_to_bf16(src, out, overwrite=overwrite, progress=progress, part=part)


def round_trip_check(hf_dir: str | os.PathLike, hf_back_dir: str | os.PathLike) -> dict:
    """Compare every tensor of two HF checkpoints bit for bit (names, dtypes, shapes, bytes)."""
    a_index, b_index = read_index(hf_dir), read_index(hf_back_dir)
    only_a, only_b = sorted(set(a_index) - set(b_index)), sorted(set(b_index) - set(a_index))
    mismatched = []
    total = 0
    for name in sorted(set(a_index) & set(b_index)):
        with safe_open(Path(hf_dir) / a_index[name], "pt") as fa, safe_open(Path(hf_back_dir) / b_index[name], "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        total += ta.numel() * ta.element_size()
        same = ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta.view(torch.uint8), tb.view(torch.uint8))
        if not same:
            mismatched.append(name)
    return {"tensors": len(set(a_index) & set(b_index)), "bytes": total, "bit_exact": not (mismatched or only_a or only_b),
            "mismatched": mismatched, "only_in_source": only_a, "only_in_round_trip": only_b}


def compare_logits(cfg: CookbookConfig, hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike,
                   batch: int = 2, seq_len: int = 32, seed: int = 0) -> dict:
    """Logits of the HF model (transformers) and of the Megatron model loaded from the converted
    checkpoint, on the same random tokens, in float32; returns the max / mean absolute difference."""
    import transformers

    from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
    from cookbook.convert.mcore_ckpt import single_process_config
    from cookbook.megatron.model import build_model, forward_logits, init_parallel

    single = single_process_config(cfg)
    init_parallel(single)
    model = build_model(single)
    load_megatron_checkpoint(model, ckpt_dir)
    model.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mcore_logits = forward_logits(model, ids).float()
        hf_logits = hf(ids).logits.float()
    diff = (mcore_logits - hf_logits).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_logit": float(hf_logits.abs().max()), "dtype": cfg.model.params_dtype,
            "same_argmax": float((mcore_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean())}


@dataclasses.dataclass
class ConvertResult:
    source: Path  # the HF directory that was converted (the tiny build, or the prepared bf16/fixed download)
    steps: list[str]  # what preparing it took, one line each
    ckpt: Optional[Path]  # the Megatron-Core checkpoint; None on a part of a split job that does not finalize


def convert_policy(cfg: CookbookConfig, overwrite: bool = False, progress: bool = True,
                   src: Optional[str | os.PathLike] = None, out: Optional[str | os.PathLike] = None,
                   part: Optional[tuple[int, int]] = None) -> ConvertResult:
    """Notebook 20's conversion of the initial policy (and ``cookbook convert``'s): prepare the source, then
    HF -> Megatron-Core into ``out`` (default: ``mcore_dir(cfg)``, where training looks for it).

    The source is the preset's (``source.prepare_source``: the tiny build, or ``model.hf_dir``), or ``src`` when
    given (``cookbook convert --direction hf_to_mcore --src``); either way an fp8 checkpoint is first cast to a
    bf16 copy next to it (``<dir>-BF16``, reused once complete) and the preset's config fixes are applied, so
    the CLI and the notebook convert the same thing. ``part=(i, n)`` (default RANK/WORLD_SIZE) splits the job.
    """
    from cookbook.convert.source import prepare_hf_dir, prepare_source
    from cookbook.rundir import mcore_dir

    if src is None:
        source, steps = prepare_source(cfg, overwrite=overwrite, part=part, progress=progress)
    else:
        source, steps = prepare_hf_dir(cfg, src, overwrite=overwrite, part=part, progress=progress)
    ckpt = convert(cfg, "hf_to_mcore", source, out or mcore_dir(cfg), overwrite=overwrite, part=part,
                   progress=progress)
    return ConvertResult(source, steps, ckpt)


def conversion_split(cfg: CookbookConfig, parts: int):
    """How ``parts`` nodes of a batch job share the HF -> Megatron-Core conversion (``part=(i, parts)``): per part
    its decoder layers (dense + MoE), the embedding or output layer it also carries, its tensors and their size in
    bf16, so a reader sees that the work and the host memory are split by layer ranges."""
    import pandas as pd

    from cookbook.convert.hf_to_mcore import part_layers
    from cookbook.convert.names import all_mappings, hf_shape

    m = cfg.model
    rows = []
    for i in range(parts):
        layers = part_layers(m.num_layers, (i, parts))
        names = [h for mp in all_mappings(m, layers) for h in mp.hf]
        moe = sum(layer >= m.first_k_dense_replace for layer in layers)
        extra = (["embedding"] if layers.start == 0 else []) + (["final norm, output layer"]
                                                                if layers.stop >= m.num_layers else [])
        rows.append({"part (node)": i, "decoder layers": f"{layers.start}-{layers.stop - 1}" if layers else "-",
                     "dense + MoE": f"{len(layers) - moe} + {moe}", "also": ", ".join(extra) or "-",
                     "HF tensors": len(names),
                     "GiB (bf16)": round(sum(math.prod(hf_shape(m, h)) for h in names) * 2 / 2**30, 3)})
    return pd.DataFrame(rows).set_index("part (node)")


def convert_policy_in_parts(cfg: CookbookConfig, parts: int, overwrite: bool = False,
                            progress: bool = True) -> ConvertResult:
    """``convert_policy`` split into ``parts`` as the nodes of a batch job split it, run here one part after another
    (notebook 31 on one machine): the source is prepared once (here the fp8 cast in one part), parts ``parts-1``
    .. 1 convert their layer ranges, part 0 its own and then finalizes. A checkpoint already converted into
    ``model.mcore_dir`` is reused unless ``overwrite`` (a resumed run keeps the policy it started from)."""
    from cookbook.convert.hf_to_mcore import part_layers
    from cookbook.convert.source import prepare_source
    from cookbook.rundir import mcore_dir

    if parts < 1:
        raise ConfigError(f"parts={parts} is not allowed: the conversion needs at least one part")
    out = mcore_dir(cfg)
    source, steps = prepare_source(cfg, overwrite=overwrite, part=(0, 1), progress=progress)
    if (out / "cookbook_convert.json").is_file() and not overwrite:
        return ConvertResult(source, steps + [f"Megatron-Core checkpoint from before, reused: {out}"], out)
    for i in reversed(range(parts)):
        ckpt = convert(cfg, "hf_to_mcore", source, out, overwrite=overwrite, part=(i, parts), progress=progress)
        layers = part_layers(cfg.model.num_layers, (i, parts))
        steps.append(f"HF -> Megatron-Core part {i} of {parts}: layers {layers.start}-{layers.stop - 1}"
                     + (" (finalized the checkpoint)" if ckpt is not None else ""))
    return ConvertResult(source, steps, ckpt)


@dataclasses.dataclass
class Verification:
    round_trip: dict  # round_trip_check(source, HF -> Megatron -> HF)
    logits: dict  # compare_logits(cfg, source, ckpt)
    hf_round_trip: Path  # where the round trip's HF copy was written

    @property
    def bit_exact(self) -> bool:
        return bool(self.round_trip["bit_exact"])

    def __str__(self) -> str:
        def show(v):  # tensor-name lists can hold a whole model: the count and the first few
            if not isinstance(v, list):
                return str(v)
            return f"{len(v)}" + (f" ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" if v else "")

        lines = [f"round trip HF -> Megatron-Core -> HF ({self.hf_round_trip}):"]
        lines += [f"  {k}: {show(v)}" for k, v in self.round_trip.items()]
        lines += ["HF vs Megatron-Core logits:"] + [f"  {k}: {show(v)}" for k, v in self.logits.items()]
        return "\n".join(lines)


def verify_conversion(cfg: CookbookConfig, source: str | os.PathLike, ckpt: str | os.PathLike,
                      out: Optional[str | os.PathLike] = None, progress: bool = True) -> Verification:
    """Notebook 20's checks (and ``cookbook convert --verify`` / ``cookbook verify-convert``'s): convert ``ckpt``
    back to HF in this process alone (default ``<run>/hf_roundtrip``, replaced), compare it with ``source`` bit
    for bit, and compare the HF and Megatron-Core models' logits. Needs the model in memory; run it on one node."""
    back = convert(cfg, "mcore_to_hf", ckpt, out or cfg.run_dir / "hf_roundtrip", tokenizer_dir=source,
                   overwrite=True, part=(0, 1), progress=progress)
    return Verification(round_trip_check(source, back), compare_logits(cfg, source, ckpt), Path(back))
