"""Command line: rtllm generate | chat | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-num-tokens", type=int, default=2048)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache capacity in tokens")
    p.add_argument("--quant", choices=["none", "w4a16"], default="none",
                   help="weight quantization applied at load: w4a16 = INT4 weights, 16-bit activations (CPU)")
    p.add_argument("--quant-group-size", type=int, default=32,
                   help="input channels per INT4 scale/zero: 32 | 64 | 128 | 256. 32 keeps a Q4_1 GGUF's codes "
                        "exactly (coarser groups requantize a 4-bit model); 128 stores ~15%% fewer bytes")
    p.add_argument("--log-level", default="warning")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args):
    from rtllm import LLM, KvCacheConfig, QuantConfig

    quant = None if args.quant == "none" else QuantConfig(args.quant, args.quant_group_size)
    return LLM(args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
               max_num_tokens=args.max_num_tokens, max_seq_len=args.max_seq_len,
               kv_cache_config=KvCacheConfig(max_tokens=args.kv_cache_tokens), quant_config=quant)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtllm", description="rtllm: LLM inference engine")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat that keeps history")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    from rtllm.bench.cli import add_bench_parser

    add_bench_parser(sub, _engine_args)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
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
