"""GRPO: the algorithm (``cookbook.grpo.algorithm``, pure torch) and the loop that drives Megatron-Core and vLLM.

Nothing is imported here, so ``import cookbook.grpo.algorithm`` stays cheap (no Megatron, vLLM or Ray).
"""
