"""Sampler: picks the next token of every request in the batch in one vectorized pass.

``Sampler.sample(logits [B, V], rows)`` reads row ``i`` of ``logits`` with ``rows[i]`` and
returns one token per row (int64, on CPU). Semantics, in the order applied per row:

1. Logprobs come from the RAW logits (``log_softmax`` before penalties, masks and temperature,
   as vLLM does by default) and are computed only when some row sets ``params.logprobs``.
2. Repetition penalty (HF/CTRL rule) over the set of prompt + output tokens: a positive logit
   is divided by ``p``, a negative one multiplied by ``p``.
3. Presence / frequency penalties (OpenAI rule) over OUTPUT tokens only:
   ``logit -= frequency * count + presence * (count > 0)``.
4. min_tokens: while ``len(output_token_ids) < min_tokens`` the EOS ids (unless ``ignore_eos``)
   and ``stop_token_ids`` are set to -inf. ``ignore_eos`` masks nothing by itself.
5. Greedy rows (temperature 0) take the argmax of these logits; nothing below touches them.
6. Sampled rows: divide by temperature, then top-k (HF: keep every token >= the k-th largest,
   so ties at the boundary survive), top-p (HF ``TopPLogitsWarper`` exactly: sort ascending,
   drop tokens whose cumulative probability is <= 1 - top_p, always keep the top token; this is
   the smallest prefix of the descending order with mass >= top_p, a tie straddling the cut is
   split by sort order), min-p (drop tokens with prob < min_p * max prob), then the
   exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``. A row with a generator draws its
   ``q`` from it alone, so a seed gives the same tokens whatever else is in the batch.

Invariants: ``logits`` is never modified; per-row parameters become [B] tensors and no python
loop runs over the vocabulary (loops only build padded token tensors, min_tokens index lists
and draw seeded noise); CPU and CUDA use the same code with one host sync (the final ``.cpu()``,
plus the top-k lists when logprobs are asked); a row's generator must live on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtllm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request for one step."""

    params: SamplingParams
    generator: torch.Generator | None  # seeded from params.seed; None: the global RNG
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far
    eos_token_ids: frozenset[int]  # the model's EOS ids


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, CPU
    logprobs: torch.Tensor | None  # [B] float32 raw logprob of each sampled token, CPU
    top_logprobs: list[list[tuple[int, float]] | None] | None  # per row top-k, desc; None: not asked


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def compute_logprobs(
    logits: torch.Tensor, k: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, list[list[tuple[int, float]]]]:
    """log_softmax of raw logits [N, V] (in float32).

    Returns the logprob of ``token_ids[n]`` in row n ([N] float32, CPU) and, per row, the top-``k``
    ``(token_id, logprob)`` pairs sorted by descending logprob (empty lists when k == 0).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, token_ids.to(logp.device, torch.int64).view(-1, 1)).squeeze(1).cpu()
    if k <= 0:
        return chosen, [[] for _ in range(logp.shape[0])]
    vals, ids = torch.topk(logp, min(k, logp.shape[1]), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 occurrence counts, via one scatter_add over a padded token tensor."""
    width = max(1, max(len(t) for t in token_lists))
    padded = torch.tensor([t + [vocab] * (width - len(t)) for t in token_lists], dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=device)
    padded = padded.to(device).clamp_(0, vocab)  # out-of-range ids land in the dropped pad column
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: repetition (prompt + output), then frequency / presence (output only)."""
    vocab, dev = x.shape[1], x.device
    rep = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        seen = (
            _token_counts(
                [r.prompt_token_ids + r.output_token_ids if p != 1.0 else [] for r, p in zip(rows, rep)],
                vocab,
                dev,
            )
            > 0
        )
        pen = torch.tensor(rep, dtype=torch.float32, device=dev).unsqueeze(1)
        x.copy_(torch.where(seen, torch.where(x < 0, x * pen, x / pen), x))
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    if any(f != 0.0 or p != 0.0 for f, p in zip(freq, pres)):
        counts = _token_counts(
            [r.output_token_ids if f != 0.0 or p != 0.0 else [] for r, f, p in zip(rows, freq, pres)],
            vocab,
            dev,
        )
        f_t = torch.tensor(freq, dtype=torch.float32, device=dev).unsqueeze(1)
        p_t = torch.tensor(pres, dtype=torch.float32, device=dev).unsqueeze(1)
        x.sub_(f_t * counts + p_t * (counts > 0).float())


def _apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: -inf on EOS (unless ignore_eos) and stop ids of rows still below min_tokens."""
    ri: list[int] = []
    ti: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        banned = set(r.params.stop_token_ids or ())
        if not r.params.ignore_eos:
            banned |= r.eos_token_ids
        banned = {t for t in banned if 0 <= t < x.shape[1]}
        ri += [i] * len(banned)
        ti += sorted(banned)
    if ri:
        x[torch.tensor(ri, device=x.device), torch.tensor(ti, device=x.device)] = float("-inf")


def _warp(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on sampled rows (greedy rows pass through unchanged)."""
    vocab, dev = x.shape[1], x.device
    sampled = [not r.params.greedy for r in rows]
    temps = [r.params.temperature if s else 1.0 for r, s in zip(rows, sampled)]
    if any(t != 1.0 for t in temps):
        x = x / torch.tensor(temps, dtype=torch.float32, device=dev).unsqueeze(1)
    ks = [min(r.params.top_k, vocab) if s else 0 for r, s in zip(rows, sampled)]
    if any(ks):
        k_t = torch.tensor(ks, dtype=torch.int64, device=dev).unsqueeze(1)
        top = torch.topk(x, max(ks), dim=-1).values
        kth = top.gather(1, (k_t - 1).clamp_(min=0))
        x = x.masked_fill((x < kth) & (k_t > 0), float("-inf"))
    ps = [r.params.top_p if s else 1.0 for r, s in zip(rows, sampled)]
    if any(p < 1.0 for p in ps):
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        thr = torch.tensor([1.0 - p for p in ps], dtype=torch.float32, device=dev).unsqueeze(1)
        drop = (cum <= thr) & torch.tensor([p < 1.0 for p in ps], device=dev).unsqueeze(1)
        drop[:, -1] = False  # always keep the most probable token
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    mps = [r.params.min_p if s else 0.0 for r, s in zip(rows, sampled)]
    if any(m > 0.0 for m in mps):
        probs = x.softmax(dim=-1)
        m_t = torch.tensor(mps, dtype=torch.float32, device=dev).unsqueeze(1)
        x = x.masked_fill(probs < m_t * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The logits each row samples from: a new float32 [B, V] tensor, filtered tokens at -inf.

    Greedy rows get penalties and min_tokens masks only (their argmax is the greedy token);
    sampled rows also get temperature, top-k, top-p and min-p. ``logits`` is left untouched.
    """
    x = logits.to(torch.float32, copy=True)
    if any(r.params.needs_penalties for r in rows):
        _apply_penalties(x, rows)
    _apply_min_tokens(x, rows)
    if not all(r.params.greedy for r in rows):
        x = _warp(x, rows)
    return x


def _needs_processing(rows: list[SamplingRow]) -> bool:
    return any(
        not r.params.greedy or r.params.needs_penalties or len(r.output_token_ids) < r.params.min_tokens
        for r in rows
    )


class Sampler:
    """Batched token sampler; stateless (per-request RNG state lives in SamplingRow.generator)."""

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow], to_cpu: bool = True) -> SamplerOutput:
        """One token per row of ``logits`` [B, V]; ``rows[i]`` describes row i (see module doc).

        ``to_cpu=False`` leaves the token ids on the logits' device (no host sync; the overlap
        scheduler copies them later); only valid when no row asks for logprobs."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), "one SamplingRow per logits row"
        if not _needs_processing(rows):
            tokens = logits.argmax(dim=-1)  # fast path: all greedy, nothing to apply
        else:
            x = process_logits(logits, rows)
            greedy = [r.params.greedy for r in rows]
            if all(greedy):
                tokens = x.argmax(dim=-1)
            else:
                tokens = self._draw(x, rows)
                if any(greedy):
                    g_t = torch.tensor(greedy, device=x.device)
                    tokens = torch.where(g_t, x.argmax(dim=-1), tokens)
        ks = [r.params.logprobs for r in rows]
        if all(k is None for k in ks):
            return SamplerOutput(tokens.cpu() if to_cpu else tokens, None, None)
        chosen, tops = compute_logprobs(logits, max(k for k in ks if k is not None), tokens)
        top_lists = [None if k is None else t[:k] for k, t in zip(ks, tops)]
        return SamplerOutput(tokens.cpu(), chosen, top_lists)

    @staticmethod
    def _draw(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exponential race: argmax(probs / q), q ~ Exp(1) from each row's generator (or global)."""
        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs)
        if any(r.generator is None for r in rows):
            q.exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None and not r.params.greedy:
                q[i].exponential_(generator=r.generator)
        q.clamp_(min=torch.finfo(q.dtype).tiny)  # 0 noise would turn a 0-prob token into nan
        return probs.div_(q).argmax(dim=-1)
