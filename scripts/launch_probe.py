"""Upper bounds for launch fusions: run an rtllm CLI command (e.g. ``bench latency``) in this process with
some launches removed from the forward, to measure what they cost on the step's critical path before
fusing them into a neighbour. The outputs are wrong; only the timings mean anything.

    python scripts/launch_probe.py --skip norms -- bench latency --model configs/llama-3.1-8b.json ...

--skip (comma list):
- ``norms``: every RMSNorm layer returns its input (and the residual unchanged): no norm launch, no
  residual add (q/k norms run inside the RoPE kernel and stay). For 16-bit layers: an FP8 layer that
  took its input quantized by the norm would quantize it in a launch of its own;
- ``router``: a MoE router returns fixed top-k ids and weights, prepared once per token count (no router
  launch; the experts still read the weights those ids pick);
- ``rope``: no RoPE + cache-write launch (q and k pass through unrotated, the cache is never written);
- ``attn_reduce``: the decode attention's split kernel runs, its reduce launch does not (the output is
  left unwritten);
- ``attn_one_split``: decode attention in one split a (sequence, KV head) (no reduce launch; each program
  streams the whole context).
"""

from __future__ import annotations

import argparse
import sys

import torch


def skip_norms() -> None:
    from rtllm.layers import norm

    def forward(self, x, residual=None, consumer=None):
        return x if residual is None else (x, residual)

    norm.RMSNorm.forward = forward


def skip_router() -> None:
    from rtllm.kernels import moe

    fixed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def route(x, router_weight, top_k, renormalize, *args, **kwargs):
        key = (x.shape[0], top_k, x.device)
        if key not in fixed:  # top_k different experts per token, spread over the experts; made outside capture
            E = router_weight.shape[0]
            t = torch.arange(x.shape[0], device=x.device)[:, None]
            ids = ((t * 37 + torch.arange(top_k, device=x.device)[None, :] * (E // top_k)) % E).to(torch.int32)
            fixed[key] = (torch.full((x.shape[0], top_k), 1.0 / top_k, device=x.device), ids)
        return fixed[key]

    moe.route = route


def skip_rope() -> None:
    from rtllm.kernels import attention_rope

    attention_rope.rope_and_cache = lambda positions, q, k, *args, **kwargs: (q, k)


def skip_attn_reduce() -> None:
    from rtllm.kernels.triton_attention import decode

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    decode.decode_reduce_kernel = NoLaunch()


def attn_one_split() -> None:
    from rtllm.kernels.triton_attention import decode

    decode.decode_num_splits = lambda batch, num_kv_heads, max_seq_len, block_n, num_sms=132: (1, max_seq_len)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    probes = {"norms": skip_norms, "router": skip_router, "rope": skip_rope, "attn_reduce": skip_attn_reduce,
              "attn_one_split": attn_one_split}
    ap.add_argument("--skip", default="", help=f"comma list of {', '.join(probes)}")
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the rtllm CLI arguments")
    args = ap.parse_args()
    for name in filter(None, args.skip.split(",")):
        if name not in probes:
            ap.error(f"unknown --skip {name!r}: one of {sorted(probes)}")
        probes[name]()
        print(f"launch_probe: {name} skipped (outputs are wrong; timings only)", flush=True)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    from rtllm.cli import main as rtllm_main

    return rtllm_main(cli)


if __name__ == "__main__":
    sys.exit(main())
