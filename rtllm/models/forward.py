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
                   dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Hidden states [len(seq), hidden] for each token sequence, from one batched prefill.

    ``dtype``: the KV cache's (the model dtype; torch.float8_e4m3fn for an FP8 cache, quantized with
    each attention layer's k_scale / v_scale); None takes the model dtype, its norms' (the embedding
    and linear weights may be quantized)."""
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
        tables, slots, positions, ids = [], [], [], []
        nxt = 1  # block 0 is the null block
        for seq, n, nb in zip(sequences, lens, nblocks):
            blocks = list(range(nxt, nxt + nb))
            nxt += nb
            tables.append(blocks + [0] * (max(nblocks) - nb))
            slots.extend(blocks[p // _BLOCK] * _BLOCK + p % _BLOCK for p in range(n))
            positions.extend(range(n))
            ids.extend(seq)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        qsl = torch.tensor(starts, dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            num_decodes=0, num_decode_tokens=0, query_start_loc=qsl,
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(lens), max_seq_len=max(lens), max_decode_seq_len=0, prefill_query_start_loc=qsl,
        )
        hidden = model(torch.tensor(ids, dtype=torch.int64, device=device),
                       torch.tensor(positions, dtype=torch.int64, device=device), meta)
    finally:
        for layer, (k, v) in zip(layers, saved):
            layer.k_cache, layer.v_cache = k, v
    return list(hidden.split(lens))


@torch.inference_mode()
def sequence_nll(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                 kv_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens) over the sequences:
    position t of each sequence predicts token t + 1 (logits in fp32). ``kv_dtype``: the KV cache's
    (None: the model's)."""
    total, count = 0.0, 0
    for seq, h in zip(sequences, prefill_hidden(model, sequences, kv_dtype)):
        if len(seq) < 2:
            continue
        logits = model.compute_logits(h[:-1]).float()
        target = torch.tensor(seq[1:], dtype=torch.int64, device=logits.device)
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(seq) - 1
    return total, count


def perplexity(model: torch.nn.Module, token_ids: Sequence[int], window: int = 256,
               kv_dtype: torch.dtype | None = None) -> float:
    """exp(mean next-token NLL) of ``token_ids`` cut into consecutive windows of ``window`` tokens,
    each scored from its own start (all windows in one batched prefill), with a KV cache of
    ``kv_dtype`` (None: the model's)."""
    windows = [list(token_ids[i:i + window]) for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    total, count = sequence_nll(model, windows, kv_dtype)
    return float(torch.exp(torch.tensor(total / count)))
