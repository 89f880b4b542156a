#!/bin/bash
# Add what papermill needs to run notebooks on the offline GPU machine to a bundle made by
# ../shared/tools/offline-gpu-bundle.sh (its image has matplotlib, pandas, pyyaml, tqdm, requests, but no
# papermill, ipykernel or jupyter_client). The wheels go into an existing bundle folder with room (each call
# carries at most 64 MiB; these are about 14 MiB); offline-gpu-install.sh installs every wheel it finds.
# Then, on the GPU machine: python3 -m ipykernel install --user --name grpo-cookbook
# Usage: env/gpu-bundle-notebooks.sh BUNDLE_FOLDER   (e.g. gpu-bundle/bundle-5)
set -euo pipefail
dest=${1:?a bundle folder, e.g. gpu-bundle/bundle-5}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q -d "$tmp" --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  papermill ipykernel nbclient nbformat
# only what the image lacks: shadowing its own packaging, pyyaml, requests, ... would change other libraries
for name in papermill ipykernel ipython- ipython_pygments jedi parso pexpect ptyprocess prompt_toolkit wcwidth \
            stack_data executing asttokens pure_eval matplotlib_inline comm debugpy jupyter_client jupyter_core \
            nbclient nbformat fastjsonschema tornado traitlets nest_asyncio2 entrypoints tenacity platformdirs; do
  cp "$tmp"/"$name"*.whl "$dest"/
done
du -sh "$dest"
