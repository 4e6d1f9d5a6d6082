"""GPU probe: which Triton spelling of silu(x) = x / (1 + exp(-x)) gives torch's CUDA bits in fp32
(exp: tl.exp or libdevice's expf; division: approximate or IEEE div_rn; FMA fusion on or off)."""

import itertools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _silu(x_ptr, o_ptr, n, LIBDEVICE: tl.constexpr, DIV_RN: tl.constexpr):
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    x = tl.load(x_ptr + offs, mask=offs < n)
    e = libdevice.exp(-x) if LIBDEVICE else tl.exp(-x)
    y = tl.math.div_rn(x, 1.0 + e) if DIV_RN else x / (1.0 + e)
    tl.store(o_ptr + offs, y, mask=offs < n)


def main() -> None:
    x = torch.randn(1 << 22, device="cuda") * 6
    ref = torch.nn.functional.silu(x)
    for lib, rn, fuse in itertools.product((False, True), repeat=3):
        o = torch.empty_like(x)
        _silu[(triton.cdiv(x.numel(), 1024),)](x, o, x.numel(), LIBDEVICE=lib, DIV_RN=rn, enable_fp_fusion=fuse)
        bf = (o.bfloat16() != ref.bfloat16()).float().mean()
        print(f"libdevice exp {lib!s:5} div_rn {rn!s:5} fusion {fuse!s:5}: fp32 differ "
              f"{float((o != ref).float().mean()):.4%}, after rounding to bf16 {float(bf):.4%}")


if __name__ == "__main__":
    main()
