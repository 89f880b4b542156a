"""Each CPU workaround for Megatron-Core 0.16 is still needed (the upstream code fails without it) and
works. When an upgrade fixes one, its 'needed' test fails: remove the workaround and the test."""
import importlib.util

import pytest
import torch

from cookbook.megatron import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only workarounds")


@pytest.fixture(scope="module", autouse=True)
def applied():
    return compat.apply_cpu_compat()


def _fresh_copy(module_name):
    """A second, unpatched import of a megatron module (the patched one stays in sys.modules)."""
    module = importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(module_name + "_unpatched", module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


def test_guard_and_idempotence(applied):
    assert compat.needed() and compat.AFFECTED[0] <= compat.megatron_version() < compat.AFFECTED[1]
    assert applied == tuple(compat.WORKAROUNDS)
    patched = torch.cuda.current_device
    assert compat.apply_cpu_compat() == applied and torch.cuda.current_device is patched


def test_current_device():
    with pytest.raises((AssertionError, RuntimeError)):
        compat.ORIGINALS["torch.cuda.current_device"]()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(64, rotary_percent=1.0, use_cpu_initialization=False)  # MLA builds it like this
    assert rope.inv_freq.device.type == "cpu"


def test_te_flags():
    fresh = _fresh_copy("megatron.core.transformer.multi_latent_attention")
    assert fresh.HAVE_TE is True  # wrongly: TELinear is Megatron's MagicMock stand-in
    with pytest.raises(TypeError, match="isinstance"):
        isinstance(object(), fresh.TELinear)
    for name in compat.TE_MOCK_IMPORTERS:
        assert importlib.import_module(name).HAVE_TE is False, name


def test_router_gemm_name():
    assert not hasattr(_fresh_copy("megatron.core.transformer.moe.moe_utils"), "te_general_gemm")
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    assert torch.allclose(out, x @ w.t(), atol=1e-6)


def test_rng_tracker():
    with pytest.raises((AssertionError, RuntimeError)):
        compat.ORIGINALS["random.CudaRNGStatesTracker"]().add("x", 1)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draw():
        model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
        with get_cuda_rng_tracker().fork():
            return torch.rand(3)

    before = torch.get_rng_state()
    assert torch.equal(draw(), draw())
    assert torch.equal(torch.get_rng_state(), before)  # forking leaves the default generator alone


def test_cuda_synchronize():
    with pytest.raises((AssertionError, RuntimeError)):
        compat.ORIGINALS["torch.cuda.synchronize"]()
    assert torch.cuda.synchronize() is None
