"""Every workaround Megatron-Core 0.16.x needs on a CPU without Transformer Engine, in one place.

Megatron-Core is written for CUDA + Transformer Engine; its local (non-TE) layers run on CPU once a few
CUDA assumptions are bridged (shared/reference/platform-facts.md lists what was found). Each workaround
below is a small named function, applies only to the megatron-core versions in ``AFFECTED`` and only when
CUDA is absent (``WORKAROUNDS``) or, for the ones in ``NO_TE_WORKAROUNDS``, whenever Transformer Engine is
absent (CPU, and GPU machines without TE), and has a test in tests/unit/test_megatron_compat.py that calls
the unpatched upstream code to show the problem is still there. When a new megatron-core fixes one, its
test fails and the workaround (and its test) can go.

``apply_cpu_compat()`` applies them all; calling it again does nothing.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import types
from typing import Callable

import torch
from packaging.version import Version

AFFECTED = (Version("0.16.0"), Version("0.17.0"))  # [low, high): the versions these workarounds were made for

_applied: list[str] = []
ORIGINALS: dict[str, object] = {}  # the upstream objects a workaround replaced (tests call them)


def megatron_version() -> Version:
    from megatron.core.package_info import __version__

    return Version(__version__)


def affected_version() -> bool:
    low, high = AFFECTED
    return low <= megatron_version() < high


def needed() -> bool:
    """True on a CPU-only process with an affected megatron-core."""
    return not torch.cuda.is_available() and affected_version()


def te_missing() -> bool:
    """True when Transformer Engine cannot be imported (the local layer spec and torch norms are used)."""
    return importlib.util.find_spec("transformer_engine") is None


def applied() -> tuple[str, ...]:
    return tuple(_applied)


# ---------------------------------------------------------------------------------------------
# The workarounds. Each returns nothing and may assume ``needed()``.

def _cpu_current_device() -> None:
    """``torch.cuda.current_device()`` is called unconditionally (MLA's rotary embedding ignores
    ``use_cpu_initialization``; router buffers; DDP): answer with the CPU device instead of raising."""
    ORIGINALS["torch.cuda.current_device"] = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")


# Modules that import Transformer Engine names from ``megatron.core.extensions.transformer_engine``
# without importing ``transformer_engine`` itself first: that import succeeds without TE (the extension
# module falls back to a MagicMock), so they set HAVE_TE = True. (Found by checking every module's flag.)
TE_MOCK_IMPORTERS = ("megatron.core.transformer.multi_latent_attention",)


def _te_flags() -> None:
    """Without TE, modules that imported TE names through Megatron's mock believe TE is present and later
    call ``isinstance(x, <MagicMock>)`` ("isinstance() arg 2 must be a type"): tell them the truth."""
    for name in TE_MOCK_IMPORTERS:
        module = importlib.import_module(name)
        if getattr(module, "HAVE_TE", False):
            module.HAVE_TE = False


def _router_gemm_name() -> None:
    """``moe_utils`` only defines ``te_general_gemm`` when TE imports, yet the router's gating function
    reads it unconditionally (NameError): define it as None so the torch matmul path is taken."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _cpu_rng_tracker() -> None:
    """Megatron's "CUDA" RNG tracker (``model_parallel_cuda_manual_seed``, forks for init, dropout and
    activation recompute) reads and writes CUDA generator states: keep its named states on the CPU
    generator instead."""
    from megatron.core.tensor_parallel import random as mrandom

    ORIGINALS["random._get_cuda_rng_state"] = mrandom._get_cuda_rng_state
    ORIGINALS["random.CudaRNGStatesTracker"] = mrandom.CudaRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom.CudaRNGStatesTracker = _cpu_tracker_class()
    mrandom.initialize_rng_tracker(force_reset=True)


def _cuda_synchronize() -> None:
    """Checkpoint saving (``dist_checkpointing``, torch_dist) calls ``torch.cuda.synchronize()``; on a CPU
    there is nothing to wait for."""
    ORIGINALS["torch.cuda.synchronize"] = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: None


class _TorchWithCPUZeros(types.ModuleType):
    """``torch`` as the pipeline schedules see it: the same module, except that ``zeros`` asked for on
    "cuda" is made on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _schedules_token_counter() -> None:
    """Every pipeline schedule (``forward_backward_no_pipelining`` and both pipelined ones) counts tokens in
    ``torch.zeros([], device="cuda")``: give the schedules module a ``torch`` whose ``zeros`` makes that
    tensor on the CPU (nothing else in it changes)."""
    from megatron.core.pipeline_parallel import schedules

    ORIGINALS["schedules.torch"] = schedules.torch
    schedules.torch = _TorchWithCPUZeros("torch")


def _torch_norm_sequence_parallel() -> None:
    """Without TE, every norm of the local layer spec is ``WrappedTorchNorm``, which asserts
    ``not config.sequence_parallel`` although a norm is per token and computes the same on a sequence shard.
    What sequence parallelism does need is the TP all-reduce of the norm's weight gradient (each rank saw
    only its shard of tokens): Megatron's own norms ask for it by marking the weight ``sequence_parallel``,
    so build the torch norm with the flag off and mark its parameters the same way."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = WrappedTorchNorm.__new__
    ORIGINALS["WrappedTorchNorm.__new__"] = original

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = __new__


class _SumTrailingGradOverTP(torch.autograd.Function):
    """Identity forward; the backward sums the last ``n`` columns of the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x, n, group):
        ctx.n, ctx.group = n, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tail = grad[..., -ctx.n:].contiguous()
        torch.distributed.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.n:] = tail
        return grad, None, None


_mla_kv_gather: list[tuple[int, int, object]] = []  # (kv width, rope width, TP group) of the MLA layer running


def _mla_rope_key_grad() -> None:
    """MLA's shared rope key ``k_pos_emb`` gets a wrong gradient under TP with the local spec.

    There ``linear_kv_down_proj`` is a ``ColumnParallelLinear``: its output is gathered over TP
    (``gather_from_tensor_model_parallel_region``, whose backward only keeps this rank's columns) and split
    into the latent and ``k_pos_emb``. ``k_pos_emb`` is then broadcast to this rank's attention heads only,
    so each rank's gradient for it is a partial sum over its heads, and the backward keeps the partial
    sum: the rope rows of ``linear_kv_down_proj`` (and everything below) get gradients off by the other
    ranks' heads (the TE spec's duplicated linear takes another branch that reduces them). Sum the rope
    columns of that gradient over TP before the gather's backward, during MLA's q/k/v computation only."""
    from megatron.core.transformer import multi_latent_attention as mla

    gather = mla.gather_from_tensor_model_parallel_region
    original = mla.MLASelfAttention.get_query_key_value_tensors
    ORIGINALS["mla.gather_from_tensor_model_parallel_region"] = gather
    ORIGINALS["mla.MLASelfAttention.get_query_key_value_tensors"] = original

    def gather_summing_rope_grad(input_, group=None):
        out = gather(input_, group)
        if _mla_kv_gather and out.shape[-1] == _mla_kv_gather[-1][0]:
            _, rope, tp_group = _mla_kv_gather[-1]
            out = _SumTrailingGradOverTP.apply(out, rope, tp_group)
        return out

    def get_query_key_value_tensors(self, *args, **kwargs):
        c = self.config
        width = c.kv_lora_rank + c.qk_pos_emb_head_dim
        if self.tp_group is None or self.tp_group.size() == 1:
            return original(self, *args, **kwargs)
        if c.q_lora_rank == width:
            raise NotImplementedError(f"q_lora_rank == kv_lora_rank + qk_pos_emb_head_dim = {width}: the MLA "
                                      "rope-gradient workaround cannot tell the two gathers apart")
        _mla_kv_gather.append((width, c.qk_pos_emb_head_dim, self.tp_group))
        try:
            return original(self, *args, **kwargs)
        finally:
            _mla_kv_gather.pop()

    mla.gather_from_tensor_model_parallel_region = gather_summing_rope_grad
    mla.MLASelfAttention.get_query_key_value_tensors = get_query_key_value_tensors


NO_TE_WORKAROUNDS: dict[str, Callable[[], None]] = {
    "te_flags": _te_flags,
    "router_gemm_name": _router_gemm_name,
    "torch_norm_sequence_parallel": _torch_norm_sequence_parallel,
    "mla_rope_key_grad": _mla_rope_key_grad,
}

# Names of workarounds to leave out (comma-separated), only for the tests that show one is still needed.
SKIP_ENV = "COOKBOOK_MCORE_COMPAT_SKIP"

WORKAROUNDS: dict[str, Callable[[], None]] = {
    "cpu_current_device": _cpu_current_device,
    "cpu_rng_tracker": _cpu_rng_tracker,
    "cuda_synchronize": _cuda_synchronize,
    "schedules_token_counter": _schedules_token_counter,
}


def apply_cpu_compat() -> tuple[str, ...]:
    """Apply every workaround that this process needs, once (none with an unaffected megatron-core; the
    no-TE ones also with CUDA); returns the names applied so far."""
    if not affected_version():
        return applied()
    chosen = dict(NO_TE_WORKAROUNDS) if te_missing() else {}
    if needed():
        chosen.update(WORKAROUNDS)
    skip = set(filter(None, os.environ.get(SKIP_ENV, "").split(",")))
    for name, fix in chosen.items():
        if name in skip:
            continue
        if name not in _applied:
            fix()
            _applied.append(name)
    return applied()


def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class _CPURNGStatesTracker(CudaRNGStatesTracker):
        """Named RNG states kept as CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return _CPURNGStatesTracker
