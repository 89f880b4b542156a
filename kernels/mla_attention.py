"""MLA causal attention for training, in Triton: forward and backward on packed (varlen) sequences.

``mla_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)`` computes, inside each segment of the packed
token axis, ``softmax(q k^T * softmax_scale + causal mask) v`` with

* q, k: ``[total_tokens, heads, dk]``; MLA's dk = qk_nope + qk_rope = 128 + 64 = 192 in the real models;
* v: ``[total_tokens, heads, dv]``; dv = 128 in the real models (dv != dk, which most flash kernels refuse);
* cu_seqlens: int32 ``[num_seqs + 1]``, the segment borders; max_seqlen: the longest segment (an int, or None to
  compute it from cu_seqlens; a given value is checked against cu_seqlens, see ``mla_attention``);
* result: ``[total_tokens, heads, dv]`` in q's dtype; grads for q, k and v through autograd.

Flash-attention style (FA2): the forward keeps an online softmax in fp32 and stores one log-sum-exp per row
(base 2); the backward runs a preprocess (delta = rowsum(dO * O)), a dK/dV kernel that walks the query blocks
below each key block, and a separate dQ kernel (no atomics; ``MLAConfig(dq_atomic=True)`` instead adds dQ in
fp32 atomics from the dK/dV kernel). Causal blocks above the diagonal are skipped; only the diagonal blocks pay
for the mask. ``tl.arange`` needs powers of two, so dk is split into two parts, dk = D1 + D2 (D1 the largest
power of two <= dk, D2 the rest, a power of two or 0: 192 = 128 + 64, 48 = 32 + 16, 64 = 64 + 0), computed
as two dot products; dv must be a power of two. Other sizes raise ``ValueError``.

``MLAConfig`` holds block sizes, warps and stages per kernel; ``DEFAULT_CONFIG`` is the fastest of three sweeps on an
H100 (BENCHMARKS.md, MLA causal attention: forward 1.50-1.55 ms, forward+backward 6.6 ms at batch 8 x 4096 tokens,
16 heads, bf16; torch SDPA/cuDNN 1.27 / 5.6 ms). Options measured there and left off because they were slower:
TMA descriptors (``*_tma``), lazy rescaling (``fwd_lazy``), a software-pipelined forward (``fwd_pipeline``),
atomic dQ (``dq_atomic``).

Launch settings: ``config=None`` (the default) takes ``launch_config(dtype, device)``: ``DEFAULT_CONFIG`` where it
fits the device's shared memory (bf16/fp16 on an H100/H200), else, kernel by kernel, the first smaller candidate
whose estimated shared memory (``shared_memory_estimate``) fits (fp32: the default needs 295424 bytes in the
forward, the H100/H200 allow 232448); a launch that still runs out of resources falls back once more (see
``launch_config``). An explicit ``config`` is used as given.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them too under ``TRITON_INTERPRET=1`` (set
before triton is imported; fp32 only, as the interpreter has no real bf16 arithmetic), and otherwise fall back to
the torch reference ``kernels.mla_attention_reference`` (computed in fp32).
"""
from __future__ import annotations

import functools
import os
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels.mla_attention_reference import mla_attention_reference

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # older layouts
    from triton.runtime.autotuner import OutOfResources

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MLAConfig:
    """Block sizes and launch settings. fwd: BLOCK_M queries x BLOCK_N keys (BLOCK_M % BLOCK_N == 0).
    dK/dV: BLOCK_N1 keys per program, BLOCK_M1 queries per step (BLOCK_N1 % BLOCK_M1 == 0).
    dQ: BLOCK_M2 queries per program, BLOCK_N2 keys per step (BLOCK_M2 % BLOCK_N2 == 0)."""
    BLOCK_M: int = 128
    BLOCK_N: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    BLOCK_M1: int = 32
    BLOCK_N1: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 3
    BLOCK_M2: int = 128
    BLOCK_N2: int = 64
    dq_warps: int = 8
    dq_stages: int = 3
    dq_atomic: bool = False
    fwd_pipeline: bool = False  # forward: issue the next block's q k^T before this block's softmax
    fwd_lazy: bool = False  # forward: rescale the accumulator only when a row's max grew by more than 2^8
    # TMA tensor descriptors for each kernel's streamed tiles (sm90+ and 16-byte aligned strides; else pointers)
    fwd_tma: bool = False
    dkdv_tma: bool = False
    dq_tma: bool = False

    def check(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MLAConfig.{name}={value}: must be a power of two >= 16")
        if self.BLOCK_M % self.BLOCK_N or self.BLOCK_N1 % self.BLOCK_M1 or self.BLOCK_M2 % self.BLOCK_N2:
            raise ValueError(f"{self}: need BLOCK_M % BLOCK_N == BLOCK_N1 % BLOCK_M1 == BLOCK_M2 % BLOCK_N2 == 0")


DEFAULT_CONFIG = MLAConfig()
# The compiled kernel of each kernel's last launch (for resource reports: n_regs, n_spills, shared memory).
LAST_LAUNCHED: dict = {}
# Small blocks for the interpreter (CPU tests): more, cheaper programs, and the mask paths get exercised.
INTERPRET_CONFIG = MLAConfig(BLOCK_M=32, BLOCK_N=16, BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16,
                             fwd_warps=4, dkdv_warps=4, dq_warps=4, fwd_stages=1, dkdv_stages=1, dq_stages=1)


# ----------------------------------------------------------------------------------------------------------------
# Launch settings from the dtype and the device's shared memory
# ----------------------------------------------------------------------------------------------------------------
class SharedMemoryLimitError(RuntimeError):
    """No launch candidate of a kernel fits the device's shared memory."""


# Each kernel's MLAConfig fields, and its candidates in order of preference (the first is DEFAULT_CONFIG's): fewer
# pipeline stages first (same tiles), then smaller streamed blocks, then smaller resident blocks. Every entry keeps
# the divisibility MLAConfig.check asks for.
KERNEL_FIELDS: Dict[str, Tuple[str, str, str, str]] = {
    "fwd": ("BLOCK_M", "BLOCK_N", "fwd_warps", "fwd_stages"),
    "dkdv": ("BLOCK_M1", "BLOCK_N1", "dkdv_warps", "dkdv_stages"),
    "dq": ("BLOCK_M2", "BLOCK_N2", "dq_warps", "dq_stages"),
}
_FWD_LIKE = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1),
             (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1))
CANDIDATES: Dict[str, Tuple[Tuple[int, int, int, int], ...]] = {
    "fwd": _FWD_LIKE,  # (BLOCK_M, BLOCK_N, warps, stages)
    "dkdv": ((32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    "dq": _FWD_LIKE,  # (BLOCK_M2, BLOCK_N2, warps, stages)
}
# Packed batches of short segments (RL on a small model: prompt + response of about 50 tokens): DEFAULT_CONFIG's
# 128-row forward tile is then mostly past the segment's end, and its 8 warps hold one program per SM. For segments
# of at most SHORT_SEGMENT_TOKENS the forward and dQ kernels take these settings. H200, same runs: the forward
# 1.8-1.9x faster than DEFAULT_CONFIG's on segments of 20-70 tokens, 1.25x on 130-250, equal on 73-128 (noise
# +-10%); forward+backward about 1.1x. Dense 4096-token rows keep DEFAULT_CONFIG (BENCHMARKS.md, packed rows).
SHORT_SEGMENT_TOKENS = 256
SHORT_SEGMENT_PARAMS: Dict[str, Tuple[int, int, int, int]] = {"fwd": (64, 64, 4, 2), "dq": (64, 32, 4, 2)}
_SMEM_SLACK = 1024  # per-row vectors (lse, delta, running max) and alignment: measured 0 to 1024 bytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _kernel_params(kernel: str, config: MLAConfig) -> Tuple[int, int, int, int]:
    return tuple(getattr(config, name) for name in KERNEL_FIELDS[kernel])


def _with_params(config: MLAConfig, kernel: str, params: Tuple[int, int, int, int]) -> MLAConfig:
    return replace(config, **dict(zip(KERNEL_FIELDS[kernel], params)))


def shared_memory_estimate(kernel: str, config: MLAConfig, dtype: torch.dtype, dk: int = 192, dv: int = 128) -> int:
    """Estimated shared memory (bytes) of one program of ``kernel`` ("fwd", "dkdv" or "dq") with the pointer loads
    of ``config`` (the TMA, pipelined-forward and atomic-dQ options are not modelled).

    Each kernel keeps one block resident and streams the other: fwd holds Q [BLOCK_M, dk] and streams K + V
    [BLOCK_N, dk + dv]; dQ holds Q + dO [BLOCK_M2, dk + dv] and streams K + V [BLOCK_N2, dk + dv]; dK/dV holds
    K + V [BLOCK_N1, dk + dv] and streams Q + dO [BLOCK_M1, dk + dv]. Triton's software pipelining keeps copies of
    the streamed tiles in shared memory:

    * 2-byte inputs (tensor-core MMA reading shared memory asynchronously): num_stages copies, plus the resident
      block;
    * fp32 inputs (input_precision="ieee": FMA dots, operands moved to registers): max(num_stages, 2) - 1 copies,
      plus the resident block, plus a [rows, cols] fp32 score tile for the layout change of p (or dS) before the
      second dot.

    Plus 1024 bytes of slack (per-row vectors such as lse, delta, the running max). Calibration: the kernels
    compiled for sm_90 without a GPU (``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` and 16-byte divisible
    pointers/strides as at launch; triton 3.9) report a ``metadata.shared`` between this model without the slack
    and with it (0 to 1024 bytes above the tiles) for every pipelined setting tried (num_stages 2-4; fwd and dQ
    128/64 x 64/32, dK/dV 16/32 x 32/64/128; bf16 and fp32; tests/kernels/test_mla_attention.py lists them);
    num_stages=1 (no pipelining) needs less than estimated. Both figures measured at launch with triton 3.6 match:
    fp32 fwd at DEFAULT_CONFIG 295424 bytes (the OutOfResources error on an H200; estimate 295936, +0.2%) and bf16
    fwd 168 KiB = 172032 (BENCHMARKS.md, H100; estimate 173056). Other Triton versions or GPUs can differ, which
    is why a launch that still runs out of resources falls back (``launch_config``)."""
    if kernel not in KERNEL_FIELDS:
        raise ValueError(f"kernel {kernel!r}: one of {sorted(KERNEL_FIELDS)}")
    es = _itemsize(dtype)
    rows, cols, _, stages = _kernel_params(kernel, config)  # fwd/dq: rows = queries; dK/dV: rows = queries too
    if kernel == "fwd":
        resident, streamed = rows * dk * es, cols * (dk + dv) * es
    elif kernel == "dq":
        resident, streamed = rows * (dk + dv) * es, cols * (dk + dv) * es
    else:  # dK/dV: BLOCK_N1 (cols) keys resident, BLOCK_M1 (rows) queries streamed
        resident, streamed = cols * (dk + dv) * es, rows * (dk + dv) * es
    if es <= 2:
        return stages * streamed + resident + _SMEM_SLACK
    return (max(stages, 2) - 1) * streamed + resident + rows * cols * 4 + _SMEM_SLACK


def select_config(dtype: torch.dtype, dk: int, dv: int, smem_limit: int) -> MLAConfig:
    """The launch settings for inputs of ``dtype`` and head dims dk/dv on a device allowing ``smem_limit`` bytes of
    shared memory per program (a pure function): for each kernel the first of ``CANDIDATES[kernel]`` (the first
    one being DEFAULT_CONFIG's, the measured bf16 optimum) whose ``shared_memory_estimate`` fits. bf16/fp16 on an
    H100/H200 (232448 bytes) gives DEFAULT_CONFIG. Raises ``SharedMemoryLimitError`` when even the smallest
    candidate of a kernel does not fit."""
    config = DEFAULT_CONFIG
    for kernel, candidates in CANDIDATES.items():
        for params in candidates:
            trial = _with_params(config, kernel, params)
            if shared_memory_estimate(kernel, trial, dtype, dk, dv) <= smem_limit:
                config = trial
                break
        else:
            smallest = shared_memory_estimate(kernel, trial, dtype, dk, dv)
            raise SharedMemoryLimitError(
                f"MLA attention {kernel} kernel, {dtype}, dk {dk} / dv {dv}: even the smallest launch candidate "
                f"{dict(zip(KERNEL_FIELDS[kernel], params))} needs about {smallest} bytes of shared memory, the device "
                f"allows {smem_limit}")
    config.check()
    return config


def device_shared_memory_limit(device) -> Optional[int]:
    """Shared memory (bytes) one program may use on ``device``: on CUDA the opt-in maximum per block,
    ``torch.cuda.get_device_properties(device).shared_memory_per_block_optin`` (232448 on an H100/H200; the
    "Hardware limit" of Triton's OutOfResources error), else Triton's ``max_shared_mem`` for the device; None when
    unknown or not CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if not limit:
        try:
            limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
        except Exception:  # noqa: BLE001 - an unknown limit only means no pre-selection
            limit = None
    return int(limit) if limit else None


# (dtype, device type, device index, dk, dv) -> the chosen launch settings; updated by the launch fallback.
_LAUNCH_CONFIGS: Dict[tuple, MLAConfig] = {}
_LAUNCH_LOCK = threading.Lock()
# One entry per launch fallback taken (kernel, dtype, the settings that failed and those used instead).
LAUNCH_FALLBACKS: List[dict] = []


def _launch_key(dtype: torch.dtype, device, dk: int, dv: int) -> tuple:
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return (dtype, device.type, index, dk, dv)


def for_segments(config: MLAConfig, max_seqlen: int, dtype: torch.dtype, dk: int = 192, dv: int = 128) -> MLAConfig:
    """``config`` with SHORT_SEGMENT_PARAMS for each kernel where they need no more shared memory than its own
    settings, when no segment is longer than SHORT_SEGMENT_TOKENS; else ``config`` unchanged."""
    return config if max_seqlen > SHORT_SEGMENT_TOKENS else _short_segment_config(config, dtype, dk, dv)


@functools.lru_cache(maxsize=64)  # called per launch: a few microseconds instead of 26
def _short_segment_config(config: MLAConfig, dtype: torch.dtype, dk: int, dv: int) -> MLAConfig:
    for kernel, params in SHORT_SEGMENT_PARAMS.items():
        short = _with_params(config, kernel, params)
        estimate = shared_memory_estimate(kernel, config, dtype, dk, dv)
        if shared_memory_estimate(kernel, short, dtype, dk, dv) <= estimate:
            config = short
    return config


def launch_config(dtype: torch.dtype, device, dk: int = 192, dv: int = 128,
                  max_seqlen: Optional[int] = None) -> MLAConfig:
    """The launch settings used when ``config`` is None: ``select_config(dtype, dk, dv, limit)`` with the device's
    shared-memory limit (``device_shared_memory_limit``: ``shared_memory_per_block_optin`` on CUDA), cached per
    (dtype, device, dk, dv); ``INTERPRET_CONFIG`` under TRITON_INTERPRET=1 or off CUDA; DEFAULT_CONFIG when the
    limit is unknown. With ``max_seqlen``, short segments take ``for_segments``'s settings.

    Why an estimate and a fallback: the estimate picks the first setting (no failed compile, a clear error up front,
    and the choice can be seen before running); a launch that still fails with Triton's OutOfResources moves that
    kernel to the next candidate expected to fit (the estimate scaled by the observed Required/estimate ratio) and
    caches the choice per (kernel, dtype, device, dims) here. The estimate alone models one Triton version's
    allocation for aligned inputs, and that moves: the same bf16 forward compiles to 65536 bytes instead of 172032
    when its pointers and strides are not 16-divisible (no pipelining), and other versions or GPUs can differ. A
    retry alone would pay a full compile per failed candidate (35 s to 4 min per fp32 kernel on 2 CPU cores).
    OutOfResources is raised when the compiled kernel is loaded, before it runs, so a retry is safe. Explicit
    configs never fall back."""
    if _interpreting() or torch.device(device).type != "cuda":
        return INTERPRET_CONFIG
    key = _launch_key(dtype, device, dk, dv)
    with _LAUNCH_LOCK:
        config = _LAUNCH_CONFIGS.get(key)
    if config is None:
        limit = device_shared_memory_limit(device)
        config = DEFAULT_CONFIG if limit is None else select_config(dtype, dk, dv, limit)
        with _LAUNCH_LOCK:
            config = _LAUNCH_CONFIGS.setdefault(key, config)
    return config if max_seqlen is None else for_segments(config, max_seqlen, dtype, dk, dv)


def _fallback_params(kernel: str, config: MLAConfig, dtype: torch.dtype, dk: int, dv: int,
                     err: OutOfResources) -> Optional[Tuple[int, int, int, int]]:
    """After ``config`` ran out of resources in ``kernel``: the next candidate expected to fit once the estimate is
    scaled by the observed required/estimate ratio; the next candidate at all when the error has no figures; None
    when no candidate is left."""
    candidates = CANDIDATES[kernel]
    current = _kernel_params(kernel, config)
    later = candidates[candidates.index(current) + 1:] if current in candidates else list(candidates)
    if not later:
        return None
    if getattr(err, "name", None) != "shared memory":  # threads, registers, ...: just the next one
        return later[0]
    try:
        required, limit = int(err.required), int(err.limit)
        ratio = required / shared_memory_estimate(kernel, config, dtype, dk, dv)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return later[0]
    for params in later:
        if shared_memory_estimate(kernel, _with_params(config, kernel, params), dtype, dk, dv) * ratio <= limit:
            return params
    return later[-1]


def _launch(kernel: str, config: Optional[MLAConfig], dtype: torch.dtype, device, dk: int, dv: int,
            launch: Callable[[MLAConfig], object], max_seqlen: Optional[int] = None):
    """Runs ``launch(settings)`` (one kernel launch, returning the compiled kernel) with ``config``, or with
    ``launch_config`` when config is None, falling back to smaller candidates on OutOfResources in that case."""
    if config is not None:
        return launch(config)
    config = launch_config(dtype, device, dk, dv, max_seqlen)
    while True:
        try:
            return launch(config)
        except OutOfResources as err:
            params = _fallback_params(kernel, config, dtype, dk, dv, err)
            if params is None:
                raise SharedMemoryLimitError(
                    f"MLA attention {kernel} kernel, {dtype}, dk {dk} / dv {dv}: the smallest launch candidate "
                    f"{dict(zip(KERNEL_FIELDS[kernel], _kernel_params(kernel, config)))} still fails: {err}") from err
            failed, config = config, _with_params(config, kernel, params)
            LAUNCH_FALLBACKS.append({"kernel": kernel, "dtype": str(dtype), "failed": _kernel_params(kernel, failed),
                                     "error": str(err), "next": params})
            key = _launch_key(dtype, device, dk, dv)
            with _LAUNCH_LOCK:  # keep the other kernels' entries as they are
                _LAUNCH_CONFIGS[key] = _with_params(_LAUNCH_CONFIGS.get(key, failed), kernel, params)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_qk_dim(dk: int) -> Tuple[int, int]:
    """dk = D1 + D2 with D1 the largest power of two <= dk and D2 a power of two >= 16, or 0."""
    if dk < 16:
        raise ValueError(f"qk head dim {dk}: must be >= 16")
    d1 = 1 << (dk.bit_length() - 1)
    d2 = dk - d1
    if d2 and (d2 < 16 or d2 & (d2 - 1)):
        raise ValueError(f"qk head dim {dk} = {d1} + {d2}: the rest after the largest power of two must be 0 or a "
                         "power of two >= 16 (e.g. 192 = 128 + 64, 48 = 32 + 16)")
    return d1, d2


def _check_v_dim(dv: int) -> None:
    if dv < 16 or dv & (dv - 1):
        raise ValueError(f"v head dim {dv}: must be a power of two >= 16")


# ----------------------------------------------------------------------------------------------------------------
# Tile loads: TMA tensor descriptors (USE_TMA: rows past the segment's end come back as zeros) or pointers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(desc, base, stride, start, n_rows, COL: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
               MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + ROWS), columns [COL, COL + COLS) of a segment of n_rows rows."""
    if USE_TMA:
        x = desc.load([start, 0])
    else:
        offs_r = start + tl.arange(0, ROWS)
        ptrs = base + offs_r[:, None] * stride + (COL + tl.arange(0, COLS))[None, :]
        if MASK:
            x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_qk(q1, q2, kd1, kd2, k_base, stride_kt, start_n, seq_len, D1: tl.constexpr, D2: tl.constexpr,
            BLOCK_N: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr):
    """Raw scores q k^T of one key block: [BLOCK_M, BLOCK_N] fp32, dk split as D1 + D2."""
    k1 = _load_rows(kd1, k_base, stride_kt, start_n, seq_len, 0, BLOCK_N, D1, MASK, USE_TMA)
    qk = tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if D2 > 0:
        k2 = _load_rows(kd2, k_base, stride_kt, start_n, seq_len, D1, BLOCK_N, D2, MASK, USE_TMA)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=PREC)
    return qk


@triton.jit
def _fwd_softmax_pv(acc, l_i, m_i, qk, vd, v_base, stride_vt, offs_m, start_n, seq_len, qk_scale,
                    DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, LAZY: tl.constexpr,
                    USE_TMA: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update with one key block's scores, then acc += p v."""
    if MASK:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_ij
    elif LAZY:
        # Rescale only when some row's max grew by more than 2^8: p stays <= 256, exact either way.
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if tl.max(m_ij - m_i, 0) > 8.0:
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_ij
        p = tl.math.exp2(qk * qk_scale - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:  # one FMA per score: scale and subtract the running max together
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_ij
    v = _load_rows(vd, v_base, stride_vt, start_n, seq_len, 0, BLOCK_N, DV, MASK, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_i


@triton.jit
def _mla_fwd_kernel(Q, K, V, O, LSE, CU,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_lh, qk_scale,
                    D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAZY: tl.constexpr, PIPE: tl.constexpr,
                    USE_TMA: tl.constexpr, PREC: tl.constexpr):
    # Query blocks in reverse order: the longest rows (most key blocks) start first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(CU + seq)
    seq_len = tl.load(CU + seq + 1) - seq_start
    if start_m >= seq_len:
        return
    tok0 = seq_start.to(tl.int64)
    q_base = Q + tok0 * stride_qt + head * stride_qh
    k_base = K + tok0 * stride_kt + head * stride_kh
    v_base = V + tok0 * stride_vt + head * stride_vh
    if USE_TMA:
        kd1 = tl.make_tensor_descriptor(k_base, shape=[seq_len, D1], strides=[stride_kt, 1],
                                        block_shape=[BLOCK_N, D1])
        if D2 > 0:
            kd2 = tl.make_tensor_descriptor(k_base + D1, shape=[seq_len, D2], strides=[stride_kt, 1],
                                            block_shape=[BLOCK_N, D2])
        else:
            kd2 = kd1
        vd = tl.make_tensor_descriptor(v_base, shape=[seq_len, DV], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, DV])
    else:
        kd1 = k_base
        kd2 = k_base
        vd = v_base
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_len
    q1 = _load_rows(q_base, q_base, stride_qt, start_m, seq_len, 0, BLOCK_M, D1, True, False)
    if D2 > 0:
        q2 = _load_rows(q_base, q_base, stride_qt, start_m, seq_len, D1, BLOCK_M, D2, True, False)
    else:
        q2 = q1
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    # The diagonal block first (causal mask, the segment's end): it sets a finite running max for every row.
    end_n = tl.minimum(start_m + BLOCK_M, seq_len)
    for start_n in range(start_m, end_n, BLOCK_N):
        qk = _fwd_qk(q1, q2, kd1, kd2, k_base, stride_kt, start_n, seq_len, D1, D2, BLOCK_N, True, USE_TMA, PREC)
        acc, l_i, m_i = _fwd_softmax_pv(acc, l_i, m_i, qk, vd, v_base, stride_vt, offs_m, start_n, seq_len, qk_scale,
                                        DV, BLOCK_N, True, LAZY, USE_TMA, PREC)
    # Keys left of the diagonal block: every row sees all of them, no mask.
    if PIPE:
        # Software-pipelined: the next block's q k^T is issued before this block's softmax and p v, so the
        # tensor cores can work while the softmax runs.
        if start_m > 0:
            qk = _fwd_qk(q1, q2, kd1, kd2, k_base, stride_kt, 0, seq_len, D1, D2, BLOCK_N, False, USE_TMA, PREC)
            for start_n in range(0, start_m - BLOCK_N, BLOCK_N):
                qk_next = _fwd_qk(q1, q2, kd1, kd2, k_base, stride_kt, start_n + BLOCK_N, seq_len, D1, D2, BLOCK_N,
                                  False, USE_TMA, PREC)
                acc, l_i, m_i = _fwd_softmax_pv(acc, l_i, m_i, qk, vd, v_base, stride_vt, offs_m, start_n, seq_len,
                                                qk_scale, DV, BLOCK_N, False, LAZY, USE_TMA, PREC)
                qk = qk_next
            acc, l_i, m_i = _fwd_softmax_pv(acc, l_i, m_i, qk, vd, v_base, stride_vt, offs_m, start_m - BLOCK_N,
                                            seq_len, qk_scale, DV, BLOCK_N, False, LAZY, USE_TMA, PREC)
    else:
        for start_n in range(0, start_m, BLOCK_N):
            qk = _fwd_qk(q1, q2, kd1, kd2, k_base, stride_kt, start_n, seq_len, D1, D2, BLOCK_N, False, USE_TMA,
                         PREC)
            acc, l_i, m_i = _fwd_softmax_pv(acc, l_i, m_i, qk, vd, v_base, stride_vt, offs_m, start_n, seq_len,
                                            qk_scale, DV, BLOCK_N, False, LAZY, USE_TMA, PREC)
    acc = acc / l_i[:, None]
    offs_dv = tl.arange(0, DV)
    o_base = O + tok0 * stride_ot + head * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_dv[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None])
    tl.store(LSE + head * stride_lh + seq_start + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
                           DV: tl.constexpr, BLOCK: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    mask = offs_t < total_tokens
    offs_dv = tl.arange(0, DV)
    o = tl.load(O + head * stride_oh + offs_t[:, None] * stride_ot + offs_dv[None, :], mask=mask[:, None],
                other=0.0).to(tl.float32)
    do = tl.load(DO + head * stride_doh + offs_t[:, None] * stride_dot + offs_dv[None, :], mask=mask[:, None],
                 other=0.0).to(tl.float32)
    tl.store(DELTA + head * stride_dh + offs_t, tl.sum(o * do, axis=1), mask=mask)


@triton.jit
def _dkdv_inner(dk1, dk2, dv, k1, k2, v, qd1, qd2, dod, q_base, do_base, lse_base, delta_base, dq_base,
                stride_qt, stride_dot, stride_dqt, offs_n, start_m, seq_len, qk_scale, sm_scale,
                D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_M1: tl.constexpr,
                MASK_CAUSAL: tl.constexpr, MASK_ROWS: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                USE_TMA: tl.constexpr, PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M1)
    q1 = _load_rows(qd1, q_base, stride_qt, start_m, seq_len, 0, BLOCK_M1, D1, MASK_ROWS, USE_TMA)
    do = _load_rows(dod, do_base, stride_dot, start_m, seq_len, 0, BLOCK_M1, DV, MASK_ROWS, USE_TMA)
    if MASK_ROWS:
        mask_m = offs_m < seq_len
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    qkT = tl.dot(k1, tl.trans(q1), input_precision=PREC)  # [BLOCK_N1, BLOCK_M1]
    if D2 > 0:
        q2 = _load_rows(qd2, q_base, stride_qt, start_m, seq_len, D1, BLOCK_M1, D2, MASK_ROWS, USE_TMA)
        qkT = tl.dot(k2, tl.trans(q2), qkT, input_precision=PREC)
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASK_CAUSAL:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    if MASK_ROWS:
        pT = tl.where(mask_m[None, :], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
    dk1 = tl.dot(dsT, q1, dk1, input_precision=PREC)
    if D2 > 0:
        dk2 = tl.dot(dsT, q2, dk2, input_precision=PREC)
    if DQ_ATOMIC:
        ds = tl.trans(dsT)
        offs_d1 = tl.arange(0, D1)
        dq1 = tl.dot(ds, k1, input_precision=PREC) * sm_scale
        if MASK_ROWS:
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d1[None, :], dq1, mask=mask_m[:, None],
                          sem="relaxed")
        else:
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d1[None, :], dq1, sem="relaxed")
        if D2 > 0:
            offs_d2 = D1 + tl.arange(0, D2)
            dq2 = tl.dot(ds, k2, input_precision=PREC) * sm_scale
            if MASK_ROWS:
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d2[None, :], dq2,
                              mask=mask_m[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d2[None, :], dq2, sem="relaxed")
    return dk1, dk2, dv


@triton.jit
def _mla_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                         stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale,
                         D1: tl.constexpr, D2: tl.constexpr, DV_DIM: tl.constexpr,
                         BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                         USE_TMA: tl.constexpr, PREC: tl.constexpr):
    # Key blocks in natural order: block 0 has the most query rows below it and starts first.
    start_n = tl.program_id(0) * BLOCK_N1
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(CU + seq)
    seq_len = tl.load(CU + seq + 1) - seq_start
    if start_n >= seq_len:
        return
    tok0 = seq_start.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    mask_n = offs_n < seq_len
    offs_d1 = tl.arange(0, D1)
    offs_dv = tl.arange(0, DV_DIM)
    k_base = K + tok0 * stride_kt + head * stride_kh
    v_base = V + tok0 * stride_vt + head * stride_vh
    k1 = _load_rows(k_base, k_base, stride_kt, start_n, seq_len, 0, BLOCK_N1, D1, True, False)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        k2 = _load_rows(k_base, k_base, stride_kt, start_n, seq_len, D1, BLOCK_N1, D2, True, False)
        dk2 = tl.zeros([BLOCK_N1, D2], dtype=tl.float32)
    else:
        k2 = k1
        dk2 = tl.zeros([BLOCK_N1, D1], dtype=tl.float32)
    v = _load_rows(v_base, v_base, stride_vt, start_n, seq_len, 0, BLOCK_N1, DV_DIM, True, False)
    dk1 = tl.zeros([BLOCK_N1, D1], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, DV_DIM], dtype=tl.float32)
    q_base = Q + tok0 * stride_qt + head * stride_qh
    do_base = DO + tok0 * stride_dot + head * stride_doh
    dq_base = DQ + tok0 * stride_dqt + head * stride_dqh
    lse_base = LSE + head * stride_lh + seq_start
    delta_base = DELTA + head * stride_lh + seq_start
    if USE_TMA:
        qd1 = tl.make_tensor_descriptor(q_base, shape=[seq_len, D1], strides=[stride_qt, 1],
                                        block_shape=[BLOCK_M1, D1])
        if D2 > 0:
            qd2 = tl.make_tensor_descriptor(q_base + D1, shape=[seq_len, D2], strides=[stride_qt, 1],
                                            block_shape=[BLOCK_M1, D2])
        else:
            qd2 = qd1
        dod = tl.make_tensor_descriptor(do_base, shape=[seq_len, DV_DIM], strides=[stride_dot, 1],
                                        block_shape=[BLOCK_M1, DV_DIM])
    else:
        qd1 = q_base
        qd2 = q_base
        dod = do_base
    # Query blocks on the diagonal: causal mask (and the segment's end).
    diag_end = tl.minimum(start_n + BLOCK_N1, seq_len)
    for start_m in range(start_n, diag_end, BLOCK_M1):
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, qd1, qd2, dod, q_base, do_base, lse_base, delta_base,
                                   dq_base, stride_qt, stride_dot, stride_dqt, offs_n, start_m, seq_len, qk_scale,
                                   sm_scale, D1, D2, DV_DIM, BLOCK_M1, True, True, DQ_ATOMIC, USE_TMA, PREC)
    # Full query blocks below the diagonal: no mask.
    lo = start_n + BLOCK_N1
    full_end = lo + tl.maximum(seq_len - lo, 0) // BLOCK_M1 * BLOCK_M1
    for start_m in range(lo, full_end, BLOCK_M1):
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, qd1, qd2, dod, q_base, do_base, lse_base, delta_base,
                                   dq_base, stride_qt, stride_dot, stride_dqt, offs_n, start_m, seq_len, qk_scale,
                                   sm_scale, D1, D2, DV_DIM, BLOCK_M1, False, False, DQ_ATOMIC, USE_TMA, PREC)
    # The last, partial query block.
    for start_m in range(full_end, seq_len, BLOCK_M1):
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, qd1, qd2, dod, q_base, do_base, lse_base, delta_base,
                                   dq_base, stride_qt, stride_dot, stride_dqt, offs_n, start_m, seq_len, qk_scale,
                                   sm_scale, D1, D2, DV_DIM, BLOCK_M1, False, True, DQ_ATOMIC, USE_TMA, PREC)
    dk_base = DK + tok0 * stride_dkt + head * stride_dkh
    dk1 = dk1 * sm_scale
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d1[None, :], dk1.to(DK.dtype.element_ty),
             mask=mask_n[:, None])
    if D2 > 0:
        dk2 = dk2 * sm_scale
        tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d2[None, :], dk2.to(DK.dtype.element_ty),
                 mask=mask_n[:, None])
    dv_base = DV + tok0 * stride_dvt + head * stride_dvh
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=mask_n[:, None])


@triton.jit
def _dq_inner(dq1, dq2, q1, q2, do, lse, delta, kd1, kd2, vd, k_base, v_base, stride_kt, stride_vt, offs_m,
              start_n, seq_len, qk_scale, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
              BLOCK_N2: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr):
    k1 = _load_rows(kd1, k_base, stride_kt, start_n, seq_len, 0, BLOCK_N2, D1, MASK, USE_TMA)
    v = _load_rows(vd, v_base, stride_vt, start_n, seq_len, 0, BLOCK_N2, DV, MASK, USE_TMA)
    qk = tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if D2 > 0:
        k2 = _load_rows(kd2, k_base, stride_kt, start_n, seq_len, D1, BLOCK_N2, D2, MASK, USE_TMA)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=PREC)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASK:
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 = tl.dot(ds, k1, dq1, input_precision=PREC)
    if D2 > 0:
        dq2 = tl.dot(ds, k2, dq2, input_precision=PREC)
    return dq1, dq2


@triton.jit
def _mla_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale,
                       D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
                       BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M2
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(CU + seq)
    seq_len = tl.load(CU + seq + 1) - seq_start
    if start_m >= seq_len:
        return
    tok0 = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    mask_m = offs_m < seq_len
    offs_d1 = tl.arange(0, D1)
    q_base = Q + tok0 * stride_qt + head * stride_qh
    do_base = DO + tok0 * stride_dot + head * stride_doh
    q1 = _load_rows(q_base, q_base, stride_qt, start_m, seq_len, 0, BLOCK_M2, D1, True, False)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        q2 = _load_rows(q_base, q_base, stride_qt, start_m, seq_len, D1, BLOCK_M2, D2, True, False)
        dq2 = tl.zeros([BLOCK_M2, D2], dtype=tl.float32)
    else:
        q2 = q1
        dq2 = tl.zeros([BLOCK_M2, D1], dtype=tl.float32)
    do = _load_rows(do_base, do_base, stride_dot, start_m, seq_len, 0, BLOCK_M2, DV, True, False)
    lse = tl.load(LSE + head * stride_lh + seq_start + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + seq_start + offs_m, mask=mask_m, other=0.0)
    dq1 = tl.zeros([BLOCK_M2, D1], dtype=tl.float32)
    k_base = K + tok0 * stride_kt + head * stride_kh
    v_base = V + tok0 * stride_vt + head * stride_vh
    if USE_TMA:
        kd1 = tl.make_tensor_descriptor(k_base, shape=[seq_len, D1], strides=[stride_kt, 1],
                                        block_shape=[BLOCK_N2, D1])
        if D2 > 0:
            kd2 = tl.make_tensor_descriptor(k_base + D1, shape=[seq_len, D2], strides=[stride_kt, 1],
                                            block_shape=[BLOCK_N2, D2])
        else:
            kd2 = kd1
        vd = tl.make_tensor_descriptor(v_base, shape=[seq_len, DV], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N2, DV])
    else:
        kd1 = k_base
        kd2 = k_base
        vd = v_base
    for start_n in range(0, start_m, BLOCK_N2):
        dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse, delta, kd1, kd2, vd, k_base, v_base, stride_kt, stride_vt,
                             offs_m, start_n, seq_len, qk_scale, D1, D2, DV, BLOCK_N2, False, USE_TMA, PREC)
    end_n = tl.minimum(start_m + BLOCK_M2, seq_len)
    for start_n in range(start_m, end_n, BLOCK_N2):
        dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse, delta, kd1, kd2, vd, k_base, v_base, stride_kt, stride_vt,
                             offs_m, start_n, seq_len, qk_scale, D1, D2, DV, BLOCK_N2, True, USE_TMA, PREC)
    dq_base = DQ + tok0 * stride_dqt + head * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None])
    if D2 > 0:
        tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d2[None, :],
                 (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~3e-4 relative error); bf16/fp16: the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _use_tma(wanted: bool, *tensors: torch.Tensor) -> bool:
    """TMA needs sm90+, 16-byte aligned bases and 16-byte multiples for the token and head strides."""
    if not wanted:
        return False
    if not _interpreting():
        if not tensors[0].is_cuda or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
    for x in tensors:
        size = x.element_size()
        if x.data_ptr() % 16 or (x.stride(0) * size) % 16 or (x.stride(1) * size) % 16:
            return False
    triton.set_allocator(_tma_alloc)
    return True


def _check_offsets(max_seqlen: int, *tensors: torch.Tensor) -> None:
    # Per-segment offsets are int32 (the segment's start is int64).
    for x in tensors:
        if (max_seqlen + 1) * x.stride(0) + x.shape[1] * x.stride(1) >= 2 ** 31:
            raise ValueError(f"segment of {max_seqlen} tokens x stride {x.stride(0)} overflows int32 offsets")


def mla_attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, config: Optional[MLAConfig] = None):
    """The Triton forward alone: (out [t, h, dv], lse [h, t] fp32, base 2). The raw launcher: max_seqlen must be at
    least the longest segment (not checked here; ``mla_attention`` checks it); config None: ``launch_config``."""
    t, h, dk = q.shape
    d1, d2 = split_qk_dim(dk)
    dv_dim = v.shape[-1]
    _check_v_dim(dv_dim)
    out = torch.empty(t, h, dv_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(h, t, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if t == 0 or num_seqs == 0 or max_seqlen == 0:
        return out, lse
    _check_offsets(max_seqlen, q, k, v, out)

    def launch(config):
        grid = (triton.cdiv(max_seqlen, config.BLOCK_M), num_seqs, h)
        return _mla_fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), lse.stride(0), softmax_scale * _LOG2E,
            D1=d1, D2=d2, DV=dv_dim, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, LAZY=config.fwd_lazy,
            PIPE=config.fwd_pipeline,
            USE_TMA=_use_tma(config.fwd_tma, k, v), PREC=_prec(q.dtype),
            num_warps=config.fwd_warps, num_stages=config.fwd_stages)

    LAST_LAUNCHED["mla_fwd_kernel"] = _launch("fwd", config, q.dtype, q.device, dk, dv_dim, launch, max_seqlen)
    return out, lse


def bwd_preprocess(out, do):
    """delta[h, t] = rowsum(dO * O) in fp32."""
    t, h, dv_dim = out.shape
    delta = torch.empty(h, t, dtype=torch.float32, device=out.device)
    block = 64
    LAST_LAUNCHED["bwd_preprocess_kernel"] = _bwd_preprocess_kernel[(triton.cdiv(t, block), h)](
        out, do, delta, t, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        DV=dv_dim, BLOCK=block, num_warps=4)
    return delta


def bwd_dkdv(q, k, v, do, lse, delta, cu_seqlens, max_seqlen, softmax_scale, config: Optional[MLAConfig] = None):
    """(dk, dv, dq or None): with ``config.dq_atomic`` the same kernel also adds dq (fp32 atomics); config None:
    ``launch_config`` (no atomics)."""
    t, h, dk_dim = q.shape
    d1, d2 = split_qk_dim(dk_dim)
    dv_dim = v.shape[-1]
    num_seqs = cu_seqlens.numel() - 1
    dk = torch.empty(t, h, dk_dim, dtype=k.dtype, device=q.device)
    dv = torch.empty(t, h, dv_dim, dtype=v.dtype, device=q.device)
    # Without atomics DQ is never touched: pass dk as a placeholder.
    dq_atomic = config is not None and config.dq_atomic
    dq_acc = torch.zeros(t, h, dk_dim, dtype=torch.float32, device=q.device) if dq_atomic else dk

    def launch(config):
        grid = (triton.cdiv(max_seqlen, config.BLOCK_N1), num_seqs, h)
        return _mla_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, dq_acc, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            dq_acc.stride(0), dq_acc.stride(1), lse.stride(0), softmax_scale * _LOG2E, softmax_scale,
            D1=d1, D2=d2, DV_DIM=dv_dim, BLOCK_M1=config.BLOCK_M1, BLOCK_N1=config.BLOCK_N1,
            DQ_ATOMIC=dq_atomic, USE_TMA=_use_tma(config.dkdv_tma, q, do), PREC=_prec(q.dtype),
            num_warps=config.dkdv_warps, num_stages=config.dkdv_stages)

    LAST_LAUNCHED["mla_bwd_dkdv_kernel"] = _launch("dkdv", config, q.dtype, q.device, dk_dim, dv_dim, launch,
                                                     max_seqlen)
    return dk, dv, (dq_acc if dq_atomic else None)


def bwd_dq(q, k, v, do, lse, delta, cu_seqlens, max_seqlen, softmax_scale, config: Optional[MLAConfig] = None):
    """dq from its own kernel (no atomics): each program owns a block of query rows; config None: ``launch_config``."""
    t, h, dk_dim = q.shape
    d1, d2 = split_qk_dim(dk_dim)
    dv_dim = v.shape[-1]
    num_seqs = cu_seqlens.numel() - 1
    dq = torch.empty(t, h, dk_dim, dtype=q.dtype, device=q.device)

    def launch(config):
        grid = (triton.cdiv(max_seqlen, config.BLOCK_M2), num_seqs, h)
        return _mla_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), softmax_scale * _LOG2E,
            softmax_scale, D1=d1, D2=d2, DV=dv_dim, BLOCK_M2=config.BLOCK_M2, BLOCK_N2=config.BLOCK_N2,
            USE_TMA=_use_tma(config.dq_tma, k, v), PREC=_prec(q.dtype), num_warps=config.dq_warps,
            num_stages=config.dq_stages)

    LAST_LAUNCHED["mla_bwd_dq_kernel"] = _launch("dq", config, q.dtype, q.device, dk_dim, dv_dim, launch, max_seqlen)
    return dq


def mla_attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale,
                           config: Optional[MLAConfig] = None):
    """The Triton backward alone: (dq, dk, dv); max_seqlen not checked (see ``mla_attention_forward``)."""
    do = _last_dim_contiguous(do)
    num_seqs = cu_seqlens.numel() - 1
    if q.shape[0] == 0 or num_seqs == 0 or max_seqlen == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _check_offsets(max_seqlen, q, k, v, do)
    delta = bwd_preprocess(out, do)
    dk, dv, dq = bwd_dkdv(q, k, v, do, lse, delta, cu_seqlens, max_seqlen, softmax_scale, config)
    if dq is not None:
        return dq.to(q.dtype), dk, dv
    return bwd_dq(q, k, v, do, lse, delta, cu_seqlens, max_seqlen, softmax_scale, config), dk, dv


class _MLAAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, config):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        out, lse = mla_attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.softmax_scale, ctx.config = max_seqlen, softmax_scale, config
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = mla_attention_backward(do, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale,
                                            ctx.config)
        return dq, dk, dv, None, None, None, None


def _validate(q, k, v, cu_seqlens) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q, k [t, h, dk] and v [t, h, dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 [num_seqs + 1]; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    split_qk_dim(q.shape[-1])
    _check_v_dim(v.shape[-1])


# The last cu_seqlens checked: (weak reference, version counter, token count, longest segment). Every layer of a
# training step passes the same tensor, so only the first call pays the device sync.
_LAST_CHECKED: list = [None]


def _longest_segment(cu_seqlens: torch.Tensor, total_tokens: int) -> int:
    """The longest segment, after checking that cu_seqlens is non-decreasing within [0, total_tokens]; reused
    without a device sync while the same tensor comes back unmodified (its version counter unchanged)."""
    try:
        version = cu_seqlens._version
    except RuntimeError:  # inference tensors have no version counter: always check
        version = None
    cached = _LAST_CHECKED[0]
    if (version is not None and cached is not None and cached[0]() is cu_seqlens
            and cached[1:3] == (version, total_tokens)):
        return cached[3]
    if cu_seqlens.numel() < 2:
        longest = 0
    else:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last, shortest, longest = torch.stack(
            [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
        if first < 0 or last > total_tokens or shortest < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing within [0, {total_tokens}] (the token count); got "
                             f"first {first}, last {last}, shortest segment {shortest}")
    if version is not None:
        _LAST_CHECKED[0] = (weakref.ref(cu_seqlens), version, total_tokens, int(longest))
    return int(longest)


def resolve_max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: Optional[int], total_tokens: int) -> int:
    """The longest segment of ``cu_seqlens`` when ``max_seqlen`` is None, else ``max_seqlen`` after checking it is
    at least that long (the kernels launch ceil(max_seqlen / block) programs per segment, so a smaller value would
    leave the rest of the longer segments unwritten). Also checks what would read or write out of bounds:
    cu_seqlens must be non-decreasing within [0, total_tokens]. Raises ValueError.

    Cost: one host read of four numbers computed from cu_seqlens (a diff, min and max over num_seqs + 1 int32):
    free when cu_seqlens is on the CPU, one device synchronisation when it is on the GPU, and none when the same
    tensor was checked last and has not been modified since (every layer of a step: one sync per step, not per
    layer). A sync per call would leave the GPU idle while the host launches the next kernels: 30% of a packed
    forward of short segments on the H200. The raw launchers (``mla_attention_forward`` etc.) do not check."""
    longest = _longest_segment(cu_seqlens, total_tokens)
    if max_seqlen is None:
        return int(longest)
    given = int(max_seqlen)
    if given < longest:
        raise ValueError(f"max_seqlen={given} is smaller than the longest segment in cu_seqlens ({longest} tokens): "
                         f"its rows past {given} would be left unwritten; pass max_seqlen >= {longest} or None")
    return given


def mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: Optional[int] = None, softmax_scale: Optional[float] = None,
                  config: Optional[MLAConfig] = None) -> torch.Tensor:
    """Causal attention inside each packed segment: q, k [t, h, dk], v [t, h, dv], cu_seqlens int32
    [num_seqs + 1] (on q's device, or on the CPU: then the check below costs no device sync). max_seqlen: the
    longest segment, or None to compute it from cu_seqlens; a given value smaller than the longest segment raises
    ValueError (a device sync when cu_seqlens is on the GPU and not the tensor checked last: ``resolve_max_seqlen``);
    larger is allowed
    (more programs that exit at once). config: None picks ``launch_config(q.dtype, q.device, dk, dv)``
    (DEFAULT_CONFIG for bf16/fp16 on an H100/H200, smaller settings where it does not fit, e.g. fp32); an explicit
    MLAConfig is used as given. Returns [t, h, dv] in q's dtype; differentiable in q, k and v."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    softmax_scale = float(softmax_scale)
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale}: must be > 0")
    _validate(q, k, v, cu_seqlens)
    max_seqlen = resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[0])
    if not q.is_cuda and not _interpreting():
        return mla_attention_reference(q, k, v, cu_seqlens, softmax_scale, compute_dtype=torch.float32)
    if cu_seqlens.device != q.device:
        cu_seqlens = cu_seqlens.to(q.device)
    if config is not None:
        config.check()
    return _MLAAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, softmax_scale, config)


__all__ = ["mla_attention", "MLAConfig", "DEFAULT_CONFIG", "INTERPRET_CONFIG", "split_qk_dim",
           "mla_attention_forward", "mla_attention_backward", "bwd_preprocess", "bwd_dkdv", "bwd_dq",
           "launch_config", "for_segments", "SHORT_SEGMENT_TOKENS", "select_config", "shared_memory_estimate",
           "device_shared_memory_limit", "resolve_max_seqlen", "SharedMemoryLimitError", "CANDIDATES",
           "LAUNCH_FALLBACKS"]
