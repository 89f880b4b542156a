"""How one conversion unit is put together: the Megatron chunks get the HF tensors directly, and units are read one
ahead of the writes."""
import threading
import time

import pytest
import torch

from cookbook.config import load_config
from cookbook.convert.hf_to_mcore import read_ahead
from cookbook.convert.mcore_ckpt import meta_sharded_state_dict, with_data


@pytest.fixture(scope="module")
def meta_entries():
    return meta_sharded_state_dict(load_config("tiny"))


def test_fused_fc1_gets_gate_and_up_as_its_halves_without_a_copy(meta_entries):
    entry = meta_entries["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"]
    gate, up = torch.randn(96, 192), torch.randn(96, 192)
    first, second = with_data(entry, [gate, up])
    assert first.key == second.key == "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    assert tuple(first.global_offset) == (3, 0, 0) and tuple(second.global_offset) == (3, 96, 0)
    assert first.data.data_ptr() == gate.data_ptr() and second.data.data_ptr() == up.data_ptr()


def test_plain_weight_is_cast_to_the_entry_dtype(meta_entries):
    entry = meta_entries["decoder.final_layernorm.weight"]
    (chunk,) = with_data(entry, [torch.ones(entry.local_shape, dtype=torch.float64)])
    assert chunk.data.dtype == entry.data.dtype and torch.equal(chunk.data, torch.ones_like(chunk.data))


def test_wrong_shape_or_count_names_the_tensor(meta_entries):
    entry = meta_entries["decoder.layers.0.mlp.linear_fc1.weight"]
    with pytest.raises(RuntimeError, match=r"linear_fc1.weight' at \(384, 0\): HF tensor of shape \(5, 192\)"):
        with_data(entry, [torch.zeros(384, 192), torch.zeros(5, 192)])
    with pytest.raises(RuntimeError, match="2 chunk\\(s\\), the rule gives 1"):
        with_data(entry, [torch.zeros(768, 192)])


def test_read_ahead_loads_the_next_item_while_the_caller_works():
    loading = []

    def load(i):
        loading.append((i, threading.current_thread().name))
        time.sleep(0.05)
        return i

    seen = []
    for item in read_ahead([0, 1, 2, 3], load):
        time.sleep(0.1)  # the caller's write: the next load finishes meanwhile
        seen.append((item, [i for i, _ in loading]))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == [0, 1] and seen[2][1] == [0, 1, 2, 3]  # one ahead, never more
    assert all(name.startswith("read-ahead") for _, name in loading)
    assert list(read_ahead([], load)) == []


@pytest.mark.parametrize("refused", [False, True])
def test_tensors_read_into_a_reused_buffer_equal_the_file(tmp_path, monkeypatch, refused):
    import errno
    import os

    from safetensors.torch import save_file

    from cookbook.convert import hf_io
    from cookbook.convert.hf_io import ReadBuffer, ShardReader

    opened, real_open = [], os.open

    def open_(path, flags, *args):  # refused: a file system that refuses O_DIRECT (some network and FUSE ones)
        opened.append(bool(flags & os.O_DIRECT))
        if refused and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(hf_io.os, "open", open_)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(1000, 7).bfloat16(), "c": torch.arange(9, dtype=torch.int8),
               "d": torch.randn(2, 4096).half()}  # odd sizes: offsets off the page boundaries
    save_file(tensors, tmp_path / "model.safetensors")
    reader = ShardReader(tmp_path)
    buffer = ReadBuffer(ReadBuffer.bytes_for(reader.nbytes(n) for n in tensors))
    for _ in range(2):  # the second round reuses the memory of the first
        buffer.clear()
        got = {n: reader.get(n, into=buffer) for n in tensors}
        for n, t in tensors.items():
            assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
            assert got[n].untyped_storage().nbytes() == t.nbytes  # Megatron's writer would clone a view
    assert opened[0] and opened[1:2] == ([False] if refused else [True])
    with pytest.raises(MemoryError, match="cannot take"):
        reader.get("b", into=ReadBuffer(4096))
