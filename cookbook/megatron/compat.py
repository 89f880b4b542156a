"""Every workaround Megatron-Core 0.16.x needs on a CPU without Transformer Engine, in one place.

Megatron-Core is written for CUDA + Transformer Engine; its local (non-TE) layers run on CPU once a few
CUDA assumptions are bridged (shared/reference/platform-facts.md lists what was found). Each workaround
below is a small named function, applies only to the megatron-core versions in ``AFFECTED`` and only when
CUDA is absent, and has a test in tests/unit/test_megatron_compat.py that calls the unpatched upstream
code to show the problem is still there. When a new megatron-core fixes one, its test fails and the
workaround (and its test) can go.

``apply_cpu_compat()`` applies them all; calling it again does nothing.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import torch
from packaging.version import Version

AFFECTED = (Version("0.16.0"), Version("0.17.0"))  # [low, high): the versions these workarounds were made for

_applied: list[str] = []
ORIGINALS: dict[str, object] = {}  # the upstream objects a workaround replaced (tests call them)


def megatron_version() -> Version:
    from megatron.core.package_info import __version__

    return Version(__version__)


def needed() -> bool:
    """True on a CPU-only process with an affected megatron-core."""
    low, high = AFFECTED
    return not torch.cuda.is_available() and low <= megatron_version() < high


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


WORKAROUNDS: dict[str, Callable[[], None]] = {
    "cpu_current_device": _cpu_current_device,
    "te_flags": _te_flags,
    "router_gemm_name": _router_gemm_name,
    "cpu_rng_tracker": _cpu_rng_tracker,
    "cuda_synchronize": _cuda_synchronize,
}


def apply_cpu_compat() -> tuple[str, ...]:
    """Apply every workaround once (a no-op with CUDA or an unaffected megatron-core); returns their names."""
    if not needed():
        return applied()
    for name, fix in WORKAROUNDS.items():
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
