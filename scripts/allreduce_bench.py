"""Time of one tensor-parallel all-reduce at decode / prefill sizes, through rtllm's own collective
(rtllm.parallel.comm.tp_all_reduce over NCCL on GPUs, gloo on the CPU).

    python scripts/allreduce_bench.py --world 2 [--hidden 8192] [--rows 1,8,64,256,2048] [--device cuda]

A decoder layer all-reduces twice (after attention, after the MLP), so a step of L layers spends
about 2 * L * t(rows) in all-reduces; the script prints that per-step figure next to each size. Put
it beside a measured TPOT at the same batch (rtllm bench latency / throughput --tp N) for the share
of the step (docs/PERF.md). Timed eagerly, as the engine runs them when split (no CUDA graphs yet),
back to back after a warm-up, synchronized once at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank: int, world: int, port: int, args, results) -> None:
    import torch

    from rtllm.parallel import comm
    from rtllm.parallel.mapping import Mapping

    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    comm.init_distributed(Mapping(world, world, 1, rank=rank), f"tcp://127.0.0.1:{port}", device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    out = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.hidden, device=device, dtype=dtype)
        for _ in range(5):
            comm.tp_all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            comm.tp_all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / args.iters * 1e6
        out.append((rows, us))
    if rank == 0:
        results.put(out)
    comm.destroy_distributed()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--rows", default="1,8,64,256,2048")
    ap.add_argument("--layers", type=int, default=80, help="decoder layers, for the per-step figure")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    from rtllm.parallel.comm import free_port

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = results.get(timeout=600)
    for p in procs:
        p.join(60)
    print(f"all-reduce over {args.world} ranks ({args.device}), hidden {args.hidden}:")
    for r, us in rows:
        mb = r * args.hidden * (2 if args.device == "cuda" else 4) / 2**20
        print(f"  rows {r:>5} ({mb:7.2f} MiB): {us:8.1f} us each; 2 x {args.layers} layers = "
              f"{2 * args.layers * us / 1e3:6.2f} ms a step")
    return 0 if all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
