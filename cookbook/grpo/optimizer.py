"""The trainer's optimizer: torch's AdamW, with fp32 master weights for parameters stored in bf16.

Why master weights: an AdamW update is about ``lr`` in size, and a bf16 weight of magnitude ``w`` cannot move by
less than about ``w / 256``. At the recipes' learning rates (2e-6, 7e-7) almost every update rounds away: ten
steps on N(0, 0.02) bf16 weights changed 3.8% of them at lr 2e-6. Megatron's mixed-precision optimizer keeps an
fp32 copy for this reason; so does this one (``grpo.master_weights``, on by default).

How: each bf16 parameter's optimizer state holds ``master`` (its fp32 copy) beside AdamW's moments (fp32 too). The
step lends the parameter its master copy and an fp32 gradient, runs torch's own AdamW, and writes the result back
rounded to bf16. The state is keyed by the model's own parameters, so checkpoints shard it like them
(``cookbook.grpo.checkpoint``). fp32 parameters take AdamW's ordinary step, bit for bit (in a bf16 model the
norms stay fp32: their ``master`` is their own data, so that every parameter's state has the same keys).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose update of a low-precision parameter happens on an fp32 master copy."""

    @staticmethod
    def state_dtype(param: torch.Tensor) -> torch.dtype:
        """The dtype of this parameter's state tensors (what a checkpoint load allocates)."""
        return torch.float32 if param.is_floating_point() else param.dtype

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        lent = []  # (param, its own data, its own gradient) while it holds the master copy
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.dtype == torch.float32:
                    continue
                state = self.state[p]
                master = state["master"] if "master" in state else p.detach().float()
                lent.append((p, p.data, p.grad))
                grad = p.grad.float()
                p.data = master
                p.grad = grad
        try:
            loss = super().step(closure)
        finally:
            for p, data, grad in lent:
                self.state[p]["master"] = p.data
                data.copy_(p.data)  # round to the parameter's dtype
                p.data, p.grad = data, grad
        if lent:  # every parameter's state has the same keys (checkpoints load them so): fp32 ones are their own
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dtype == torch.float32 and self.state.get(p):
                        self.state[p]["master"] = p.data
        return loss


    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts a loaded state to its parameter's dtype, which would round the fp32 master weights and
        moments of bf16 parameters to bf16: they are put back at full precision."""
        params = {pid: p for saved, group in zip(state_dict["param_groups"], self.param_groups)
                  for pid, p in zip(saved["params"], group["params"])}
        full = {pid: dict(s) for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for pid, state in full.items():
            p = params[pid]
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=self.state_dtype(p))


def make_optimizer(params: Iterable[torch.nn.Parameter], g: Any, master_weights: bool) -> torch.optim.Optimizer:
    """AdamW with the ``GRPOConfig`` ``g``'s settings; ``master_weights``: fp32 copies of bf16 parameters."""
    cls = MasterWeightAdamW if master_weights else torch.optim.AdamW
    return cls(list(params), lr=g.lr, betas=(g.adam_beta1, g.adam_beta2), weight_decay=g.weight_decay)
