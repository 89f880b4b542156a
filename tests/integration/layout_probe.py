"""Run as N gloo processes: load a converted checkpoint under another parallel layout and print rank 0's
max |logit difference| against the HF model (the 1-process conversion is the reference)."""
import json
import os
import sys

import torch
import torch.distributed as dist


def main(hf_dir: str, ckpt: str, tensor: int, expert: int) -> None:
    import transformers

    from cookbook.config import load_config
    from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
    from cookbook.megatron.model import build_model, forward_logits, init_parallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    cfg = load_config("tiny")
    cfg.parallel.tensor, cfg.parallel.expert, cfg.parallel.sequence_parallel = tensor, expert, tensor > 1
    init_parallel(cfg, rank=rank, world_size=world)
    model = build_model(cfg)
    load_megatron_checkpoint(model, ckpt)
    model.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = forward_logits(model, ids).float()
    if tensor > 1:  # the output layer is vocab-parallel: gather the vocabulary shards
        parts = [torch.empty_like(logits) for _ in range(tensor)]
        dist.all_gather(parts, logits.contiguous())
        logits = torch.cat(parts, dim=-1)
    if rank == 0:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(ids).logits.float()
        print("RESULT " + json.dumps({"max_abs_diff": float((logits - ref).abs().max())}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
