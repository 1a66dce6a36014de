#!/usr/bin/env bash
# The GPU checks, in one go: the attention and XEmoGPT tests on the GPU (cuDNN against XLA and PyTorch),
# then the side-by-side benchmarks against PyTorch. Logs go to ${1:-gpu_logs}/.
# Usage: tools/gpu_check.sh [LOG_DIR]   (with JAX's CUDA plugin and torch with CUDA installed)
set -u
logs=${1:-gpu_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.cuda.is_available())"
XEMOGPT_TEST_PLATFORMS=cuda,cpu timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
  tests/test_attention.py tests/test_attention_switch.py tests/test_xemogpt.py -k "not paper_scale" 2>&1 \
  | tee "$logs/pytest.log" | tail -30
timeout 120 python3 -m bench.attention 2>&1 | tee "$logs/attention.log" | tail -6
for impl in cudnn xla; do
  timeout 150 python3 bench/llm.py --dtype bfloat16 --attention "$impl" --batch 16 --seq 2048 --decode-batch 8 \
    --prompt 128 --new 64 --repeats 5 2>&1 | grep -v shards | tee -a "$logs/llm.log" | tail -4
done
