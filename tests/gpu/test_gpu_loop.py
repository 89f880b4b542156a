"""The fused GRPO loss inside the GRPO loop on one GPU: two short runs of the tiny preset, fused off and on, see the
same samples and agree on the loss terms (the fused kernels compile their fp32 variants on the first run)."""
import json

import pytest
import torch

from gpu_common import gpu_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_the_fused_loss_runs_inside_the_loop(tmp_path):
    from cookbook.data.prepare import prepare_data
    from cookbook.grpo.loop import train

    results = {}
    for fused in (False, True):
        cfg = gpu_config(tmp_path / str(fused), f"grpo.use_fused_kernels={str(fused).lower()}", "grpo.steps=2",
                         "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4", "grpo.max_response_length=16",
                         "grpo.eval_every=0", "grpo.save_every=0", "data.num_train=32", "data.num_test=8")
        prepare_data(cfg)
        results[fused] = train(cfg, progress=False).history
    plain, fused = results[False][0], results[True][0]
    print(json.dumps({"plain": plain, "fused": fused}, indent=1))
    assert fused["reward/mean"] == plain["reward/mean"]  # the same samples: nothing before the loss changed
    for key in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/ratio_mean"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-4), key
