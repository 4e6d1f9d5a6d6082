"""A model's forward pass outside the engine: whole sequences in one prefill, on a throwaway KV cache.

For calibration and evaluation (perplexity), which need every position's hidden state or logits
and no scheduling. The model's attention layers are bound to a private cache for the call and
unbound after (so this must not run while an engine serves the same model object).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rtllm.layers.attention_metadata import AttentionMetadata
from rtllm.layers.norm import RMSNorm

_BLOCK = 16


@torch.inference_mode()
def prefill_hidden(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                   dtype: torch.dtype | None = None, chunk: int | None = None) -> list[torch.Tensor]:
    """Hidden states [len(seq), hidden] for each token sequence, from one batched prefill, or with
    ``chunk`` from batched prefill steps of ``chunk`` tokens per sequence over the same cache.

    ``dtype``: the KV cache's (the model dtype; torch.float8_e4m3fn for an FP8 cache, quantized with
    each attention layer's k_scale / v_scale); None takes the model dtype, its norms' (the embedding
    and linear weights may be quantized). Attention reads a step's own K/V fresh and only earlier
    steps' from the cache, so an FP8 cache changes the result only where ``chunk`` splits a sequence
    (chunk=1: every position attends like a decode step)."""
    layers = model.attention_layers()
    a = layers[0]
    first = next(model.parameters())
    norm = next((m.weight for m in model.modules() if isinstance(m, RMSNorm)), first)
    device, dtype = first.device, dtype or norm.dtype
    lens = [len(s) for s in sequences]
    if not lens or min(lens) == 0:
        raise ValueError("every sequence needs at least one token")
    nblocks = [-(-n // _BLOCK) for n in lens]
    cache = torch.zeros((len(layers), 2, 1 + sum(nblocks), _BLOCK, a.num_kv_heads, a.head_dim),
                        dtype=dtype, device=device)
    saved = [(layer.k_cache, layer.v_cache) for layer in layers]
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[i, 0], cache[i, 1]
    try:
        tables, nxt = [], 1  # block 0 is the null block
        for nb in nblocks:
            tables.append(list(range(nxt, nxt + nb)))
            nxt += nb
        step = chunk or max(lens)
        parts: list[list[torch.Tensor]] = [[] for _ in sequences]
        for lo in range(0, max(lens), step):
            live = [i for i, n in enumerate(lens) if n > lo]
            spans = [(lo, min(lens[i], lo + step)) for i in live]
            hidden = model(*_step_inputs([sequences[i] for i in live], [tables[i] for i in live], spans, device))
            for i, h in zip(live, hidden.split([e - s for s, e in spans])):
                parts[i].append(h)
    finally:
        for layer, (k, v) in zip(layers, saved):
            layer.k_cache, layer.v_cache = k, v
    return [torch.cat(p) for p in parts]


def _step_inputs(sequences, tables, spans, device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input ids, positions, metadata) of one prefill step: tokens [s, e) of each sequence, whose
    earlier tokens are already in the cache."""
    slots, positions, ids, starts = [], [], [], [0]
    width = max(len(t) for t in tables)
    for seq, blocks, (s, e) in zip(sequences, tables, spans):
        slots.extend(blocks[p // _BLOCK] * _BLOCK + p % _BLOCK for p in range(s, e))
        positions.extend(range(s, e))
        ids.extend(seq[s:e])
        starts.append(starts[-1] + e - s)
    qsl = torch.tensor(starts, dtype=torch.int32, device=device)
    ends = [e for _, e in spans]
    meta = AttentionMetadata(
        num_decodes=0, num_decode_tokens=0, query_start_loc=qsl,
        seq_lens=torch.tensor(ends, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(e - s for s, e in spans), max_seq_len=max(ends), max_decode_seq_len=0,
        prefill_query_start_loc=qsl,
    )
    return (torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device), meta)


@torch.inference_mode()
def sequence_nll(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                 kv_dtype: torch.dtype | None = None, chunk: int | None = None) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens) over the sequences:
    position t of each sequence predicts token t + 1 (logits in fp32). ``kv_dtype``: the KV cache's
    (None: the model's); ``chunk``: as in :func:`prefill_hidden`."""
    total, count = 0.0, 0
    for seq, h in zip(sequences, prefill_hidden(model, sequences, kv_dtype, chunk)):
        if len(seq) < 2:
            continue
        logits = model.compute_logits(h[:-1]).float()
        target = torch.tensor(seq[1:], dtype=torch.int64, device=logits.device)
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(seq) - 1
    return total, count


def perplexity(model: torch.nn.Module, token_ids: Sequence[int], window: int = 256,
               kv_dtype: torch.dtype | None = None, chunk: int | None = None) -> float:
    """exp(mean next-token NLL) of ``token_ids`` cut into consecutive windows of ``window`` tokens,
    each scored from its own start (all windows batched), with a KV cache of ``kv_dtype`` (None: the
    model's). ``chunk``: tokens per prefill step (None: the whole window in one step, or, for an FP8
    cache, 1: each position scored as a decode step reads the cache, every earlier token's K/V
    quantized; one whole-window step would attend to the fresh K/V only, see :func:`prefill_hidden`)."""
    windows = [list(token_ids[i:i + window]) for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if chunk is None and kv_dtype == torch.float8_e4m3fn:
        chunk = 1
    total, count = sequence_nll(model, windows, kv_dtype, chunk)
    return float(torch.exp(torch.tensor(total / count)))
