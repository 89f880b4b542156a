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


NO_TE_WORKAROUNDS: dict[str, Callable[[], None]] = {
    "torch_norm_sequence_parallel": _torch_norm_sequence_parallel,
}

WORKAROUNDS: dict[str, Callable[[], None]] = {
    "cpu_current_device": _cpu_current_device,
    "te_flags": _te_flags,
    "router_gemm_name": _router_gemm_name,
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
    for name, fix in chosen.items():
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
