"""`rtllm bench throughput | latency | serve`: offline engine benchmarks with an optional HF baseline,
and the client-side benchmark of a running server (rtllm.bench.serve)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import time


def add_bench_parser(sub, engine_args) -> None:
    from rtllm.bench.serve import add_serve_parser

    b = sub.add_parser("bench", help="benchmarks: offline (throughput, latency) and of a server (serve)")
    bsub = b.add_subparsers(dest="mode", required=True)
    add_serve_parser(bsub)
    for mode in ("throughput", "latency"):
        p = bsub.add_parser(mode)
        engine_args(p)
        p.add_argument("--isl", type=int, default=128, help="input tokens per request")
        p.add_argument("--osl", type=int, default=128, help="output tokens per request")
        if mode == "throughput":
            p.add_argument("--num-requests", type=int, default=64)
            p.add_argument("--concurrency", type=_int_list, default=[16],
                           help="requests in flight at most; a list (16,64,256) sweeps them on one engine")
            p.add_argument("--plot", default=None, metavar="PNG",
                           help="write throughput and TPOT against concurrency (a --concurrency list) to PNG")
        else:
            p.add_argument("--num-requests", type=int, default=4)
        p.add_argument("--baseline", choices=["none", "hf"], default="none")
        p.add_argument("--rounds", type=_positive_int, default=1,
                       help="run the engine (and the baseline) this many times, alternating, a fresh engine each "
                            "round, and report each round's figures and ratio with their median: on a machine "
                            "whose speed drifts, alternating runs keep the ratio honest")
        p.add_argument("--random-weights", action="store_true",
                       help="random weights from the model's config.json (a checkpoint directory or a bare "
                            "config .json, which always gets random weights); no tokenizer: prompts are token ids")
        p.add_argument("--no-cuda-graphs", action="store_true")
        p.add_argument("--no-overlap", action="store_true", help="disable overlap scheduling")
        p.add_argument("--executor", choices=["auto", "inprocess", "multiprocess"], default="auto")
        p.add_argument("--output-json", default=None)
        p.set_defaults(func=run_bench)


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int or a comma-separated list of ints") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: concurrencies must be >= 1")
    return sorted(set(vals))


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return n


def _random_weights_config(model: str | None) -> str:
    """The config.json that --random-weights builds the model from."""
    import os

    if model and model.endswith(".json") and os.path.isfile(model):
        return model
    if model and os.path.isfile(os.path.join(model, "config.json")):
        return os.path.join(model, "config.json")
    raise SystemExit(f"error: --random-weights needs --model to be a config .json or a directory with a config.json, "
                     f"got {model!r}")


def _commit() -> str:
    """The commit of the rtllm tree that runs: RTLLM_COMMIT when set (an exported tree has no .git), else
    git's HEAD if this package's directory is the top of its checkout (not an export inside some other
    repository, whose HEAD would be reported otherwise), else "unknown"."""
    if os.environ.get("RTLLM_COMMIT"):
        return os.environ["RTLLM_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        top = subprocess.check_output(["git", "-C", root, "rev-parse", "--show-toplevel"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
        if os.path.realpath(top) != os.path.realpath(root):
            return "unknown"
        return subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_bench(args) -> int:
    import torch

    from rtllm import QuantConfig
    from rtllm.bench.workload import Workload

    concs = getattr(args, "concurrency", [1])
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("error: --plot needs matplotlib (pip install matplotlib)") from None
        if len(concs) < 2:
            raise SystemExit("error: --plot needs a --concurrency list, e.g. --concurrency 16,64,256")
    conc = max(concs)
    wl = Workload(args.num_requests, args.isl, args.osl, conc)
    model = _random_weights_config(args.model) if args.random_weights else args.model
    from rtllm.bench.bounds import measure_hardware
    from rtllm.config import CudaGraphConfig

    # ceilings first, before the engine takes the GPU memory
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    hw_dtype = torch.float32 if args.dtype in ("float32", "fp32") else torch.bfloat16
    hw = measure_hardware(torch.device("cuda"), hw_dtype) if on_gpu else None

    @functools.cache
    def hw_for(dtype: str, world_size: int):
        """The ceilings: the GPU's (measured above), or the CPU's in the engine's own dtype ("auto" resolves
        at load) on one rank's share of the cores (as each rank's worker takes it), measured once beside the
        idle engine."""
        if on_gpu or args.device not in ("auto", "cpu"):
            return hw
        from rtllm.parallel.comm import cpu_threads_per_rank

        return measure_hardware(torch.device("cpu"), getattr(torch, dtype), cpu_threads_per_rank(world_size))
    graphs = None if args.no_cuda_graphs else CudaGraphConfig(max_batch_size=max(args.max_batch_size, conc))
    quant = QuantConfig.from_name(args.quant, args.quant_group_size, args.kv_cache_dtype)
    # the engine's max_seq_len sizes the CUDA graphs' attention split grid: report it with the figures
    max_seq_len = args.max_seq_len or args.isl + args.osl + 8
    rounds = [_round(args, model, wl, concs, hw_for, graphs, quant, max_seq_len) for _ in range(args.rounds)]
    res = rounds[-1]
    if len(rounds) > 1:
        res["rounds"] = [{"rtllm_output_tok_s": r["rtllm"]["output_tok_s"],
                          "rtllm_tpot_p50_s": r["rtllm"]["tpot_s"]["p50"],
                          "kv_capacity_tokens": r["info"]["kv_capacity_tokens"],
                          **({"transformers_output_tok_s": r["transformers"]["output_tok_s"],
                              "ratio_vs_hf": r["ratio_vs_hf"]} if "transformers" in r else {})} for r in rounds]
    _print(res)
    if getattr(args, "plot", None):
        _plot(res, args.plot)
        print(f"  plot: {args.plot}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _round(args, model, wl, concs: list[int], hw_for, graphs, quant, max_seq_len: int) -> dict:
    """One engine (a fresh LLM) through the concurrency sweep, then the baseline if asked: their figures."""
    import torch

    from rtllm import LLM, KvCacheConfig
    from rtllm.bench.throughput import bench_engine, bench_hf
    from rtllm.bench.workload import Workload

    conc = max(concs)
    llm = LLM(model, dtype=args.dtype, cuda_graph_config=graphs, device=args.device, quant_config=quant,
              max_batch_size=max(args.max_batch_size, conc), max_num_tokens=max(args.max_num_tokens, conc),
              max_seq_len=max_seq_len,
              kv_cache_config=KvCacheConfig(max_tokens=args.kv_cache_tokens), executor_type=args.executor,
              disable_overlap_scheduler=args.no_overlap, tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size,
              moe_expert_parallel_size=args.moe_expert_parallel_size)
    ei = llm.executor.engine_info
    hw = hw_for(ei["dtype"], ei["tensor_parallel_size"] * ei["pipeline_parallel_size"])
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(), "machine": platform.processor()
            or platform.machine(), "device": ei["device"], "dtype": ei["dtype"], "model": ei["model"],
            "workload": wl.__dict__, "max_seq_len": max_seq_len, "startup": ei.get("startup", {}),
            "kv_capacity_tokens": ei["kv_capacity_tokens"],
            "kv_cache_dtype": ei.get("kv_cache_dtype"),
            "quant": None if quant is None else (f"{quant.quant_algo or 'bf16'} g{quant.group_size}"
                                                 + (" kv fp8" if quant.kv_cache_quant_algo else "")),
            "weight_bytes": ei["weight_bytes"]}
    from rtllm.bench.bounds import ModelCost, active_params, workload_bound

    per_forward = ei["weight_bytes"] - (0 if ei["tie_word_embeddings"] else ei["embedding_bytes"])
    # MoE: a token runs k of the E experts, a batch-1 decode step reads only those (bounds.ModelCost)
    moe = {k: ei.get(k, 0) for k in ("expert_bytes", "num_experts", "experts_per_tok")}
    # the logical weights (weight bytes / element size would undercount a quantized model)
    active = active_params(ei["linear_params"] + ei["lm_head_params"], ei["expert_params"], moe["num_experts"],
                           moe["experts_per_tok"])
    cost = ModelCost(per_forward, active, ei["kv_bytes_per_token"], ei["num_layers"],
                     ei["num_heads"], ei["head_dim"], **moe, head_params=ei["lm_head_params"])
    if moe["num_experts"]:
        info["moe"] = dict(moe, active_params=cost.active_params)
    res: dict = {"info": info}
    if hw is not None:
        info["hardware"] = hw.__dict__
    sweep = []
    for i, c in enumerate(concs):  # ascending: the last run is the workload's own concurrency
        # distinct prompts per point (and per warm-up, seed + 1): a repeated prompt would be served
        # from the prefix cache and inflate the later points
        w = Workload(args.num_requests, args.isl, args.osl, c, seed=1000 * i)
        r = bench_engine(llm, w)
        r["concurrency"] = c
        if hw is not None:
            bound = workload_bound(cost, hw, w.num_requests, w.isl, w.osl, c)
            res["bound"] = bound
            r["ratio_to_bound"] = r["output_tok_s"] / bound["bound_output_tok_s"]
            r["ttft_ratio_to_bound"] = bound["bound_ttft_s"] / r["ttft_s"]["p50"]
        sweep.append(r)
    res["rtllm"] = sweep[-1]
    if len(sweep) > 1:
        res["sweep"] = sweep
    res["rtllm"]["peak_gpu_memory_bytes"] = llm.executor.peak_memory_bytes()
    vocab, eos = llm.tokenizer.vocab_size, frozenset(llm.tokenizer.eos_token_ids)
    model_path, dtype, device = ei["model"], getattr(torch, ei["dtype"]), ei["device"]
    llm.shutdown()  # frees the worker's weights and KV pool before the baseline loads its own copy
    del llm
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.baseline == "hf":
        res["transformers"] = bench_hf(model_path, wl, dtype, device, vocab, eos)
        res["ratio_vs_hf"] = res["rtllm"]["output_tok_s"] / res["transformers"]["output_tok_s"]
        gc.collect()
        if torch.cuda.is_available():  # the next round's engine sizes its KV cache from free memory
            torch.cuda.empty_cache()
    return res


def _print(res: dict) -> None:
    i = res["info"]
    w = i["workload"]
    quant = f"  weights {i['quant']}" if i.get("quant") else ""
    print(f"# rtllm bench  {i['date']}  commit {i['commit']}  {i['device']} {i['dtype']}{quant}"
          f"  ({i['weight_bytes'] / 2**20:.1f} MiB of weights)")
    print(f"# workload: {w['num_requests']} requests, ISL {w['isl']}, OSL {w['osl']}, concurrency {w['concurrency']}, "
          f"max_seq_len {i['max_seq_len']}")
    for key in ("rtllm", "transformers"):
        if key not in res:
            continue
        r = res[key]
        line = f"{key:>12}: {r['output_tok_s']:9.1f} output tok/s  {r['request_s']:7.2f} req/s"
        if "ttft_s" in r:
            t, p = r["ttft_s"], r["tpot_s"]
            line += (f"  TTFT p50/p90/p99 {t['p50']*1e3:.1f}/{t['p90']*1e3:.1f}/{t['p99']*1e3:.1f} ms"
                     f"  TPOT p50/p90/p99 {p['p50']*1e3:.1f}/{p['p90']*1e3:.1f}/{p['p99']*1e3:.1f} ms")
        else:
            line += f"  TPOT mean {r['tpot_s']['mean']*1e3:.1f} ms"
        print(line)
    if "moe" in i:
        m = i["moe"]
        print(f"  MoE: {m['experts_per_tok']} of {m['num_experts']} experts per token; "
              f"{m['active_params'] / 1e9:.2f} B active parameters; experts {m['expert_bytes'] / 2**20:.1f} MiB")
    if "bound" in res:
        b, hw, r = res["bound"], i["hardware"], res["rtllm"]
        if "moe" in i:
            print(f"  weights read per batch-1 decode step (active): {b['decode_weight_bytes_batch1'] / 2**20:.1f} MiB")
        print(f"  hardware: {hw['name']}, copy {_rate(hw['copy_bandwidth'], 'B/s')}, "
              f"matmul {_rate(hw['matmul_flops'], 'FLOP/s')} (measured in this run)")
        print(f"  bound: {b['bound_output_tok_s']:.1f} output tok/s (decode {b['decode_bound_s']:.2f} s, prefill "
              f"{b['prefill_bound_s']:.3f} s); rtllm at {r['ratio_to_bound']:.1%} of it")
        print(f"  TTFT bound {b['bound_ttft_s']*1e3:.2f} ms; rtllm p50 at {r['ttft_ratio_to_bound']:.1%} of it")
    if i.get("startup"):
        print("  startup: " + ", ".join(f"{k} {v:.2f}" for k, v in i["startup"].items()))
    if i.get("kv_capacity_tokens"):
        print(f"  KV cache: {i['kv_capacity_tokens']} tokens ({i.get('kv_cache_dtype') or i['dtype']})")
    peak = res["rtllm"].get("peak_gpu_memory_bytes")
    if peak:
        print(f"  peak GPU memory (engine, torch reserved: weights + KV pool + activations + graphs): "
              f"{peak / 2**30:.2f} GiB")
    if "sweep" in res:
        print("  concurrency sweep:  conc  output tok/s  TPOT p50 ms  TTFT p50 ms  ratio to bound")
        for r in res["sweep"]:
            ratio = f"{r['ratio_to_bound']:.1%}" if "ratio_to_bound" in r else "-"
            print(f"  {r['concurrency']:>23d}  {r['output_tok_s']:12.1f}  {r['tpot_s']['p50'] * 1e3:11.2f}  "
                  f"{r['ttft_s']['p50'] * 1e3:11.1f}  {ratio:>14s}")
    if "ratio_vs_hf" in res:
        print(f"  ratio rtllm / transformers: {res['ratio_vs_hf']:.2f}x")
    if "rounds" in res:
        import statistics

        rounds = res["rounds"]
        print("  rounds (alternating; the figures above are the last round's):")
        for k, r in enumerate(rounds, 1):
            line = f"    {k}: rtllm {r['rtllm_output_tok_s']:.1f} tok/s (TPOT p50 {r['rtllm_tpot_p50_s']*1e3:.1f} ms)"
            if "ratio_vs_hf" in r:
                line += (f", transformers {r['transformers_output_tok_s']:.1f} tok/s,"
                         f" ratio {r['ratio_vs_hf']:.2f}x")
            print(line)
        tok_s = statistics.median(r["rtllm_output_tok_s"] for r in rounds)
        line = f"  median of {len(rounds)} rounds: rtllm {tok_s:.1f} tok/s"
        if "ratio_vs_hf" in rounds[0]:
            line += f", ratio {statistics.median(r['ratio_vs_hf'] for r in rounds):.2f}x"
        print(line)


def _rate(x: float, unit: str) -> str:
    """2.80 TB/s, 29.4 GB/s, 412 GFLOP/s: three significant figures in T or G."""
    scale, prefix = (1e12, "T") if x >= 1e12 else (1e9, "G")
    v = x / scale
    return f"{v:.3g} {prefix}{unit}" if v < 100 else f"{v:.0f} {prefix}{unit}"


def _plot(res: dict, path: str) -> None:
    """Output tok/s and TPOT p50 against concurrency, one PNG (two y axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = res["sweep"]
    conc = [r["concurrency"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(conc, [r["output_tok_s"] for r in sweep], "o-", color="tab:blue", label="output tok/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.minorticks_off()
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tok/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(conc, [r["tpot_s"]["p50"] * 1e3 for r in sweep], "s--", color="tab:red", label="TPOT p50")
    ax2.set_ylabel("TPOT p50 (ms)", color="tab:red")
    i, w = res["info"], res["info"]["workload"]
    ax.set_title(f"rtllm {i['model']} {i['dtype']} on {i['device']}: ISL {w['isl']} / OSL {w['osl']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
