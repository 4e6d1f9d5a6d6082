#!/usr/bin/env bash
# The server issue's figures on one GPU, Llama-3.1-8B shape, random bf16 weights:
#   1. offline `rtllm bench throughput` at ISL 128 / OSL 128, concurrency 256, 1024 requests;
#   2. the same workload through `rtllm serve` + `rtllm bench serve` (HTTP, SSE streaming, the
#      multi-process executor): target >= 90% of (1);
#   3. TTFT at concurrency 1 (ISL 128), offline `bench latency` vs through the server: target
#      within 10 ms.
# Run from the repo root on the GPU machine; carried wheels in .whl/ go to /tmp/site. Logs to $OUT.
set -uo pipefail
source scripts/gpu_env.sh
python3 -c "import fastapi, uvicorn, zmq, prometheus_client, httpx" || { echo "server packages missing"; exit 1; }
CFG=${CFG:-configs/llama-3.1-8b.json}
PORT=${PORT:-8123}
R="python3 -m rtllm.cli"
ENGINE="--model $CFG --dtype bfloat16 --device cuda --max-batch-size 256 --max-num-tokens 8192"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true

if [ "${SKIP_OFFLINE:-0}" != 1 ]; then
echo "=== offline: throughput ISL 128 / OSL 128, concurrency 256"
$R bench throughput $ENGINE --isl 128 --osl 128 --num-requests 1024 --concurrency 256 \
    --output-json "$OUT/offline_tput.json"
echo "=== offline: TTFT at batch 1, ISL 128"
$R bench latency $ENGINE --isl 128 --osl 16 --num-requests 32 --output-json "$OUT/offline_latency.json"
fi

echo "=== server: rtllm serve $CFG"
$R serve $ENGINE --port "$PORT" --max-queue 4096 --log-format text --log-level warning > "$OUT/serve.log" 2>&1 &
SERVER=$!
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health")" = 200 ]; do
    kill -0 $SERVER 2>/dev/null || { echo "the server died while starting:"; tail -30 "$OUT/serve.log"; exit 1; }
    sleep 1
done
B="$R bench serve --base-url http://127.0.0.1:$PORT --vocab-size 128000 --ready-timeout 600"
echo "--- warm-up"
$B --isl 128 --osl 8 --num-requests 256 --concurrency 256 --num-clients 2 --seed 100 > /dev/null
echo "--- serve: throughput ISL 128 / OSL 128, concurrency 256"
echo "--- serve: 2 client processes (one Python client parses ~11k streamed tokens/s)"
$B --isl 128 --osl 128 --num-requests 1024 --concurrency 256 --num-clients 2 --seed 1 --output-json "$OUT/serve_tput2.json"
echo "--- serve: 4 client processes"
(sleep 4; top -b -d 1 -n 4 -w 200 | grep -E "^ *[0-9]+ .*python" | head -40) > "$OUT/serve_top.txt" 2>&1 &
$B --isl 128 --osl 128 --num-requests 1024 --concurrency 256 --num-clients 4 --seed 2 --output-json "$OUT/serve_tput4.json"
echo "--- serve: TTFT at concurrency 1, ISL 128"
$B --isl 128 --osl 16 --num-requests 32 --concurrency 1 --seed 3 --output-json "$OUT/serve_latency.json"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^rtllm:(request_success|generation_tokens|num_requests|kv_cache)' \
    > "$OUT/serve_metrics.txt"
kill -TERM $SERVER
wait $SERVER
echo "server exit code $?"
python3 - "$OUT" <<'PY'
import json, sys
d = sys.argv[1]
off, srv = json.load(open(f"{d}/offline_tput.json")), json.load(open(f"{d}/serve_tput4.json"))
offl, srvl = json.load(open(f"{d}/offline_latency.json")), json.load(open(f"{d}/serve_latency.json"))
def tok_s(r):
    return r.get("output_tok_per_s") or r["rtllm"]["output_tok_s"]
def ttft(r):
    t = r.get("ttft_s") or r["rtllm"]["ttft_s"]
    return t["p50"]
print(f"serve (4 client processes) / offline throughput: {tok_s(srv):.0f} / {tok_s(off):.0f} tok/s = {tok_s(srv) / tok_s(off):.1%} (target >= 90%)")
print(f"TTFT p50 at concurrency 1: serve {ttft(srvl) * 1e3:.2f} ms, offline {ttft(offl) * 1e3:.2f} ms, "
      f"difference {(ttft(srvl) - ttft(offl)) * 1e3:.2f} ms (target <= 10 ms)")
PY
