"""GPU probe: does torch's varlen FlashAttention give SDPA's bits (transformers' prefill attention),
and how fast is it beside rtllm's Triton paged prefill? Prints fractions of differing elements and
timings; run on the GPU machine (python3 scripts/varlen_probe.py)."""

from __future__ import annotations

import inspect
import os
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rtllm.bench.bounds import time_cuda
from rtllm.kernels import triton_attention


def differ(a, b) -> str:
    return f"{float((a != b).float().mean()):7.3%} (max {float((a.float() - b.float()).abs().max()):.2g})"


def bench(fn) -> float:
    """Median microseconds of fn() (rtllm.bench.bounds.time_cuda)."""
    return time_cuda(fn, 50) * 1e6


# speed at Llama-3.1-8B shapes: (Hq, Hkv, D) and the prompt lengths of each case
LLAMA_HEADS = (32, 8, 128)
SPEED_CASES = ([2048], [1024, 512, 256, 256], [128] * 16, [512] * 16)


def ragged_qkv(lens: list[int]):
    """Random bf16 q, k, v [T, H, D] at Llama-3.1-8B's heads for prompts of ``lens``, and their
    cumulative lengths (int32)."""
    hq, hkv, d = LLAMA_HEADS
    T = sum(lens)
    q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def main() -> None:
    print("torch", torch.__version__, "flash sdp", torch.backends.cuda.flash_sdp_enabled(),
          "cudnn sdp", torch.backends.cuda.cudnn_sdp_enabled())
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        print("no varlen_attn:", e)
        return
    params = list(inspect.signature(varlen_attn).parameters)
    print("varlen_attn params:", params)
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    for hq, hkv, d in ((9, 3, 64), (32, 8, 128)):
        for L in (37, 200, 1024):
            q = torch.randn(L, hq, d, device=dev, dtype=dt, generator=g)
            k = torch.randn(L, hkv, d, device=dev, dtype=dt, generator=g)
            v = torch.randn(L, hkv, d, device=dev, dtype=dt, generator=g)
            sc = d**-0.5
            qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
            sdpa = partial(F.scaled_dot_product_attention, is_causal=True, scale=sc)
            ref = sdpa(qh, kh, vh, enable_gqa=True)[0].transpose(0, 1)
            r = hq // hkv
            rep = sdpa(qh, kh.repeat_interleave(r, 1), vh.repeat_interleave(r, 1))[0].transpose(0, 1)
            cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
            kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            try:
                vl = varlen_attn(q, k, v, cu, cu, L, L, scale=sc, **kw)
                vtxt = differ(vl, ref)
            except Exception as e:  # noqa: BLE001
                vtxt = f"failed: {type(e).__name__}: {str(e)[:120]}"
            # rtllm's Triton prefill over a paged cache holding nothing before the chunk
            bs = 16
            nb = -(-L // bs)
            kc = torch.zeros(nb + 1, bs, hkv, d, dtype=dt, device=dev)
            vc = torch.zeros_like(kc)
            tables = torch.arange(1, nb + 1, dtype=torch.int32, device=dev)[None]
            tri = triton_attention.paged_prefill_attention_triton(
                q, k, v, kc, vc, tables, cu, torch.tensor([L], dtype=torch.int32, device=dev), sc, L, L)
            print(f"Hq {hq:2} Hkv {hkv} D {d:3} L {L:5}: SDPA repeat_kv vs gqa {differ(rep, ref)} | "
                  f"varlen vs SDPA {vtxt} | triton vs SDPA {differ(tri, ref)}")
            # which backend is SDPA's default here: each one forced, against the default
            forced = []
            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel(be):
                        o = sdpa(qh, kh.repeat_interleave(r, 1), vh.repeat_interleave(r, 1))[0].transpose(0, 1)
                    forced.append(f"{be.name} {differ(o, ref)} triton-vs-it {differ(tri, o)}")
                except RuntimeError as e:
                    forced.append(f"{be.name} unavailable ({str(e)[:60]})")
            print("    forced:", " | ".join(forced))
    # speed at Llama-3.1-8B shapes
    hq, hkv, d = LLAMA_HEADS
    for lens in SPEED_CASES:
        q, k, v, cu = ragged_qkv(lens)
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        bs = 16
        nbs = [-(-n // bs) for n in lens]
        kc = torch.zeros(sum(nbs) + 1, bs, hkv, d, dtype=dt, device=dev)
        vc = torch.zeros_like(kc)
        tables = torch.zeros(len(lens), max(nbs), dtype=torch.int32, device=dev)
        o = 1
        for i, nb in enumerate(nbs):
            tables[i, :nb] = torch.arange(o, o + nb)
            o += nb
        sl = torch.tensor(lens, dtype=torch.int32, device=dev)
        L = max(lens)
        try:
            tv = bench(partial(varlen_attn, q, k, v, cu, cu, L, L, scale=d**-0.5, **kw))
        except Exception as e:  # noqa: BLE001
            tv = float("nan")
            print("varlen failed:", e)
        prefill = triton_attention.paged_prefill_attention_triton
        tt = bench(partial(prefill, q, k, v, kc, vc, tables, cu, sl, d**-0.5, L, L))
        flops = sum(4 * n * (n + 1) // 2 * d * hq for n in lens)
        print(f"{len(lens)} x {lens[0]:5} (T {sum(lens)}): varlen {tv:8.1f} us ({flops / tv / 1e6:6.1f} TFLOP/s) | "
              f"triton {tt:8.1f} us ({flops / tt / 1e6:6.1f} TFLOP/s)")


if __name__ == "__main__" and os.environ.get("PROBE") != "cudnn":
    main()


def cudnn_ragged() -> None:
    """cuDNN attention over ragged sequences in one call ([T, H, D] with cumulative lengths, as
    torch's jagged SDPA calls it): the same bits as dense SDPA (cuDNN) one sequence at a time?"""
    dev, dt = "cuda", torch.bfloat16
    op = torch.ops.aten._cudnn_attention_forward
    print("schema:", op.default._schema)
    g = torch.Generator(device=dev).manual_seed(1)
    for hq, hkv, d in ((9, 3, 64), (32, 8, 128)):
        lens = [37, 200, 1024, 5]
        T = sum(lens)
        q = torch.randn(T, hq, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(T, hkv, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(T, hkv, d, device=dev, dtype=dt, generator=g)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        sc = d**-0.5
        r = hq // hkv
        dense = []
        for i in range(len(lens)):
            s = slice(int(cu[i]), int(cu[i + 1]))
            qh, kh, vh = (t[s].transpose(0, 1)[None] for t in (q, k, v))
            dense.append(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sc, enable_gqa=True)[0]
                         .transpose(0, 1))
        dense = torch.cat(dense)
        for name, kk, vv in (("gqa", k, v), ("repeat", k.repeat_interleave(r, 1), v.repeat_interleave(r, 1))):
            for cdt in (torch.int32, torch.int64):
                try:
                    out = op(q, kk, vv, None, cu.to(cdt), cu.to(cdt), max(lens), max(lens), False, 0.0, True, False,
                             scale=sc)[0]
                    print(f"Hq {hq} Hkv {hkv} D {d} {name} {cdt}: ragged cuDNN vs dense SDPA {differ(out, dense)}")
                except Exception as e:  # noqa: BLE001
                    print(f"Hq {hq} Hkv {hkv} D {d} {name} {cdt}: failed {type(e).__name__}: {str(e)[:200]}")
    hq, hkv, d = LLAMA_HEADS
    for lens in SPEED_CASES:
        q, k, v, cu = ragged_qkv(lens)
        try:
            t = bench(partial(op, q, k, v, None, cu, cu, max(lens), max(lens), False, 0.0, True, False, scale=d**-0.5))
        except Exception as e:  # noqa: BLE001
            t = float("nan")
            print("failed", str(e)[:200])
        flops = sum(4 * n * (n + 1) // 2 * d * hq for n in lens)
        print(f"{len(lens)} x {lens[0]:5}: ragged cuDNN {t:8.1f} us ({flops / t / 1e6:6.1f} TFLOP/s)")


if __name__ == "__main__" and os.environ.get("PROBE") == "cudnn":
    cudnn_ragged()
