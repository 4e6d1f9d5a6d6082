#!/usr/bin/env bash
# Issue 8's runs on a machine with several GPUs (nvidia-h200-x2 / x4 / x8): NCCL correctness, the
# Llama-3.1-70B shape at TP=2, the 8B shape's TP / PP scaling, Qwen3-30B-A3B expert parallel, and the
# all-reduce time per step. Written before any multi-GPU machine was lent: not run yet.
#   bash scripts/multigpu_check.sh            # every part the GPUs present allow
#   PARTS="correct tp70b" bash scripts/multigpu_check.sh
set -uo pipefail
source scripts/gpu_env.sh
if compgen -G ".gpucache/smollm.part*" >/dev/null; then  # the default model's GGUF, as in gpu_check.sh
    cat .gpucache/smollm.part* > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    export RTLLM_DEFAULT_MODEL=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
fi
# NVLink multicast off in every process (KINDS.md of the device tool)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
PARTS=${PARTS:-"correct agree tp70b scale8b ep allreduce"}
B="python3 -m rtllm.cli bench"
echo "GPUs: $NGPU; parts: $PARTS"
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has correct; then
    echo "=== fp32 greedy, split vs one GPU: dense (TP=2, PP=2) and MoE (TP=2, EP=2, PP=2)"
    python3 scripts/parallel_check.py --device cuda --dtype float32 --splits 2x1,1x2,2x1e2 \
        --archs llama,qwen3,mixtral,qwen3_moe
fi
if has agree && [ -n "${RTLLM_DEFAULT_MODEL:-}" ] && [ "$NGPU" -ge 2 ]; then
    echo "=== bf16 teacher-forced top-1 agreement with transformers, default model, TP=2"
    RTLLM_AGREE_TP=2 python3 scripts/gpu_bf16_agreement.py
fi
if has tp70b && [ "$NGPU" -ge 2 ]; then
    E="--model configs/llama-3.1-70b.json --dtype bfloat16 --device cuda --tp 2"
    echo "=== Llama-3.1-70B shape, TP=2: batch-1 decode (ISL 128 / OSL 256)"
    $B latency $E --isl 128 --osl 256 --num-requests 2 --output-json "$OUT/l70b_tp2_latency.json" 2>&1 | grep -v '^{'
    echo "=== Llama-3.1-70B shape, TP=2: throughput ISL 128 / OSL 128, concurrency 256"
    $B throughput $E --isl 128 --osl 128 --num-requests 512 --concurrency 256 --max-batch-size 256 \
        --max-num-tokens 8192 --output-json "$OUT/l70b_tp2_tput.json" 2>&1 | grep -v '^{'
fi
if has scale8b; then
    for tp in 1 2 4 8; do
        [ "$tp" -le "$NGPU" ] || continue
        c=$((128 * tp))  # equal concurrency per GPU
        echo "=== Llama-3.1-8B shape, TP=$tp, concurrency $c"
        $B throughput --model configs/llama-3.1-8b.json --dtype bfloat16 --device cuda --tp "$tp" --isl 128 --osl 128 \
            --num-requests $((2 * c)) --concurrency "$c" --max-batch-size "$c" --max-num-tokens 8192 \
            --output-json "$OUT/l8b_tp${tp}.json" 2>&1 | grep -v '^{'
    done
    if [ "$NGPU" -ge 2 ]; then
        echo "=== Llama-3.1-8B shape, PP=2 (2 micro-batches), concurrency 256"
        $B throughput --model configs/llama-3.1-8b.json --dtype bfloat16 --device cuda --pp 2 --isl 128 --osl 128 \
            --num-requests 512 --concurrency 256 --max-batch-size 256 --max-num-tokens 8192 \
            --output-json "$OUT/l8b_pp2.json" 2>&1 | grep -v '^{'
    fi
fi
if has ep; then
    for ep in 1 2 4; do
        [ "$ep" -le "$NGPU" ] || continue
        E="--model configs/qwen3-30b-a3b.json --dtype bfloat16 --device cuda --tp $ep --ep $ep"
        echo "=== Qwen3-30B-A3B shape, EP=$ep (attention TP=$ep): batch-1 decode and throughput c256"
        $B latency $E --isl 128 --osl 128 --num-requests 2 --output-json "$OUT/moe_ep${ep}_latency.json" 2>&1 | grep -v '^{'
        $B throughput $E --isl 128 --osl 128 --num-requests 256 --concurrency 256 --max-batch-size 256 \
            --max-num-tokens 8192 --output-json "$OUT/moe_ep${ep}_tput.json" 2>&1 | grep -v '^{'
    done
fi
if has allreduce && [ "$NGPU" -ge 2 ]; then
    echo "=== all-reduce time (70B hidden 8192, 80 layers; compare with the TPOT above)"
    python3 scripts/allreduce_bench.py --world 2 --hidden 8192 --layers 80 --rows 1,8,64,256,2048
fi
