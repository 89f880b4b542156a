"""The one Hugging Face <-> Megatron-Core name table for the DeepSeek-V3 architecture (MLA + MoE).

Checkpoint conversion (both ways) and the trainer -> vLLM weight sync both read this table, so the
two can never disagree. Verified 1:1 with no transposes (shared/reference/platform-facts.md); the only
reshaping is the fused MLP input: Megatron's ``linear_fc1`` is ``cat([gate_proj, up_proj], dim=0)``.

``{l}`` is the decoder layer, ``{e}`` a routed expert. A rule with two HF names is a fused pair.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from cookbook.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # one name, or (gate, up) for a fused fc1
    mcore: str
    where: str  # "top" | "attn" | "q_lora" | "no_q_lora" | "dense" | "moe" | "expert"


_L, _A = "model.layers.{l}.", "decoder.layers.{l}."
RULES: tuple[Rule, ...] = (
    Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "top"),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight", "top"),
    Rule(("lm_head.weight",), "output_layer.weight", "top"),
    Rule((_L + "input_layernorm.weight",), _A + "input_layernorm.weight", "attn"),
    Rule((_L + "post_attention_layernorm.weight",), _A + "pre_mlp_layernorm.weight", "attn"),
    Rule((_L + "self_attn.q_proj.weight",), _A + "self_attention.linear_q_proj.weight", "no_q_lora"),
    Rule((_L + "self_attn.q_a_proj.weight",), _A + "self_attention.linear_q_down_proj.weight", "q_lora"),
    Rule((_L + "self_attn.q_a_layernorm.weight",), _A + "self_attention.q_layernorm.weight", "q_lora"),
    Rule((_L + "self_attn.q_b_proj.weight",), _A + "self_attention.linear_q_up_proj.weight", "q_lora"),
    Rule((_L + "self_attn.kv_a_proj_with_mqa.weight",), _A + "self_attention.linear_kv_down_proj.weight", "attn"),
    Rule((_L + "self_attn.kv_a_layernorm.weight",), _A + "self_attention.kv_layernorm.weight", "attn"),
    Rule((_L + "self_attn.kv_b_proj.weight",), _A + "self_attention.linear_kv_up_proj.weight", "attn"),
    Rule((_L + "self_attn.o_proj.weight",), _A + "self_attention.linear_proj.weight", "attn"),
    Rule((_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), _A + "mlp.linear_fc1.weight", "dense"),
    Rule((_L + "mlp.down_proj.weight",), _A + "mlp.linear_fc2.weight", "dense"),
    Rule((_L + "mlp.gate.weight",), _A + "mlp.router.weight", "moe"),
    Rule((_L + "mlp.gate.e_score_correction_bias",), _A + "mlp.router.expert_bias", "moe"),
    Rule((_L + "mlp.shared_experts.gate_proj.weight", _L + "mlp.shared_experts.up_proj.weight"),
         _A + "mlp.shared_experts.linear_fc1.weight", "moe"),
    Rule((_L + "mlp.shared_experts.down_proj.weight",), _A + "mlp.shared_experts.linear_fc2.weight", "moe"),
    Rule((_L + "mlp.experts.{e}.gate_proj.weight", _L + "mlp.experts.{e}.up_proj.weight"),
         _A + "mlp.experts.local_experts.{e}.linear_fc1.weight", "expert"),
    Rule((_L + "mlp.experts.{e}.down_proj.weight",), _A + "mlp.experts.local_experts.{e}.linear_fc2.weight", "expert"),
)

# Kept in float32 whatever the model dtype (Megatron keeps expert_bias in fp32; so do the HF checkpoints).
FP32_MCORE_SUFFIXES = ("mlp.router.expert_bias",)


@dataclass(frozen=True)
class Mapping:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    hf: tuple[str, ...]
    mcore: str
    layer: Optional[int]  # None for embeddings / final norm / output layer
    expert: Optional[int] = None

    @property
    def fused(self) -> bool:
        return len(self.hf) > 1


def _layer_is_moe(m: ModelConfig, layer: int) -> bool:
    return layer >= m.first_k_dense_replace


def _rule_applies(rule: Rule, m: ModelConfig, layer: int) -> bool:
    return {
        "attn": True,
        "q_lora": bool(m.q_lora_rank),
        "no_q_lora": not m.q_lora_rank,
        "dense": not _layer_is_moe(m, layer),
        "moe": _layer_is_moe(m, layer),
        "expert": _layer_is_moe(m, layer),
    }[rule.where]


def layer_mappings(m: ModelConfig, layer: int) -> list[Mapping]:
    """Every tensor of one decoder layer, in a stable order (attention, MLP, experts by index)."""
    out = []
    for rule in RULES:
        if rule.where == "top" or not _rule_applies(rule, m, layer):
            continue
        experts = range(m.num_experts) if rule.where == "expert" else (None,)
        for e in experts:
            out.append(Mapping(tuple(h.format(l=layer, e=e) for h in rule.hf), rule.mcore.format(l=layer, e=e),
                               layer, e))
    return out


def top_mappings(m: ModelConfig) -> tuple[list[Mapping], list[Mapping]]:
    """(before the layers: embeddings; after the layers: final norm, output layer unless tied)."""
    first = [Mapping(RULES[0].hf, RULES[0].mcore, None)]
    last = [Mapping(RULES[1].hf, RULES[1].mcore, None)]
    if not m.tie_word_embeddings:
        last.append(Mapping(RULES[2].hf, RULES[2].mcore, None))
    return first, last


def all_mappings(m: ModelConfig, layers: Optional[range] = None) -> list[Mapping]:
    """The full table for an architecture; with ``layers``, only that layer range (plus embeddings when it
    starts at 0 and the final norm / output layer when it reaches the last layer)."""
    layers = range(m.num_layers) if layers is None else layers
    first, last = top_mappings(m)
    out = first if layers.start == 0 else []
    for layer in layers:
        out += layer_mappings(m, layer)
    if layers.stop >= m.num_layers:
        out += last
    return out


def hf_shape(m: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape an HF DeepSeek-V3 tensor must have under this architecture (for clear shape errors)."""
    h, heads = m.hidden_size, m.num_attention_heads
    q_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    shapes = {
        "embed_tokens.weight": (m.vocab_size, h), "lm_head.weight": (m.vocab_size, h), "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (heads * q_head, h), "q_a_proj.weight": (m.q_lora_rank or 0, h),
        "q_a_layernorm.weight": (m.q_lora_rank or 0,), "q_b_proj.weight": (heads * q_head, m.q_lora_rank or 0),
        "kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
        "kv_a_layernorm.weight": (m.kv_lora_rank,),
        "kv_b_proj.weight": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        "o_proj.weight": (h, heads * m.v_head_dim),
        "mlp.gate.weight": (m.num_experts, h), "e_score_correction_bias": (m.num_experts,),
    }
    for suffix, shape in shapes.items():
        if name.endswith(suffix):
            return shape
    if ".mlp.experts." in name:
        ffn = m.moe_ffn_hidden_size
    elif ".mlp.shared_experts." in name:
        ffn = m.moe_ffn_hidden_size * m.num_shared_experts
    else:
        ffn = m.ffn_hidden_size
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return (ffn, h)
    if name.endswith("down_proj.weight"):
        return (h, ffn)
    raise KeyError(f"no shape rule for HF tensor '{name}'")


def to_hf_tensors(mapping: Mapping, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The inverse: split a fused fc1 back into gate and up (views, no copy)."""
    if not mapping.fused:
        return [(mapping.hf[0], tensor)]
    gate, up = tensor.chunk(2, dim=0)
    return [(mapping.hf[0], gate), (mapping.hf[1], up)]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern + "$")


_MCORE_PATTERNS = [(_template_regex(rule.mcore), rule) for rule in RULES]


def mapping_for_mcore_name(name: str) -> Mapping:
    """The mapping of one Megatron parameter/buffer name (global layer numbers, as in a PP=1 model)."""
    for pattern, rule in _MCORE_PATTERNS:
        match = pattern.match(name)
        if match:
            layer = int(match["l"]) if "l" in match.groupdict() else None
            expert = int(match["e"]) if "e" in match.groupdict() else None
            hf = tuple(h.format(l=layer, e=expert) for h in rule.hf)
            return Mapping(hf, name, layer, expert)
    raise KeyError(f"Megatron tensor '{name}' has no rule in cookbook.convert.names.RULES")


def megatron_to_hf_tensors(state_dict_items) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors from a local, unsharded (TP = PP = EP = 1) Megatron model's named parameters and
    buffers, one at a time (for the per-step weight sync). Megatron-only entries (``_extra_state``,
    router token counters) are skipped; fused fc1 is split into views."""
    for name, tensor in state_dict_items:
        if name.endswith("_extra_state") or name.endswith("local_tokens_per_expert"):
            continue
        name = name.removeprefix("module.")
        yield from to_hf_tensors(mapping_for_mcore_name(name), tensor)


def mapping_table(m: ModelConfig, layers: Optional[Sequence[int]] = None, max_experts: int = 2) -> list[dict]:
    """Rows ``{hf, megatron, layer}`` for display; routed experts beyond ``max_experts`` are summarized."""
    rows = []
    chosen = layers if layers is not None else sorted({0, min(m.first_k_dense_replace, m.num_layers - 1)})
    for mp in all_mappings(m):
        if mp.layer is not None and mp.layer not in chosen:
            continue
        if mp.expert is not None and mp.expert >= max_experts:
            if mp.expert == max_experts and mp.hf[0].endswith("gate_proj.weight"):
                rows.append({"hf": f"... experts {max_experts}..{m.num_experts - 1}", "megatron": "...",
                             "layer": mp.layer})
            continue
        rows.append({"hf": " + ".join(mp.hf), "megatron": mp.mcore, "layer": mp.layer})
    return rows
