#!/usr/bin/env bash
# The fast-path issue's benchmark figures on one GPU: Llama-3.1-8B shape, random bf16 weights.
# Each run prints output tok/s, TTFT/TPOT percentiles, the bound measured in the same run and the ratio.
set -uo pipefail
CFG=${CFG:-configs/llama-3.1-8b.json}  # a copy of shared/model-configs (shared/ does not travel to the GPU)
OUT=${OUT:-/tmp/rtllm-gpu-out}
B="python3 -m rtllm.cli bench"
echo "--- batch-1 decode, ISL 128 / OSL 512 (CUDA graphs on), with transformers"
$B latency --model "$CFG" --isl 128 --osl 512 --num-requests 2 --baseline hf --output-json "$OUT/latency.json"
echo "--- batch-1 decode, CUDA graphs off"
$B latency --model "$CFG" --isl 128 --osl 128 --num-requests 2 --no-cuda-graphs --output-json "$OUT/latency_nograph.json"
echo "--- batch-1 decode, overlap off (graphs on)"
$B latency --model "$CFG" --isl 128 --osl 128 --num-requests 2 --no-overlap --output-json "$OUT/latency_nooverlap.json"
echo "--- TTFT at ISL 2048, batch 1"
$B latency --model "$CFG" --isl 2048 --osl 2 --num-requests 4 --output-json "$OUT/ttft2048.json"
echo "--- throughput ISL 128 / OSL 128, 1024 requests, concurrency 512"
$B throughput --model "$CFG" --isl 128 --osl 128 --num-requests 1024 --concurrency 512 --max-num-tokens 8192 \
    --output-json "$OUT/tput128.json"
echo "--- throughput ISL 1000 / OSL 1000, concurrency 200 (what the KV pool holds)"
$B throughput --model "$CFG" --isl 1000 --osl 1000 --num-requests 400 --concurrency 200 --max-num-tokens 8192 \
    --output-json "$OUT/tput1000.json"
