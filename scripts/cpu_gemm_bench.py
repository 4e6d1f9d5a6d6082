"""The default model's dense GEMMs on the CPU: F.linear on row- and column-major weights against the
oneDNN-packed weights the runner uses (rtllm.kernels.gemm.pack_for_cpu).

    python scripts/cpu_gemm_bench.py [--rows 1,16,1024] [--dtypes float32,bfloat16] [--threads 2]

Each row: 30 layers' GEMMs (qkv 960 x 576, o 576 x 576, gate|up 3072 x 576, down 576 x 1536; distinct
weights per layer, so a decode-sized product streams them from DRAM as a step does), then the tied
49152 x 576 LM head; median of 3 timed calls after 3 warm-ups (cpu_decode_attention_bench.bench), all
variants in the same process. The max |difference| of the packed product from F.linear's is printed (bf16 /
fp16: expected 0).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cpu_decode_attention_bench import bench

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) of SmolLM2-135M's layer GEMMs
LAYERS = 30
VOCAB = 49152


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,16,1024")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    packed_mm = torch.ops.mkldnn._linear_pointwise
    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        g = torch.Generator().manual_seed(0)
        row = [[torch.randn(n, k, generator=g).to(dt) for n, k in SHAPES] for _ in range(LAYERS)]
        col = [[w.t().contiguous().t() for w in layer] for layer in row]
        packed = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in layer] for layer in row]
        head = torch.randn(VOCAB, 576, generator=g).to(dt)
        head_packed = torch.ops.mkldnn._reorder_linear_weight(head, None)
        for m in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(m, k, generator=g).to(dt) for _n, k in SHAPES]

            def dense(ws, xs=xs):
                return lambda: [F.linear(x, w) for layer in ws for w, x in zip(layer, xs)]

            def packed_run(xs=xs, packed=packed):
                return [packed_mm(x, w, None, "none", [], "") for layer in packed for w, x in zip(layer, xs)]

            t_row, t_col, t_packed = (bench(fn, 1, 3) / 1e6 for fn in (dense(row), dense(col), packed_run))
            diff = (F.linear(xs[2], row[0][2]) - packed_mm(xs[2], packed[0][2], None, "none", [], "")).abs().max()
            h = xs[0]
            t_head = bench(lambda h=h, w=head: F.linear(h, w), 1, 3) / 1e6
            t_head_packed = bench(lambda h=h, w=head_packed: packed_mm(h, w, None, "none", [], ""), 1, 3) / 1e6
            print(f"{name:8s} rows {m:5d} | {LAYERS} layers: row-major {t_row * 1e3:8.1f} ms, column-major "
                  f"{t_col * 1e3:8.1f} ms, packed {t_packed * 1e3:8.1f} ms ({t_row / t_packed:.2f}x) | LM head "
                  f"{t_head * 1e3:6.2f} -> {t_head_packed * 1e3:6.2f} ms | max diff {diff.item():.2g}", flush=True)


if __name__ == "__main__":
    main()
