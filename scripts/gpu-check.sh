#!/usr/bin/env bash
# On a machine with a CUDA GPU and its own Python (torch >= 2.11, transformers >= 5.17, accelerate,
# pytest, pytest-timeout), from the repository root, without installing moedeploy: the CUDA tests of
# expert buffering, prediction and quantized experts, SiDA's decode under budgets on the GPU, int8 / int4
# against bfloat16 experts under budgets, then the end-to-end offload benchmark. Newest measurements first:
# what a call that runs out of time leaves in OUT_DIR is what matters most. Results go to OUT_DIR
# (default $OUT).
#   scripts/gpu-check.sh [OUT_DIR]
set -o pipefail
out=${1:-${OUT:?give an output folder}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 2
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -rfE --tb=short -p no:cacheprovider --timeout 300 tests/test_cache.py tests/test_sida_runtime.py \
  tests/test_quant.py -k "cuda or identical" 2>&1 | tee "$out/cuda-tests.log"
tests=$?
# SiDA on the GPU (issue 12): the demo model at 10/20/50% of its expert bytes, no prefetch / lookahead / sida,
# each budget's transfer bound over PCIe beside its measured time per token; then the predictor's cost.
python3 -m moedeploy bench predict --device cuda --parts cost,decode --rounds 3 --json \
  > "$out/predict-cuda.json" 2> "$out/predict-cuda.log"
# The same 2.4 GB random Qwen3-MoE as the CPU run in docs/benchmarks.md ("End to end").
python3 -m moedeploy make-tiny --family qwen3_moe --out /tmp/wide --set hidden_size=1024 --set num_hidden_layers=6 \
  --set num_experts=64 --set num_experts_per_tok=8 --set moe_intermediate_size=512 >/dev/null || exit 3
# Issue 15 on the GPU: int8 and int4 experts (a miss moves the small bytes) against bfloat16 ones at the same
# budgets, bytes per token against the PCIe bound.
python3 -m moedeploy bench offload --device cuda --model /tmp/wide --store host --budgets 0.1,0.25,0.5 \
  --dtype bfloat16 --expert-dtype none,int8,int4 --no-baselines --prefetch none --new-tokens 32 --rounds 3 \
  --timeout 300 --json > "$out/offload-cuda-quant.json" 2> "$out/offload-cuda-quant.log"
# Then the end-to-end run of earlier sessions again (measured before: docs/benchmarks.md, "End to end on a GPU").
python3 -m moedeploy bench offload --device cuda --model /tmp/wide --store host --budgets 0.1,0.25,0.5,1.0 \
  --new-tokens 32 --rounds 3 --prefetch lookahead,none --timeout 300 2>&1 | tee "$out/offload-cuda.log"
exit $tests
