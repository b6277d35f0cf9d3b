#!/usr/bin/env bash
# The CUDA paths on a GPU machine, in one go: the CUDA tests (tests/test_cuda.py: HF on the same weights, the
# dequantized weights, plain greedy as oracles), generate.py --device cuda --compile from the command line, and
# bench.py --device cuda on random models of SmolLM2-135M's shape (and, with --large, Llama-3.2-1B's), HF
# transformers beside ours on the same weights. Logs and tables go to OUT_DIR (default cuda_check/).
#
#     bash scripts/cuda_check.sh [OUT_DIR] [--large] [--drafting] [--skip_tests]
#
# Needs a CUDA build of torch and the requirements; SmolLM2's tokenizer in checkpoints/SmolLM2-135M-Instruct
# (scripts/prepare.sh) or in TOKENIZER_FROM.
set -u -o pipefail
OUT_DIR=cuda_check LARGE=0 DRAFTING=0 TESTS=1
for arg in "$@"; do
  case "$arg" in
    --large) LARGE=1 ;; --drafting) DRAFTING=1 ;; --skip_tests) TESTS=0 ;;
    -*) echo "error: unknown option $arg (options: --large, --drafting, --skip_tests)" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
PYTHON=${PYTHON:-python3}
TOKENIZER_FROM=${TOKENIZER_FROM:-checkpoints/SmolLM2-135M-Instruct}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.." || exit 2
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), '| transformers', transformers.__version__)" | tee -a "$OUT_DIR/gpu.txt"

if [ "$TESTS" = 1 ]; then
  stage "tests/test_cuda.py"
  timeout "${TEST_TIMEOUT:-300}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT_DIR/tests.log" | tail -n 40
fi

stage "random SmolLM2-135M-shaped model (bfloat16) and its HF folder"
SMALL=checkpoints/random-smollm2-135m-bfloat16
"$PYTHON" scripts/random_model.py --shape smollm2-135m --dtype bfloat16 --hf --overwrite --output "$SMALL" \
  --tokenizer_from "$TOKENIZER_FROM" 2>&1 | tail -n 2

stage "generate.py --device cuda --compile (the CLI as a user runs it)"
timeout 180 "$PYTHON" generate.py --checkpoint_path "$SMALL/model.pth" --device cuda --compile --max_new_tokens 64 \
  --ignore_eos --num_samples 3 --prompt "The capital of France is" 2>&1 | tee "$OUT_DIR/generate.log" | tail -n 12

stage "bench.py --device cuda, SmolLM2-135M shape"
ROWS=ours-bf16,ours-int8,ours-int4,hf-eager-bf16,hf-static-compile-bf16
[ "$DRAFTING" = 1 ] && ROWS=$ROWS,ours-bf16-grounded,ours-lookup-grounded,ours-lookup,ours-speculative-int4
timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" scripts/bench.py --device cuda --checkpoint_path "$SMALL/model.pth" \
  --hf_model "$SMALL/hf" --rows "$ROWS" --runs 3 --markdown "$OUT_DIR/bench_smollm2.md" 2>"$OUT_DIR/bench_smollm2.err"
tail -n 5 "$OUT_DIR/bench_smollm2.err"

if [ "$LARGE" = 1 ]; then
  stage "random Llama-3.2-1B-shaped model (bfloat16), bench.py --device cuda"
  LARGE_DIR=checkpoints/random-llama-3.2-1b-bfloat16
  "$PYTHON" scripts/random_model.py --shape llama-3.2-1b --dtype bfloat16 --hf --overwrite --output "$LARGE_DIR" \
    --tokenizer_from "$TOKENIZER_FROM" 2>&1 | tail -n 2
  timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" scripts/bench.py --device cuda --checkpoint_path "$LARGE_DIR/model.pth" \
    --hf_model "$LARGE_DIR/hf" --rows ours-bf16,ours-int8,ours-int4,hf-eager-bf16,hf-static-compile-bf16 --runs 3 \
    --markdown "$OUT_DIR/bench_llama1b.md" 2>"$OUT_DIR/bench_llama1b.err"
  tail -n 5 "$OUT_DIR/bench_llama1b.err"
fi
stage "done"
