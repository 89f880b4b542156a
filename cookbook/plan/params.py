"""Parameters of the MLA + MoE model, counted from the architecture, and each trainer rank's share of them.

The count walks the one HF <-> Megatron name table (``cookbook.convert.names``): every tensor the checkpoint
has, with the shape ``hf_shape`` gives it, so the planner counts exactly what conversion loads. Each Megatron
tensor is then split the way ``cookbook.megatron.model.build_model`` builds it (Megatron-Core's local layer spec):

- TP-sharded (``parallel.tensor``): the word embedding and output layer (vocabulary rows), every attention
  projection (q / q_down / q_up / kv_down / kv_up, ColumnParallel; linear_proj, RowParallel), the dense MLP and
  the shared experts;
- replicated on every TP rank: the RMSNorm weights and the router;
- routed experts: ``num_experts / parallel.expert`` whole experts per rank, each split over
  ``parallel.expert_tensor``;
- the router's ``expert_bias`` is a buffer (fp32, not trained), like its token counter.

Pipeline stages hold their decoder layers (``config.pipeline_stage_layers``: ``first/last_pipeline_stage_layers``
where set, the rest even), the first stage the embedding, the last the final norm and the output layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from cookbook.config import ConfigError, CookbookConfig, ModelConfig, pipeline_stage_layers

# Megatron tensor-name endings and how each is split; anything else in the name table is TP-sharded.
REPLICATED = ("layernorm.weight", "mlp.router.weight")
BUFFERS = ("mlp.router.expert_bias",)  # fp32 buffers from the checkpoint (not trained)


@dataclass(frozen=True)
class Shard:
    """How the model's tensors are split over one rank: tensor, expert and expert-tensor parallel sizes."""

    tensor: int = 1
    expert: int = 1
    expert_tensor: int = 1


@dataclass
class Counts:
    """Elements by part of the model (trained parameters), plus fp32 buffers."""

    parts: dict[str, int] = field(default_factory=dict)
    buffers: int = 0

    @property
    def params(self) -> int:
        return sum(self.parts.values())

    def add(self, other: "Counts", times: int = 1) -> "Counts":
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0) + v * times
        self.buffers += other.buffers * times
        return self


def part_of(mcore: str) -> str:
    """The part of the model a Megatron tensor belongs to (the rows of the planner's parameter table)."""
    if ".mlp.experts." in mcore:
        return "routed experts"
    if ".shared_experts." in mcore:
        return "shared experts"
    if ".mlp.router." in mcore:
        return "router"
    if ".mlp." in mcore:
        return "dense MLP"
    if ".layers." in mcore:
        return "attention and norms"
    return "embedding" if mcore.startswith("embedding") else "output layer and final norm"


def _numel(m: ModelConfig, hf_names: tuple[str, ...]) -> tuple[int, int]:
    """(elements, the dimension TP / ETP splits) of one Megatron tensor made of these HF tensors."""
    from cookbook.convert.names import hf_shape

    shapes = [hf_shape(m, h) for h in hf_names]
    numel = sum(_prod(s) for s in shapes)
    # a ColumnParallel weight is split along its output rows, a RowParallel one along its input columns
    row_parallel = hf_names[0].endswith(("o_proj.weight", "down_proj.weight"))
    return numel, shapes[0][1 if row_parallel else 0]


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _tensors_of(m: ModelConfig, layer: int | None):
    """The name-table mappings of one decoder layer, or (``layer=None``) of the embedding and the head."""
    from cookbook.convert.names import layer_mappings, top_mappings

    if layer is None:
        first, last = top_mappings(m)
        return first + last
    return layer_mappings(m, layer)


def shard_counts(m: ModelConfig, layer: int | None, shard: Shard, top: str = "both") -> Counts:
    """One rank's elements of one decoder layer (``layer``) or of the top tensors (``layer=None``; ``top`` =
    "first" for the embedding, "last" for the final norm and output layer, "both" for PP = 1). Raises
    ConfigError when a split dimension does not divide (Megatron would fail while building the model)."""
    out = Counts()
    experts_here = m.num_experts // shard.expert
    for mp in _tensors_of(m, layer):
        if layer is None and top != "both" and (mp.mcore.startswith("embedding") != (top == "first")):
            continue
        numel, dim = _numel(m, mp.hf)
        if mp.mcore.endswith(BUFFERS):
            out.buffers += numel
            continue
        if mp.expert is not None:
            if mp.expert >= experts_here:  # another EP rank's expert
                continue
            numel //= _split(dim, shard.expert_tensor, "parallel.expert_tensor", mp.hf[0])
        elif not mp.mcore.endswith(REPLICATED):
            numel //= _split(dim, shard.tensor, "parallel.tensor", mp.hf[0])
        part = part_of(mp.mcore)
        out.parts[part] = out.parts.get(part, 0) + numel
    return out


def _split(dim: int, ways: int, key: str, tensor: str) -> int:
    if dim % ways:
        raise ConfigError(f"{key}={ways} does not divide {tensor}'s split dimension ({dim}): Megatron-Core cannot "
                          f"shard it; use a {key} that divides {dim}")
    return ways


@functools.lru_cache(maxsize=4096)
def _layer_counts(m_key: tuple, dense: bool, shard: Shard) -> Counts:
    m = ModelConfig(**dict(m_key))
    return shard_counts(m, 0 if dense else m.first_k_dense_replace, shard)


@functools.lru_cache(maxsize=4096)
def _top_counts(m_key: tuple, top: str, shard: Shard) -> Counts:
    return shard_counts(ModelConfig(**dict(m_key)), None, shard, top)


def model_key(m: ModelConfig) -> tuple:
    """A hashable form of the architecture (for the caches: the layout search asks the same questions often)."""
    return tuple(sorted((k, v) for k, v in vars(m).items() if k not in ("hf_dir", "mcore_dir")))


def stage_layers(cfg: CookbookConfig) -> list[tuple[int, int]]:
    """(dense layers, MoE layers) on each pipeline stage, as Megatron-Core builds them from the config."""
    m, p = cfg.model, cfg.parallel
    try:
        sizes = pipeline_stage_layers(m.num_layers, p.pipeline, p.first_pipeline_stage_layers,
                                      p.last_pipeline_stage_layers)
    except ValueError as e:
        raise ConfigError(f"parallel.pipeline={p.pipeline} for model.num_layers={m.num_layers}: {e}") from None
    out, start = [], 0
    for n in sizes:
        dense = max(0, min(start + n, m.first_k_dense_replace) - start)
        out.append((dense, n - dense))
        start += n
    return out


def stage_counts(cfg: CookbookConfig, stage: int) -> Counts:
    """One trainer rank's parameter elements on pipeline stage ``stage`` (every rank of a stage holds the same
    amount: TP and expert shards are equal)."""
    p = cfg.parallel
    shard = Shard(p.tensor, p.expert, p.expert_tensor)
    key = model_key(cfg.model)
    stages = stage_layers(cfg)
    dense, moe = stages[stage]
    out = Counts()
    if dense:
        out.add(_layer_counts(key, True, shard), dense)
    if moe:
        out.add(_layer_counts(key, False, shard), moe)
    last = stage == len(stages) - 1
    if stage == 0 and last:
        out.add(_top_counts(key, "both", shard))
    elif stage == 0:
        out.add(_top_counts(key, "first", shard))
    elif last:
        out.add(_top_counts(key, "last", shard))
        if cfg.model.tie_word_embeddings:  # Megatron keeps a copy of the shared embedding on the last stage
            out.add(_top_counts(key, "first", shard))
    return out


def total_counts(m: ModelConfig) -> Counts:
    """The whole model, unsharded (what one process with TP = PP = EP = 1 holds)."""
    key, one = model_key(m), Shard()
    out = Counts().add(_top_counts(key, "both", one))
    if m.first_k_dense_replace:
        out.add(_layer_counts(key, True, one), m.first_k_dense_replace)
    return out.add(_layer_counts(key, False, one), m.num_layers - m.first_k_dense_replace)


def largest_tensor(cfg: CookbookConfig, stage: int) -> int:
    """Elements of the largest parameter on a rank of this stage (the gradient-norm pass copies one gradient
    at a time to fp64: its transient is this tensor's size)."""
    m, p = cfg.model, cfg.parallel
    stages = stage_layers(cfg)
    sizes = []
    if stage == 0 or stage == len(stages) - 1:
        sizes.append(m.vocab_size * m.hidden_size // p.tensor)
    dense, moe = stages[stage]
    if dense:
        sizes.append(2 * m.ffn_hidden_size * m.hidden_size // p.tensor)
    if moe:
        sizes.append(m.num_experts * m.hidden_size)
        sizes.append(2 * m.moe_ffn_hidden_size * m.hidden_size // p.expert_tensor)
        sizes.append(2 * m.moe_ffn_hidden_size * m.num_shared_experts * m.hidden_size // p.tensor)
    heads = m.num_attention_heads // p.tensor
    sizes.append(heads * (m.qk_nope_head_dim + m.qk_rope_head_dim) * (m.q_lora_rank or m.hidden_size))
    return max(sizes)


# vLLM's DeepSeek-V2/V3 model keeps these whole on every TP rank (the latent down-projections are ReplicatedLinear)
_ROLLOUT_REPLICATED = ("layernorm.weight", "model.norm.weight", "q_a_proj.weight", "kv_a_proj_with_mqa.weight",
                       "mlp.gate.weight")


def _rollout_bytes(m: ModelConfig, layer: int | None, rollout_tensor: int, dtype_bytes: int) -> int:
    from cookbook.convert.names import hf_shape

    total = 0
    for mp in _tensors_of(m, layer):
        for hf in mp.hf:
            numel = _prod(hf_shape(m, hf))
            if hf.endswith("e_score_correction_bias"):
                total += numel * 4
            elif hf.endswith(_ROLLOUT_REPLICATED):
                total += numel * dtype_bytes
            else:
                total += numel * dtype_bytes // rollout_tensor
    return total


def rollout_weight_bytes(m: ModelConfig, rollout_tensor: int, dtype_bytes: int = 2) -> int:
    """One vLLM rank's weights at rollout tensor parallelism: vLLM replicates the latent down-projections (q_a,
    kv_a), the norms and the router and splits everything else over its TP ranks (routed experts along their FFN
    dimension: no expert parallelism); the router bias stays fp32."""
    return _rollout_weight_bytes(model_key(m), rollout_tensor, dtype_bytes)


@functools.lru_cache(maxsize=256)
def _rollout_weight_bytes(m_key: tuple, rollout_tensor: int, dtype_bytes: int) -> int:
    m = ModelConfig(**dict(m_key))
    dense = m.first_k_dense_replace
    out = _rollout_bytes(m, None, rollout_tensor, dtype_bytes)
    if dense:
        out += dense * _rollout_bytes(m, 0, rollout_tensor, dtype_bytes)
    return out + (m.num_layers - dense) * _rollout_bytes(m, dense, rollout_tensor, dtype_bytes)
