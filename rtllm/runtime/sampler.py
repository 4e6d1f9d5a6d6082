"""Sampler: picks the next token of every request in the batch in one vectorized pass.

``Sampler.sample(logits [B, V], rows)`` reads row ``i`` of ``logits`` with ``rows[i]`` and
returns one token per row (int64, on CPU). Semantics, in the order applied per row:

0. A row's logits processors (``SamplingRow.logits_processors``, rtllm.logits_processors) edit a
   float32 copy of its logits first; everything below, logprobs included, sees the result. A
   processor that raises or returns another shape leaves the row as it was and is reported in
   ``SamplerOutput.errors`` (the executor aborts that request).
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

Steps 5-6 run in ``rtllm.kernels.sampling.sample_tokens``: on CUDA one Triton program per row
finds the top-k / top-p cut-offs by a bounded search over the row (no sort) and runs the race;
elsewhere the torch reference above runs (a full sort for top-p). Given the same noise both pick
the same token, except where a run of tied logits straddles the top-p cut (the kernel keeps the
whole run) or two candidates tie to the last bits.

Invariants: ``logits`` is never modified; per-row parameters become [B] tensors and no python
loop runs over the vocabulary (loops only build padded token tensors, min_tokens index lists
and draw seeded noise); host lists reach the device with non-blocking copies, so a step has one
host sync (the final ``.cpu()``, plus the top-k lists when logprobs are asked) and none with
``to_cpu=False``; a row's generator must live on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtllm.kernels import sampling
from rtllm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request for one step."""

    params: SamplingParams
    generator: torch.Generator | None  # seeded from params.seed; None: the global RNG
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far
    eos_token_ids: frozenset[int]  # the model's EOS ids
    logits_processors: list | None = None  # BoundProcessor list (rtllm.logits_processors), run first


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, CPU
    logprobs: torch.Tensor | None  # [B] float32 raw logprob of each sampled token, CPU
    top_logprobs: list[list[tuple[int, float]] | None] | None  # per row top-k, desc; None: not asked
    errors: dict[int, str] | None = None  # row -> why its logits processor failed (that request must abort)


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


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device`` without a host sync (``torch.tensor(..., device=cuda)``
    copies synchronously)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 occurrence counts, via one scatter_add over a padded token tensor."""
    width = max(1, max(len(t) for t in token_lists))
    padded = torch.tensor([t + [vocab] * (width - len(t)) for t in token_lists], dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=device)
    padded = padded.to(device, non_blocking=True).clamp_(0, vocab)  # out-of-range ids land in the dropped pad column
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
        pen = _to_device(rep, torch.float32, dev).unsqueeze(1)
        x.copy_(torch.where(seen, torch.where(x < 0, x * pen, x / pen), x))
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    if any(f != 0.0 or p != 0.0 for f, p in zip(freq, pres)):
        counts = _token_counts(
            [r.output_token_ids if f != 0.0 or p != 0.0 else [] for r, f, p in zip(rows, freq, pres)],
            vocab,
            dev,
        )
        f_t = _to_device(freq, torch.float32, dev).unsqueeze(1)
        p_t = _to_device(pres, torch.float32, dev).unsqueeze(1)
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
        x[_to_device(ri, torch.int64, x.device), _to_device(ti, torch.int64, x.device)] = float("-inf")


@dataclass
class _RowParams:
    """Per-row sampling parameters as [B] tensors on the logits' device (greedy rows: temperature 0)."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float64, so that 1 - top_p is the Python value's
    min_p: torch.Tensor  # float32
    max_top_k: int

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab: int, device: torch.device) -> _RowParams:
        sampled = [not r.params.greedy for r in rows]
        ks = [min(r.params.top_k, vocab) if s else 0 for r, s in zip(rows, sampled)]
        return cls(
            _to_device([r.params.temperature if s else 0.0 for r, s in zip(rows, sampled)], torch.float32, device),
            _to_device(ks, torch.int64, device),
            _to_device([r.params.top_p if s else 1.0 for r, s in zip(rows, sampled)], torch.float64, device),
            _to_device([r.params.min_p if s else 0.0 for r, s in zip(rows, sampled)], torch.float32, device),
            max(ks),
        )


def _penalized(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """A float32 copy of ``logits`` with penalties and min_tokens masks applied (steps 2-4)."""
    x = logits.to(torch.float32, copy=True)
    if any(r.params.needs_penalties for r in rows):
        _apply_penalties(x, rows)
    _apply_min_tokens(x, rows)
    return x


def process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The logits each row samples from: a new float32 [B, V] tensor, filtered tokens at -inf.

    Greedy rows get penalties and min_tokens masks only (their argmax is the greedy token);
    sampled rows also get temperature, top-k, top-p and min-p (the torch reference's filter,
    on every device). ``logits`` is left untouched.
    """
    x = _penalized(logits, rows)
    if not all(r.params.greedy for r in rows):
        p = _RowParams.build(rows, x.shape[1], x.device)
        x = sampling.filter_logits_torch(x, p.temperature, p.top_k, p.top_p, p.min_p, max_top_k=p.max_top_k)
    return x


def apply_logits_processors(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, dict[int, str]]:
    """(a float32 copy of ``logits`` with each row's processors applied, row -> error of the rows whose
    processor failed: those rows keep their model logits)."""
    x = logits.to(torch.float32, copy=True)
    errors: dict[int, str] = {}
    for i, r in enumerate(rows):
        if not r.logits_processors:
            continue
        row = x[i].clone()
        for proc in r.logits_processors:
            try:
                out = proc(r.prompt_token_ids, r.output_token_ids, row)
                if not isinstance(out, torch.Tensor) or out.shape != row.shape:
                    raise TypeError(f"returned {type(out).__name__} "
                                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}, expected a tensor "
                                    f"of shape {tuple(row.shape)}")
                row = out.to(device=x.device, dtype=torch.float32)
            except Exception as e:
                errors[i] = f"logits processor {proc!r} failed: {type(e).__name__}: {e}"
                break
        else:
            x[i] = row
    return x, errors


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
        errors = None
        if any(r.logits_processors for r in rows):
            logits, errors = apply_logits_processors(logits, rows)
        if not _needs_processing(rows):
            tokens = sampling.argmax(logits)  # fast path: all greedy, nothing to apply
        else:
            x = _penalized(logits, rows)
            if all(r.params.greedy for r in rows):
                tokens = sampling.argmax(x)
            else:
                p = _RowParams.build(rows, x.shape[1], x.device)
                q = self._noise(x, rows)
                tokens = sampling.sample_tokens(x, p.temperature, p.top_k, p.top_p, p.min_p, q,
                                                max_top_k=p.max_top_k)
        ks = [r.params.logprobs for r in rows]
        if all(k is None for k in ks):
            return SamplerOutput(tokens.cpu() if to_cpu else tokens, None, None, errors or None)
        chosen, tops = compute_logprobs(logits, max(k for k in ks if k is not None), tokens)
        top_lists = [None if k is None else t[:k] for k, t in zip(ks, tops)]
        return SamplerOutput(tokens.cpu(), chosen, top_lists, errors or None)

    @staticmethod
    def _noise(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The race's noise q ~ Exp(1), [B, V] float32: each seeded sampled row's from its own
        generator, the rest from the global RNG (drawn for the whole batch when any row has none)."""
        q = torch.empty_like(x)
        if any(r.generator is None for r in rows):
            q.exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None and not r.params.greedy:
                q[i].exponential_(generator=r.generator)
        return q
