"""Token sampling for a batch: temperature, top-k, top-p, min-p and the exponential race.

Every row ``i`` of ``logits`` [B, V] is sampled with its own parameters, given as [B] tensors:

- ``temperature``: 0 makes the row greedy: its token is ``argmax(logits[i])`` and nothing below
  applies to it. Otherwise the row's logits are divided by it.
- ``top_k`` (int): keep every token >= the k-th largest scaled logit (HF ``TopKLogitsWarper``:
  ties at the boundary survive). ``k <= 0`` (0 or -1) or ``k >= V`` is off.
- ``top_p``: HF ``TopPLogitsWarper`` on what top-k kept: sort ascending, drop the tokens whose
  cumulative probability is ``<= 1 - top_p`` (``1 - top_p`` computed in float64, then rounded to
  float32, as HF compares with a Python float), always keep the most probable token. ``top_p >= 1``
  is off. Pass a float64 tensor to keep a Python value's ``1 - top_p`` exact.
- ``min_p``: drop tokens whose probability (after top-k / top-p) is ``< min_p * max probability``.
  ``min_p <= 0`` is off.
- The token is ``argmax(probs / q)`` over what is left (exponential race: with ``q ~ Exp(1)``
  i.i.d. it is a sample from ``probs``). ``q`` [B, V] float32 is given by the caller, so a seeded
  row can draw its noise from its own generator; it is clamped to the smallest normal float.

``sample_tokens_torch`` is the reference (the CPU path): a full sort for top-p, ``torch.topk`` for
top-k. ``triton_sampling.sample_tokens_triton`` picks the same token without sorting (it finds the
top-k and top-p cut-off values by a bounded search over the row); where the reference's sort
order splits a run of tied logits at the top-p cut, the kernel keeps the whole run.
"""

from __future__ import annotations

import torch

from rtllm.kernels.dispatch import triton_enabled

_TINY = torch.finfo(torch.float32).tiny

# Batches with fewer rows run the torch reference on CUDA too. The kernel runs one program per row,
# so a small batch leaves most SMs idle while each program searches 128k logits. Measured on an
# H100 (scripts/sampler_bench.py, vocab 128256, bf16; ms per call, kernel / reference):
#   B=1:   top_p 1.05/0.72   top_k 0.61/1.00   k+p+min_p 0.87/1.00   half greedy + top_p 1.66/0.71
#   B=32:  top_p 1.25/1.24   top_k 0.68/1.43   k+p+min_p 0.94/1.43   half greedy + top_p 1.72/1.23
#   B=256: top_p 2.64/5.34   top_k 1.52/5.67   k+p+min_p 2.03/5.67   half greedy + top_p 2.04/5.32
TRITON_MIN_ROWS = 64


def _some(mask: torch.Tensor) -> bool:
    """``mask.any()`` on CPU; True on a device (assume yes rather than wait for the device)."""
    return True if mask.device.type != "cpu" else bool(mask.any())


def filter_logits_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """The logits each sampled row draws from: float32 [B, V], filtered tokens at -inf (``logits``
    itself when nothing applies; it is never modified). Greedy rows (temperature 0) come back
    unchanged. ``max_top_k`` (optional) is ``max(top_k)``
    known on the host: without it the reference reads it from the device.
    """
    x = logits.float()
    vocab, dev = x.shape[1], x.device
    sampled = temperature.to(dev) != 0
    t = torch.where(sampled, temperature.to(dev, torch.float32), 1.0)
    if _some(t != 1.0):
        x = x / t.unsqueeze(1)
    k = torch.where(sampled, top_k.to(dev, torch.int64).clamp(0, vocab), 0)
    kmax = min(int(k.max()) if max_top_k is None else max_top_k, vocab)
    if kmax > 0:
        k_t = k.unsqueeze(1)
        top = torch.topk(x, kmax, dim=-1).values
        kth = top.gather(1, (k_t - 1).clamp_(min=0))
        x = x.masked_fill((x < kth) & (k_t > 0), float("-inf"))
    p = torch.where(sampled, top_p.to(dev, torch.float64), 1.0)
    on = p < 1.0
    if _some(on):
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop = (cum <= (1.0 - p).float().unsqueeze(1)) & on.unsqueeze(1)
        drop[:, -1] = False  # always keep the most probable token
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    mp = torch.where(sampled, min_p.to(dev, torch.float32), 0.0)
    if _some(mp > 0.0):
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < mp.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def sample_tokens_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    q: torch.Tensor,
    *,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """One token per row ([B] int64, on the logits' device): greedy rows take the argmax of their
    logits, sampled rows ``argmax(softmax(filter_logits_torch(...)) / q)``."""
    x = logits.float()
    probs = filter_logits_torch(x, temperature, top_k, top_p, min_p, max_top_k=max_top_k).softmax(dim=-1)
    tokens = probs.div_(q.clamp(min=_TINY)).argmax(dim=-1)
    return torch.where(temperature.to(x.device) == 0, x.argmax(dim=-1), tokens)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    q: torch.Tensor,
    *,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA for batches of TRITON_MIN_ROWS rows or more (no sort, no
    host sync), the torch reference otherwise (also free of host syncs given ``max_top_k``)."""
    if triton_enabled(logits) and logits.shape[0] >= TRITON_MIN_ROWS:
        from rtllm.kernels import triton_sampling

        return triton_sampling.sample_tokens_triton(logits, temperature, top_k, top_p, min_p, q)
    return sample_tokens_torch(logits, temperature, top_k, top_p, min_p, q, max_top_k=max_top_k)


# Rows at most this many use the split argmax on CUDA; from there one block per row fills the SMs.
ARGMAX_SPLIT_MAX_ROWS = 64


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy tokens: ``logits.argmax(dim=-1)`` ([B] int64, the first index of each row's maximum).
    On CUDA, small batches of long rows run the split Triton argmax (a decode step's greedy path)."""
    if triton_enabled(logits) and logits.is_cuda and logits.shape[0] <= ARGMAX_SPLIT_MAX_ROWS:
        from rtllm.kernels import triton_sampling

        return triton_sampling.argmax_triton(logits)
    return logits.argmax(dim=-1)
