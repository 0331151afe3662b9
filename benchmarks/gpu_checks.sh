#!/usr/bin/env bash
# The GPU checks, in one call on a machine with one CUDA GPU and PyTorch (repo root):
#     bash benchmarks/gpu_checks.sh [OUT_DIR]
# 1. the sampler, running-batch and LM-head tests, CUDA ones included (graph-replayed decoding,
#    the continuous batch on CUDA, bf16 gradients);
# 2. aepo against TRL's GRPOTrainer on a 0.6B-class Qwen3 in bf16 (benchmarks/bench_vs_trl.py);
# 3. aepo's sampler (graphs, eager) against HF generate, its update's MFU and memory, and one
#    AEPO RL step under each rollout scheduler: turns, continuous, continuous with speculation,
#    and that without the running batch's decode graphs (its rollout tokens/s against the flat
#    sampler's; benchmarks/bench_gpu.py); the
#    update with the direct LM head and with chunks of the CPU and the CUDA default sizes
#    (2^24, 2^28 logits).
# Each part has its own time limit and a failing part does not stop the others. TRL and
# `datasets` must be importable (`pip install -e ".[bench]"`); results go to RESULTS.md.
set -u
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="src:benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"

echo "== 1. CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/rollout/test_torch_sampler.py tests/rollout/test_continuous_batch.py tests/train/test_vocab_head.py 2>&1 | tee "$out/pytest_gpu.log" | tail -15

echo "== 2. aepo vs TRL (qwen3-0.6b, bf16)"
timeout 200 python3 benchmarks/bench_vs_trl.py --device cuda --model qwen3-0.6b --max-tokens 256 \
    --micro 32 --steps 3 > "$out/bench_vs_trl.log" 2>&1
grep -v -i -E "warn|^\{" "$out/bench_vs_trl.log" | tail -14

echo "== 3. sampler, update, RL step"
timeout 330 python3 benchmarks/bench_gpu.py --out "$out/bench_gpu.json" --batch-sizes 64,256 \
    --update-rows 256 --micro 16 --head-chunk-elements 0,16777216,268435456 \
    --rl-schedulers turns,continuous,speculative,speculative_eager --budget-s 320 > "$out/bench_gpu.log" 2>&1
tail -38 "$out/bench_gpu.log"
