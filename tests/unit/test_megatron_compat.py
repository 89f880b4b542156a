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
    assert compat.te_missing()  # the CPU stack has no Transformer Engine: the no-TE workarounds apply too
    assert set(applied) == set(compat.WORKAROUNDS) | set(compat.NO_TE_WORKAROUNDS)
    patched = torch.cuda.current_device
    assert compat.apply_cpu_compat() == applied and torch.cuda.current_device is patched


def _raised_in(excinfo, filename):
    """The error came from that file's code (Megatron's call site), not from the test calling torch itself."""
    return any(filename in str(entry.path) for entry in excinfo.traceback)


def _mla_rotary_embedding(rope_type):
    """The rotary embedding exactly as ``MLASelfAttention.__init__`` builds it (no ``use_cpu_initialization``)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    if rope_type == "rope":  # Moonlight, tiny
        return RotaryEmbedding(64, rotary_percent=1.0, rotary_base=10000)
    return YarnRotaryEmbedding(64, rotary_base=10000, scaling_factor=40.0, original_max_position_embeddings=4096,
                               beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)  # DeepSeek-V3


@pytest.mark.parametrize("rope_type", ["rope", "yarn"])
def test_current_device(monkeypatch, rope_type):
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "current_device", compat.ORIGINALS["torch.cuda.current_device"])
        with pytest.raises((AssertionError, RuntimeError), match="CUDA") as err:
            _mla_rotary_embedding(rope_type)
        assert _raised_in(err, "rotary_pos_embedding.py"), err.traceback

    rope = _mla_rotary_embedding(rope_type)
    emb = rope(16)  # the forward asks for the current device again
    emb = emb[0] if isinstance(emb, tuple) else emb  # YaRN also returns its mscale
    assert emb.device.type == "cpu" and emb.shape[0] == 16 and emb.shape[-1] == 64


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


def _single_process_group():
    """A one-process gloo group: Megatron's checkpointing and schedules ask torch.distributed for ranks."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_cuda_synchronize(tmp_path, monkeypatch):
    """Megatron's torch_dist save (what ``save_unit`` and the trainer's checkpoints call) synchronizes CUDA
    before writing. It has no in-process mode in 0.16: it starts a results-queue manager (once per process)
    and forks one writer per file; about 2-3 s here."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    _single_process_group()
    weights = {"w": torch.randn(3, 5), "b": torch.arange(4.0)}

    def sharded(tensors):
        return {k: ShardedTensor.from_rank_offsets(k, v) for k, v in tensors.items()}

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "synchronize", compat.ORIGINALS["torch.cuda.synchronize"])
        (tmp_path / "unpatched").mkdir()
        with pytest.raises((AssertionError, RuntimeError), match="CUDA") as err:
            dist_checkpointing.save(sharded(weights), str(tmp_path / "unpatched"))
        assert _raised_in(err, "dist_checkpointing"), err.traceback

    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(sharded(weights), str(tmp_path / "ckpt"))
    loaded = dist_checkpointing.load(sharded({k: torch.zeros_like(v) for k, v in weights.items()}),
                                     str(tmp_path / "ckpt"))
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], v) for k, v in weights.items())


def _tiny_transformer_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = dict(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                  use_cpu_initialization=True)
    values.update(overrides)
    return TransformerConfig(**values)


def test_torch_norm_sequence_parallel():
    config = _tiny_transformer_config()
    config.sequence_parallel = True  # set after construction: the config checks need a TP group for it
    fresh = _fresh_copy("megatron.core.transformer.torch_norm")
    with pytest.raises(AssertionError, match="sequence parallel"):
        fresh.WrappedTorchNorm(config, 8, eps=1e-6)
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    norm = WrappedTorchNorm(config, 8, eps=1e-6)
    assert config.sequence_parallel is True  # the caller's config is left as it was
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x), torch.nn.functional.rms_norm(x, (8,), norm.weight, 1e-6))
    config.sequence_parallel = False
    assert WrappedTorchNorm(config, 8).weight.sequence_parallel is False


class _Identity(torch.nn.Module):
    """The least a schedule needs from a model: a config, an input-tensor setter, a model type."""

    def __init__(self):
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.config = _tiny_transformer_config()
        self.model_type = ModelType.encoder_or_decoder
        self.w = torch.nn.Parameter(torch.ones(()))

    def set_input_tensor(self, tensor):
        pass


def _run_schedule(schedule):
    model = _Identity()

    def step(data, model):
        out = model.w * next(data)
        return out, lambda out: (out.sum(), {"value": out.detach()})

    return schedule(forward_step_func=step, data_iterator=iter([torch.tensor(2.0)]), model=model,
                    num_microbatches=1, seq_length=1, micro_batch_size=1), model


def test_schedules_token_counter():
    _single_process_group()  # the schedule asks parallel_state for its groups
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    fresh = _fresh_copy("megatron.core.pipeline_parallel.schedules")
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        _run_schedule(fresh.forward_backward_no_pipelining)
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    store, model = _run_schedule(forward_backward_no_pipelining)
    assert float(store[0]["value"]) == 2.0 and float(model.w.grad) == 2.0
