"""A checkpoint converted by one process loads under expert parallelism (2 gloo processes) and gives the HF
model's logits (TP=2, PP=2 and the reverse direction: tests/integration/test_parallel_layouts.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, make_random_tiny_hf

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("layout_probe.py")


def _convert(hf: Path, out: Path) -> None:
    code = ("from cookbook.config import load_config\nfrom cookbook.convert.pipeline import convert\n"
            "if __name__ == '__main__':\n"
            f"    convert(load_config('tiny'), 'hf_to_mcore', {str(hf)!r}, {str(out)!r}, part=(0, 1), progress=False)\n")
    script = out.parent / "convert_once.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=600)


def test_one_process_checkpoint_loads_under_expert_parallel_2(tmp_path):
    hf = make_random_tiny_hf(tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    _convert(hf, ckpt)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONPATH=str(Path(__file__).parent.parent))
    procs = [subprocess.Popen([sys.executable, str(PROBE), str(hf), str(ckpt), "1", "2"],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):])["max_abs_diff"] < 1e-5
