"""Pre-quantized checkpoint layouts found on the Hugging Face hub: parse, unpack, dequantize, convert.

Tensor math only; rtllm.models.prequantized maps a checkpoint's tensors onto the model's layers.
Detected from ``config.json``'s ``quantization_config``; per linear layer ``P`` (``W`` is the dense
weight ``[N, K]`` = out x in, ``g`` the group size, ``G = K / g``):

- **FP8** (``quant_method`` ``"fp8"``, ``"compressed-tensors"`` with float weights, or ``"modelopt"``
  with ``quant_algo`` FP8): ``P.weight`` float8_e4m3fn ``[N, K]`` and ``P.weight_scale`` fp32, one per
  tensor (``[]`` / ``[1]``), per output channel (``[N]`` / ``[N, 1]``) or per block (2-D
  ``[ceil(N/bn), ceil(K/bk)]``; also HF's fine-grained ``P.weight_scale_inv``, which despite its
  name multiplies): ``W = float(weight) * scale``. ``P.input_scale`` (a static activation scale)
  is read and not used: rtllm quantizes activations per token at run time.
- **AWQ** (``"awq"``, AutoAWQ ``version: "gemm"``, 4 bits): ``P.qweight`` int32 ``[K, N/8]``,
  ``P.qzeros`` int32 ``[G, N/8]``, ``P.scales`` fp16 ``[G, N]``. Packed along the output dimension,
  8 codes a word in the order ``AWQ_PACK_ORDER``: nibble ``i`` (bits ``4i..4i+3``) of word ``c`` holds
  column ``8c + AWQ_PACK_ORDER[i]``. ``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.
- **GPTQ** (``"gptq"``, AutoGPTQ / GPTQModel, 4 or 8 bits): ``P.qweight`` int32 ``[K * bits / 32, N]``
  packed along the input dimension in order (value ``j`` of word ``i`` is row ``(32 / bits) i + j``,
  bits ``bits * j ..``), ``P.qzeros`` int32 ``[G, N * bits / 32]`` packed along the output dimension in
  order, ``P.scales`` fp16 ``[G, N]``, ``P.g_idx`` int32 ``[K]`` (the group of each input channel;
  ``k // g`` unless the checkpoint was quantized with ``desc_act`` / act-order).
  ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``; ``checkpoint_format: "gptq"`` (v1, the
  default) stores ``z - 1`` (so the stored nibble is read as ``(v + 1) mod 2^bits``), ``"gptq_v2"``
  stores ``z``. ``sym`` checkpoints have ``z = 2^(bits-1)``.

rtllm's W4 format (rtllm.quantization.int4) is ``W = (q - 8) * s + zeros`` with ``zeros`` the value
of code 8; an AWQ / GPTQ zero point ``z`` converts exactly: ``zeros = (8 - z) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtllm.errors import ModelLoadError

SUPPORTED_QUANT_METHODS: tuple[str, ...] = ("fp8", "compressed-tensors", "modelopt", "awq", "gptq")
AWQ_PACK_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNPACK = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))  # column j sits in nibble _AWQ_UNPACK[j]

# per-layer tensor names that carry quantization data, beside ``weight`` (and ``bias``)
QUANT_TENSOR_NAMES = frozenset({
    "qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale",
    "weight_zero_point", "input_zero_point", "weight_scale_2", "output_scale", "k_scale", "v_scale",
    "kv_scale", "weight_packed", "weight_shape",
})


@dataclass(frozen=True)
class CheckpointQuant:
    """A checkpoint's quantization: ``kind`` "fp8" | "awq" | "gptq" (``method`` is config.json's
    quant_method as written). ``bits`` / ``group_size`` / ``sym`` / ``desc_act`` as declared (the
    tensors' shapes are checked against them); ``zero_offset`` 1 for GPTQ v1 (zeros stored minus 1)."""

    kind: str
    method: str
    bits: int = 8
    group_size: int | None = None
    sym: bool = True
    desc_act: bool = False
    zero_offset: int = 0


def parse_quantization_config(qc: object, source: str) -> CheckpointQuant:
    """config.json's ``quantization_config`` -> CheckpointQuant; ModelLoadError naming what is supported."""
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    where = f"{source}: quantization_config.quant_method={qc.get('quant_method')!r}"
    if method == "fp8":
        return CheckpointQuant("fp8", method)
    if method == "modelopt":
        algo = str(qc.get("quant_algo", "FP8")).upper()
        if algo != "FP8":
            raise ModelLoadError(f"{where} with quant_algo={algo!r}: rtllm loads ModelOpt FP8 checkpoints only")
        return CheckpointQuant("fp8", method)
    if method == "compressed-tensors":
        fmt = qc.get("format")
        groups = qc.get("config_groups") or {}
        types = {str((grp.get("weights") or {}).get("type", "float")) for grp in groups.values()
                 if isinstance(grp, dict)}
        bits = {(grp.get("weights") or {}).get("num_bits", 8) for grp in groups.values() if isinstance(grp, dict)}
        if fmt not in (None, "float-quantized", "naive-quantized") or types - {"float"} or bits - {8}:
            raise ModelLoadError(f"{where} (format={fmt!r}, weight types {sorted(types)}, bits {sorted(bits)}): "
                                 f"rtllm loads compressed-tensors FP8 checkpoints (float-quantized, 8-bit float "
                                 f"weights) only")
        return CheckpointQuant("fp8", method)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if version != "gemm" or bits != 4:
            raise ModelLoadError(f"{where} with version={version!r}, bits={bits}: rtllm loads AutoAWQ GEMM "
                                 f"checkpoints (version 'gemm', 4 bits) only")
        return CheckpointQuant("awq", method, 4, _group(qc.get("group_size", qc.get("q_group_size")), where),
                               sym=not qc.get("zero_point", True))  # without zero points: z = 8
    if method == "gptq":
        bits = int(qc.get("bits", 4))
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if bits not in (4, 8) or fmt not in ("gptq", "gptq_v2"):
            raise ModelLoadError(f"{where} with bits={bits}, checkpoint_format={fmt!r}: rtllm loads GPTQ "
                                 f"checkpoints with 4 or 8 bits in the 'gptq' / 'gptq_v2' layouts only")
        return CheckpointQuant("gptq", method, bits, _group(qc.get("group_size"), where), sym=bool(qc.get("sym", True)),
                               desc_act=bool(qc.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0)
    raise ModelLoadError(f"{where}: not a supported pre-quantized format; supported quant_method values: "
                         f"{list(SUPPORTED_QUANT_METHODS)} (compressed-tensors and modelopt: FP8 only)")


def _group(value: object, where: str) -> int | None:
    if value is None or value == -1:
        return None  # one group spanning the input dimension
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{where}: group_size={value!r} must be a positive int or -1")
    return value


# -- FP8 ---------------------------------------------------------------------------------------

def fp8_channel_scales(scale: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """A checkpoint's FP8 ``weight_scale`` as per-output-channel fp32 ``[N]``; None for block scales."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1).expand(out_features).clone()
    if s.numel() == out_features and (s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1)):
        return s.reshape(out_features).clone()
    return None


def dequantize_fp8_checkpoint(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W [N, K] fp32 = float(weight) * scale, the scale per tensor, per channel or per 2-D block."""
    N, K = weight.shape
    w = weight.float()
    ch = fp8_channel_scales(scale, N)
    if ch is not None:
        return w * ch[:, None]
    s = scale.float()
    if s.dim() != 2:
        raise ValueError(f"FP8 weight_scale of shape {tuple(s.shape)} for a weight {tuple(weight.shape)}")
    bn, bk = -(-N // s.shape[0]), -(-K // s.shape[1])
    return w * s.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]


# -- AWQ ---------------------------------------------------------------------------------------

def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing: int32 [R, C/8] -> codes int32 [R, C] (0..15), undoing AWQ_PACK_ORDER."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [R, C/8, 8]: nibble i
    return nib[..., list(_AWQ_UNPACK)].reshape(packed.shape[0], -1)


def awq_to_w4(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An AWQ layer -> rtllm's W4 format: (codes int32 [N, K], scales fp32 [G, N], zeros fp32 [G, N])."""
    q = unpack_awq(qweight)  # [K, N]
    s = scales.float()
    z = unpack_awq(qzeros).float() if qzeros is not None else torch.full_like(s, 8.0)
    if z.shape != s.shape or q.shape[1] != s.shape[1] or q.shape[0] % s.shape[0]:
        raise ValueError(f"AWQ shapes do not fit: qweight unpacks to {tuple(q.shape)}, qzeros to {tuple(z.shape)}, "
                         f"scales {tuple(s.shape)}")
    return q.t().contiguous(), s, (8.0 - z) * s


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
    """W [N, K] fp32 = (q - z) * s of an AWQ layer."""
    q = unpack_awq(qweight).float()  # [K, N]
    s = scales.float()
    z = unpack_awq(qzeros).float() if qzeros is not None else torch.full_like(s, 8.0)
    g = q.shape[0] // s.shape[0]
    return ((q - z.repeat_interleave(g, 0)) * s.repeat_interleave(g, 0)).t().contiguous()


# -- GPTQ --------------------------------------------------------------------------------------

def _unpack_seq(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Values packed in order into int32 words along ``dim`` (0: rows, 1: columns) -> int32 values."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    p = packed.to(torch.int32)
    if dim == 0:  # [R/per, C] -> [R/per, per, C] -> [R, C]
        return ((p.unsqueeze(1) >> shifts.view(1, per, 1)) & mask).reshape(-1, p.shape[1])
    return ((p.unsqueeze(-1) >> shifts) & mask).reshape(p.shape[0], -1)  # [R, C/per, per] -> [R, C]


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, zero_offset: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 [K, N], zero points int32 [G, N]) of a GPTQ layer."""
    q = _unpack_seq(qweight, bits, 0)
    z = (_unpack_seq(qzeros, bits, 1) + zero_offset) & ((1 << bits) - 1)
    return q, z


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, zero_offset: int) -> torch.Tensor:
    """W [N, K] fp32 of a GPTQ layer (any g_idx)."""
    q, z = gptq_unpack(qweight, qzeros, bits, zero_offset)
    K = q.shape[0]
    gi = g_idx.long() if g_idx is not None else torch.arange(K, device=q.device) // (K // scales.shape[0])
    s = scales.float()
    return ((q.float() - z[gi].float()) * s[gi]).t().contiguous()


def gptq_to_w4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               zero_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """A 4-bit GPTQ layer -> rtllm's W4 format (codes [N, K], scales [G, N], zeros [G, N] fp32) and the
    input permutation (None when g_idx is k // g). With act-order (desc_act), input channels sorted
    by group form contiguous groups: codes are returned in that order and ``perm`` says which input
    feeds each column. None when no permutation makes the groups contiguous and equal-sized."""
    q, z = gptq_unpack(qweight, qzeros, 4, zero_offset)
    K = q.shape[0]
    G = scales.shape[0]
    if K % G:
        return None
    g = K // G
    s = scales.float()
    zeros = (8.0 - z.float()) * s
    ordered = torch.arange(K, device=q.device) // g
    if g_idx is None or torch.equal(g_idx.long(), ordered):
        return q.t().contiguous(), s, zeros, None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], ordered):
        return None
    return q[perm].t().contiguous(), s, zeros, perm
