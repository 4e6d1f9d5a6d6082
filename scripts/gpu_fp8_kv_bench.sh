#!/usr/bin/env bash
# FP8 throughput with and without an FP8 KV cache, bf16 first as the same-run baseline (Llama-3.1-8B
# shape, random weights, ISL 128 / OSL 128, 1024 requests, concurrency 512), then FP8 + FP8 KV batch-1 decode.
set -uo pipefail
source scripts/gpu_env.sh
B="python3 -m rtllm.cli bench"
E="--model configs/llama-3.1-8b.json --dtype bfloat16 --device cuda"
T="--isl 128 --osl 128 --num-requests 1024 --concurrency 512 --max-batch-size 512 --max-num-tokens 8192"
echo "=== bf16 throughput"; $B throughput $E $T --output-json $OUT/t_bf16.json 2>&1 | grep -E "rtllm:|bound:"
echo "=== fp8 weights + fp8 kv throughput"; $B throughput $E $T --quant fp8 --kv-cache-dtype fp8 --output-json $OUT/t_fp8kv.json 2>&1 | grep -E "rtllm:|bound:"
echo "=== fp8 weights throughput"; $B throughput $E $T --quant fp8 --output-json $OUT/t_fp8.json 2>&1 | grep -E "rtllm:|bound:"
echo "=== fp8 weights + fp8 kv decode"; $B latency $E --quant fp8 --kv-cache-dtype fp8 --isl 128 --osl 256 --num-requests 2 2>&1 | grep -E "rtllm:|bound:"
