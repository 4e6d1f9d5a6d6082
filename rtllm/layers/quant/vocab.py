"""INT8 token embedding and LM head: one int8 code per weight, one fp32 absmax scale per vocabulary row.

When weights are quantized, the vocabulary matrices (``[V, H]``, the largest tensors of most models:
1 GiB each in bf16 on Llama-3.1-8B) use rtllm.quantization.int8's per-row format (the W8A16
format: ``E[v, :] ~= q[v, :] * scales[v]``, ``scales[v] = amax|E[v, :]| / 127``):

- ``Int8Embedding`` gathers the int8 rows of the batch's tokens and their scales and dequantizes
  only those ``T x H`` values, in fp32 and rounded once to the model dtype: bit for bit the rows
  of ``dequantize_w8(qweight, scales, dtype)``.
- the LM head is a ``W8A16Linear`` (logits = h (q * s)^T through rtllm.kernels.quant_gemm's
  weight-only GEMM); with tied embeddings it holds the embedding's very ``qweight`` and ``scales``
  parameters, so the table is stored (and counted) once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.layers.quant.base import frozen
from rtllm.layers.quant.int8 import W8A16Linear
from rtllm.quantization.int8 import quantize_w8_per_channel

# rows quantized at a time: the fp32 temporaries of a whole [V, H] table are 2 GiB at Llama-3's
# 128256 x 4096; per-row scales make a chunked pass exact
_ROWS_PER_CHUNK = 8192


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [V, H] -> (q int8 [V, H], scales fp32 [V]) as rtllm.quantization.int8.quantize_w8_per_channel
    computes them, a block of rows at a time."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D table, got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], _ROWS_PER_CHUNK):
        q[r:r + _ROWS_PER_CHUNK], s[r:r + _ROWS_PER_CHUNK] = quantize_w8_per_channel(w[r:r + _ROWS_PER_CHUNK])
    return q, s


class Int8Embedding(nn.Module):
    """out[t] = (qweight[ids[t]] * scales[ids[t]]) in ``out_dtype`` (the model dtype; a JSON string so
    an engine directory can store it). ``qweight`` int8 [V, H], ``scales`` fp32 [V]: parameters
    (requires_grad=False) so the model's weight bytes count them."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise ValueError(f"Int8Embedding: expected int8 [V, H] codes and [V] scales, got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        self.qweight = qweight if isinstance(qweight, nn.Parameter) else frozen(qweight)
        self.scales = scales if isinstance(scales, nn.Parameter) else frozen(scales)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.out_dtype = _dtype_name(out_dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Module) -> Int8Embedding:
        """Quantize a loaded embedding (anything with ``weight`` [V, H]) per row."""
        w = embedding.weight
        q, s = quantize_rows(w)
        return cls(q, s, w.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 table (what the engine reports as the embedding's bytes; scales are [V] beside it)."""
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table as the lookup computes each row (fp32 products, rounded once to ``dtype``)."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.qweight)  # int8 [..., H]: only the batch's rows are read
        scales = F.embedding(input_ids, self.scales.view(-1, 1))  # fp32 [..., 1]
        return (rows.float() * scales).to(getattr(torch, self.out_dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales, out_dtype={self.out_dtype}"


def int8_lm_head(head: nn.Module, embedding: Int8Embedding | None = None) -> W8A16Linear:
    """The LM head (``weight`` [V, H]) as a W8A16 linear. ``embedding``: the quantized embedding of a
    tied pair, whose ``qweight`` and ``scales`` parameters the head then holds as they are."""
    if embedding is not None:
        V, H = embedding.qweight.shape
        new = W8A16Linear(H, V, embedding.qweight.detach(), embedding.scales.detach(), None)
        new.qweight, new.scales = embedding.qweight, embedding.scales  # the same Parameter objects: one table
        return new
    V, H = head.weight.shape
    q, s = quantize_rows(head.weight)
    return W8A16Linear(H, V, q, s, None)
