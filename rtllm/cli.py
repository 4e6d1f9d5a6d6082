"""Command line: rtllm generate | chat | serve | build | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _tp_size(value: str) -> int | str:
    if value.lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def _engine_args(p: argparse.ArgumentParser, engine_limits: bool = False) -> None:
    """``engine_limits``: --max-batch-size / --max-num-tokens default to None, so an engine directory's
    build limits apply (64 / 2048 for a checkpoint)."""
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or engine directory from `rtllm build` (default: embedded "
                        "SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    lim = " (default: 64, or an engine directory's build limit)" if engine_limits else ""
    p.add_argument("--max-batch-size", type=int, default=None if engine_limits else 64, help=f"requests per step{lim}")
    p.add_argument("--max-num-tokens", type=int, default=None if engine_limits else 2048,
                   help=f"tokens per step{lim.replace('64', '2048')}")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache capacity in tokens")
    p.add_argument("--kv-cache-dtype", type=str.lower, choices=["auto", "fp8"], default="auto",
                   help="fp8: keep the KV cache in e4m3 (twice the tokens in the same memory)")
    from rtllm.quantization.config import SUPPORTED_QUANT_ALGOS

    p.add_argument("--quant", type=str.lower, choices=["none", *(a.lower() for a in SUPPORTED_QUANT_ALGOS)],
                   default="none",
                   help="weight quantization applied at load (docs/QUANTIZATION.md): fp8 = e4m3 weights and "
                        "per-token activations; w8a16 / w4a16 = INT8 / INT4 weights, 16-bit activations; "
                        "w4a16_awq = INT4 after AWQ calibration; nvfp4 = e2m1 weights with e4m3 block scales")
    p.add_argument("--quant-group-size", type=int, default=None,
                   help="input channels per INT4 scale: 32 | 64 | 128 | 256 (default 128 where it divides). 32 "
                        "keeps a Q4_1 GGUF's codes exactly (coarser groups requantize a 4-bit model)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=_tp_size, default=1,
                   help="split the model across this many ranks (tensor parallel), one worker process each; "
                        "auto: the smallest power of two whose shares fit the visible GPUs' free memory (1 on CPU)")
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pipeline_parallel_size", type=int, default=1,
                   help="split the layers across this many pipeline stages (ranks = tp * pp)")
    p.add_argument("--ep", "--moe-expert-parallel-size", dest="moe_expert_parallel_size", type=int, default=None,
                   help="MoE models: split the experts across this many of the tp ranks (expert parallel); the "
                        "rest of the tp group splits each expert's width (default: ep 1, experts split by width)")
    p.add_argument("--log-level", default="warning")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args, **kw):
    from rtllm import LLM, KvCacheConfig, QuantConfig

    quant = QuantConfig.from_name(args.quant, args.quant_group_size, args.kv_cache_dtype)
    return LLM(args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
               max_num_tokens=args.max_num_tokens, max_seq_len=args.max_seq_len,
               kv_cache_config=KvCacheConfig(max_tokens=args.kv_cache_tokens), quant_config=quant,
               tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
               moe_expert_parallel_size=args.moe_expert_parallel_size, **kw)


def _served_name(model: str | None) -> str:
    import os

    if model is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf").removesuffix(".json")


def cmd_serve(args) -> int:
    import os

    from rtllm.serve.app import ServerConfig
    from rtllm.serve.logs import configure_logging
    from rtllm.serve.server import run_server

    if args.model_pos is not None:
        if args.model is not None and args.model != args.model_pos:
            print("error: give the model once (positional or --model)", file=sys.stderr)
            return 2
        args.model = args.model_pos
    configure_logging(args.log_format, args.log_level if args.log_level != "warning" else "info")
    if args.model is not None and not os.path.exists(args.model):
        print(f"error: model path {args.model!r} does not exist", file=sys.stderr)
        return 2
    names = args.served_model_name or [_served_name(args.model)]
    config = ServerConfig(served_model_names=names, api_key=args.api_key or os.environ.get("RTLLM_API_KEY") or None,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, log_prompts=args.log_prompts,
                          shutdown_timeout=args.shutdown_timeout)
    factory = lambda: _make_llm(args, executor_type=args.executor)
    return run_server(factory, config, host=args.host, port=args.port, on_engine_death=args.on_engine_death)


def _params(args):
    from rtllm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def cmd_generate(args) -> int:
    with _make_llm(args) as llm:
        params = _params(args)
        use_chat = not args.raw and llm.tokenizer.has_chat_template
        if use_chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params,
                            use_tqdm=not args.json)
        else:
            outs = llm.generate(args.prompts, params, use_tqdm=not args.json)
        for prompt, out in zip(args.prompts, outs):
            c = out.outputs[0]
            if args.json:
                m = out.metrics
                print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                                  "finish_reason": c.finish_reason,
                                  "ttft_s": m.time_to_first_token, "tpot_s": m.time_per_output_token,
                                  "e2e_s": m.e2e_latency}))
            else:
                print(c.text)
    return 0


def cmd_chat(args) -> int:
    with _make_llm(args) as llm:
        if not llm.tokenizer.has_chat_template:
            print("this model has no chat template; use `rtllm generate --raw`", file=sys.stderr)
            return 2
        history: list[dict] = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        params = _params(args)
        print("rtllm chat: type a message, /reset to clear history, Ctrl-D to quit.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            text = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
            ids = llm.tokenizer.encode(text, add_special_tokens=False)
            reply = ""
            for out in llm.generate_async(ids, params, streaming=True):
                delta = out.outputs[0].text_diff
                reply += delta
                print(delta, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": reply})


def cmd_build(args) -> int:
    from rtllm.builder import BuildConfig, build
    from rtllm.quantization.config import QuantConfig

    if args.model is None:
        from rtllm.llmapi.default_model import default_model_path

        args.model = default_model_path()
    bc = BuildConfig(max_input_len=args.max_input_len, max_seq_len=args.max_seq_len,
                     max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens, dtype=args.dtype,
                     kv_cache_dtype=args.kv_cache_dtype, tokens_per_block=args.tokens_per_block,
                     quant_config=QuantConfig.from_name(args.quant, args.quant_group_size),
                     tp_size=args.tp_size, pp_size=args.pp_size, moe_ep_size=args.moe_ep_size,
                     tune_kernels=not args.no_tune_kernels)
    result = build(args.model, bc, args.output, device=args.device)
    log = result.log
    sizes = log["sizes_bytes"]
    print(f"built {args.output}: {log['num_tensors']} tensors, {sizes['weights_file'] / 2**20:.1f} MiB "
          f"({log['quantized_layers'] or 'not quantized'}) in {log['timings_s']['total']:.1f} s; "
          f"max_batch_size={bc.max_batch_size} max_input_len={bc.max_input_len} "
          f"max_seq_len={result.build_config.max_seq_len} max_num_tokens={bc.max_num_tokens}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtllm", description="rtllm: LLM inference engine")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _engine_args(g, engine_limits=True)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat that keeps history")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c, engine_limits=True)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, models, health, metrics)")
    s.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (or set RTLLM_API_KEY)")
    s.add_argument("--served-model-name", action="append", default=None,
                   help="model name(s) clients send (default: the model file or directory name)")
    s.add_argument("--max-queue", type=int, default=1024,
                   help="sequences allowed to wait beyond --max-batch-size; more get 429 with Retry-After")
    s.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="request body size limit (413 beyond)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted")
    s.add_argument("--on-engine-death", choices=["exit", "restart"], default="exit",
                   help="when the engine worker dies: exit with code 1 (for a supervisor) or restart it in place")
    s.add_argument("--executor", choices=["multiprocess", "inprocess"], default="multiprocess")
    s.add_argument("--log-format", choices=["json", "text"], default="json")
    s.add_argument("--log-prompts", action="store_true", help="include prompt and completion text in the logs")
    _engine_args(s, engine_limits=True)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="build an engine directory: weights fused and quantized once, loaded as stored",
                       description="Load a checkpoint, fuse and quantize it, and write an engine directory that "
                                   "`rtllm generate --model DIR` and LLM(DIR) load without re-quantizing. The "
                                   "limits become the runtime's defaults and ceilings.")
    b.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    b.add_argument("--output", required=True,
                   help="the engine directory to write (new, empty, or an engine directory to replace)")
    from rtllm.quantization.config import SUPPORTED_QUANT_ALGOS

    b.add_argument("--quant", type=str.lower, default="none",
                   choices=["none", *(a.lower() for a in SUPPORTED_QUANT_ALGOS)],
                   help="weight quantization baked into the engine (docs/QUANTIZATION.md)")
    b.add_argument("--quant-group-size", type=int, default=None,
                   help="input channels per INT4 scale: 32 | 64 | 128 | 256")
    b.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8")
    b.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    b.add_argument("--device", default="auto", help="the device the engine is for: auto | cpu | cuda")
    b.add_argument("--max-batch-size", type=int, default=2048)
    b.add_argument("--max-input-len", type=int, default=1024)
    b.add_argument("--max-seq-len", type=int, default=None, help="default: the model's max_position_embeddings")
    b.add_argument("--max-num-tokens", type=int, default=8192)
    b.add_argument("--tokens-per-block", type=int, default=32)
    b.add_argument("--tp", "--tp-size", dest="tp_size", type=int, default=1,
                   help="tensor-parallel ranks: one weights file per rank (load with the same --tp)")
    b.add_argument("--pp", "--pp-size", dest="pp_size", type=int, default=1, help="pipeline-parallel stages")
    b.add_argument("--ep", "--moe-ep-size", dest="moe_ep_size", type=int, default=1,
                   help="MoE models: split the experts across this many of the tp ranks")
    b.add_argument("--no-tune-kernels", action="store_true",
                   help="skip timing the decode GEMV kernels' configurations on the build GPU (stored in the "
                        "engine's kernel_tuning.json; a CPU build has none)")
    b.add_argument("--log-level", default="info")
    b.set_defaults(func=cmd_build)

    from rtllm.bench.cli import add_bench_parser

    add_bench_parser(sub, _engine_args)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "warning").upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from rtllm.errors import RtllmError

        if isinstance(e, RtllmError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
