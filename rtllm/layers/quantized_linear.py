"""Quantized linear layers: replace a loaded model's Linear layers by packed ones, in place.

Applied after the checkpoint is loaded: ``quantize_linear_layers(model, quant_config)`` replaces
every ``Linear`` (and its fused subclasses ``MergedLinear`` / ``QKVLinear``) by the layer of the
configured format (rtllm.layers.quant): ``FP8Linear``, ``W8A16Linear``, ``W4A16Linear`` (W4A16
and W4A16_AWQ) or ``NVFP4Linear``. A fused weight is quantized as a whole: scales are per output
row (FP8, INT8) or per (row, group along the input) (INT4, NVFP4's blocks), so a fused q|k|v or
gate|up matrix quantizes exactly like its parts. (NVFP4's one per-tensor scale is the exception:
shared by the fused parts, which only moves where the e4m3 block scales fall.) The new layer
keeps the plain attributes of the old one (``q_size``, ``output_sizes``...), so model code
never knows.

The token embedding and the LM head (rtllm.layers.embedding's ``VocabEmbedding`` / ``LMHead``) become
INT8 with one absmax scale per vocabulary row, whatever ``quant_algo`` is (``quantize_vocab_layers``,
rtllm.layers.quant.vocab): the embedding gathers and dequantizes only the looked-up rows, the LM head
runs as a ``W8A16Linear``, and a tied pair shares one int8 table and its scales. Norms stay in the
model dtype. ``QuantConfig.exclude_modules`` keeps the modules it names (linear layers included) in
the model dtype; a pattern that matches no module this would quantize is a ConfigError.

W4A16_AWQ expects the model already calibrated (rtllm.models.calibration.apply_awq): weights
scaled by AWQ's per-input-channel ``s`` and ``1/s`` folded into the previous op, or left on the
layer as ``awq_input_scale`` where it could not be folded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from rtllm.errors import ConfigError
from rtllm.layers.embedding import LMHead, VocabEmbedding
from rtllm.layers.linear import Linear
from rtllm.layers.parallel_linear import VocabParallelEmbedding
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.layers.quant.fp8 import FP8Linear
from rtllm.layers.quant.int4 import DEQUANT_MIN_TOKENS, KERNEL_DTYPE, W4A16Linear, w4_backend
from rtllm.layers.quant.int8 import W8A16Linear
from rtllm.layers.quant.nvfp4 import NVFP4Linear
from rtllm.layers.quant.vocab import Int8Embedding, int8_lm_head
from rtllm.quantization.config import (
    FP8,
    NVFP4,
    W4A16,
    W4A16_AWQ,
    W4A16_GROUP_SIZES,
    W8A16,
    QuantConfig,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEQUANT_MIN_TOKENS", "KERNEL_DTYPE", "FP8Linear", "Int8Embedding", "NVFP4Linear", "QuantizeReport",
    "QuantizedLinear", "W4A16Linear", "W8A16Linear", "choose_group_size", "quantize_linear_layers",
    "estimate_weight_bytes", "quantize_vocab_layers",
]


def choose_group_size(in_features: int, requested: int) -> int | None:
    """The largest supported INT4 group <= ``requested`` that divides ``in_features`` (None: none does)."""
    for g in sorted(W4A16_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return None


@dataclass
class QuantizeReport:
    """What quantize_linear_layers did: linear layer name -> group size used (0: per-channel), the
    linear layers it left dense (why), the embedding / LM head it made INT8 (name -> how), and the
    modules ``exclude_modules`` kept in the model dtype."""

    quantized: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    vocab: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def vocab_summary(self) -> str:
        """One phrase for the load log: what happened to the embedding and the LM head."""
        parts = [f"{n}: {how}" for n, how in self.vocab.items()]
        if self.excluded:
            parts.append(f"kept in the model dtype by exclude_modules: {self.excluded}")
        return "; ".join(parts) or "no embedding / LM head quantized"


def _vocab_modules(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(embeddings, LM heads) of the model that quantize_vocab_layers can replace: the plain
    single-rank layers (the vocab-parallel ones do not run quantized)."""
    embeds = [(n, m) for n, m in model.named_modules() if type(m) is VocabEmbedding]
    heads = [(n, m) for n, m in model.named_modules() if type(m) is LMHead]
    return embeds, heads


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _vocab_names(model: nn.Module) -> list[str]:
    """Names exclude_modules may match besides the linear layers: the embedding(s) and LM head, also
    the vocab-parallel ones of a model split across ranks (which stay dense: see _split_vocab)."""
    return [n for n, m in model.named_modules() if isinstance(m, (VocabEmbedding, LMHead, VocabParallelEmbedding))]


def _split_vocab(model: nn.Module) -> list[str]:
    """The vocab-parallel embedding / LM head of a model split across ranks: not quantized yet."""
    return [n for n, m in model.named_modules() if isinstance(m, VocabParallelEmbedding)]


@torch.no_grad()
def quantize_vocab_layers(model: nn.Module, quant_config: QuantConfig | None, report: QuantizeReport | None = None,
                          check_patterns: bool = True) -> QuantizeReport:
    """Make the model's token embedding(s) and LM head INT8 per row, in place (rtllm.layers.quant.vocab),
    except the modules ``quant_config.exclude_modules`` names. A tied pair (the head's weight is the
    embedding's) becomes one int8 table and one scale vector held by both; excluding either keeps both.

    Used by quantize_linear_layers, and alone for a pre-quantized checkpoint (whose linear layers
    are quantized already): ``quant_config`` then has no quant_algo and may be None.
    ``check_patterns``: raise ConfigError for an exclude_modules pattern that matches neither module."""
    report = report if report is not None else QuantizeReport()
    qc = quant_config if quant_config is not None else QuantConfig()
    embeds, heads = _vocab_modules(model)
    if check_patterns:
        qc.check_exclude_modules([n for n, _ in embeds + heads], "that rtllm quantizes here (on a pre-quantized "
                                 "checkpoint: only the token embedding and the LM head)")
    for n in _split_vocab(model):
        if not qc.excludes(n):
            report.skipped[n] = "vocab-parallel (split across ranks): the INT8 tables are not split yet"
    excluded = {n for n, _ in embeds + heads if qc.excludes(n)}
    tied = {hn: en for hn, h in heads for en, e in embeds if h.weight is e.weight}
    keep = set(excluded)
    ours = {id(m) for _, m in embeds + heads}
    for n, m in embeds + heads:
        if n in keep:
            continue
        if m.weight.device.type not in ("cpu", "cuda"):
            report.skipped[n] = f"on {m.weight.device}: the INT8 embedding / LM head run on CPU / CUDA only"
        elif any(p is m.weight for mod in model.modules() if id(mod) not in ours
                 for p in mod.parameters(recurse=False)):
            report.skipped[n] = "its weight is shared with a module that is not quantized"
        else:
            continue
        keep.add(n)
    for pair in tied.items():  # one table for both uses: kept dense if either is kept
        for a, b in (pair, pair[::-1]):
            if a in keep and b not in keep:
                keep.add(b)
                if a in report.skipped:
                    report.skipped[b] = f"tied to {a}, which stays dense"
    report.excluded.extend(n for n, _ in embeds + heads if n in keep and n not in report.skipped)
    done: dict[str, Int8Embedding] = {}
    for n, m in embeds:
        if n not in keep:
            new = Int8Embedding.from_embedding(m)
            _replace(model, n, new)
            done[n] = new
            report.vocab[n] = "int8, one scale per row"
    for n, m in heads:
        if n in keep:
            continue
        if n in tied:
            _replace(model, n, int8_lm_head(m, done[tied[n]]))
            report.vocab[n] = f"W8A16 linear holding {tied[n]}'s int8 table (tied)"
        else:
            _replace(model, n, int8_lm_head(m))
            report.vocab[n] = "W8A16 linear, one scale per row"
    return report


def _quantize_one(layer: Linear, qc: QuantConfig) -> tuple[nn.Module | None, int, str]:
    """(new layer or None when it stays dense, group size used, why it stayed dense)."""
    algo = qc.quant_algo
    K, N = layer.in_features, layer.out_features
    if algo in (W4A16, W4A16_AWQ):
        g = qc.resolve_group_size(K)  # an explicit group that does not divide K raises ConfigError
        if g is None:
            return None, 0, f"in_features={K} is not a multiple of {min(W4A16_GROUP_SIZES)}"
        why = W4A16Linear.supports(N, layer.weight.device)
        return (None, 0, why) if why else (W4A16Linear.from_linear(layer, g), g, "")
    if algo == NVFP4:
        g = qc.resolve_group_size(K)
        if g is None:
            return None, 0, f"in_features={K} is not a multiple of the NVFP4 block (16)"
        return NVFP4Linear.from_linear(layer), g, ""
    if algo == W8A16:
        return W8A16Linear.from_linear(layer), 0, ""
    if algo == FP8:
        why = FP8Linear.supports(K, N)
        return (None, 0, why) if why else (FP8Linear.from_linear(layer), 0, "")
    raise ConfigError(f"QuantConfig.quant_algo={algo!r}: no layer implementation")  # pragma: no cover


def quantize_linear_layers(model: nn.Module, quant_config: QuantConfig | None,
                           check_patterns: bool = True) -> QuantizeReport:
    """Replace the model's loaded Linear layers by quantized ones, in place (after weights are loaded).

    A layer the format cannot hold (e.g. INT4 with no group dividing in_features under
    group_size=None, or out_features not a multiple of 16 for the CPU int4 packer) stays dense
    and is reported in ``skipped``; an explicit group_size that does not divide a layer's
    in_features raises ConfigError before any layer is replaced."""
    report = QuantizeReport()
    if quant_config is None or not quant_config.enabled:
        return report
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    if check_patterns:  # False: checked by the caller against the whole model (a pipeline stage holds a part)
        quant_config.check_exclude_modules([n for n, _ in linears] + _vocab_names(model))
    targets = [(name, m) for name, m in linears if not quant_config.excludes(name)]
    report.excluded.extend(name for name, _ in linears if quant_config.excludes(name))
    for name, layer in targets:  # validate everything first: no half-quantized model on error
        quant_config.check_device(layer.weight.device)
        if layer.weight.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"QuantConfig.quant_algo={quant_config.quant_algo!r}: runs on CPU / CUDA only "
                              f"(layer {name} is on {layer.weight.device})")
        if quant_config.grouped:
            try:
                quant_config.resolve_group_size(layer.in_features)
            except ConfigError as e:
                raise ConfigError(f"{e} [layer {name}]") from None
        if quant_config.quant_algo in (W4A16, W4A16_AWQ):
            w4_backend(layer.weight.device)
    for name, layer in targets:
        new, g, why = _quantize_one(layer, quant_config)
        if new is None:
            report.skipped[name] = why
            continue
        _replace(model, name, new)
        report.quantized[name] = g
    return quantize_vocab_layers(model, quant_config, report, check_patterns=False)


def _quantized_layer_bytes(algo: str, N: int, K: int, g: int | None) -> int:
    """Bytes of one quantized [N, K] weight with its scales (the layers' layouts, bias not included)."""
    if algo in (FP8, W8A16):
        return N * K + 4 * N  # one byte a weight + an fp32 scale per row
    if algo in (W4A16, W4A16_AWQ):
        return N * K // 2 + 2 * 2 * (K // g) * N  # 4-bit codes + a bf16 scale and zero per (group, row)
    if algo == NVFP4:
        return N * K // 2 + N * (K // 16) + 4  # e2m1 codes + an e4m3 scale per 16 inputs + one fp32
    raise ConfigError(f"QuantConfig.quant_algo={algo!r}: no layer implementation")  # pragma: no cover


def estimate_weight_bytes(model: nn.Module, quant_config: QuantConfig | None, device_type: str = "cuda") -> int:
    """The weight bytes ``model`` (dense, e.g. built on the meta device) would have after
    quantize_linear_layers with ``quant_config`` on ``device_type``, from shapes alone: the same
    choices (groups, exclusions, layers left dense, the tied INT8 table counted once) and each
    format's layout. Not counted: AWQ's input scales on layers where 1/s cannot be folded (K values
    in the model dtype per such layer, e.g. o_proj under GQA). None / no quant_algo: the dense bytes."""
    seen: set[int] = set()

    def dense(params) -> int:
        n = 0
        for p in params:
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        return n

    if quant_config is None or not quant_config.enabled:
        return dense(model.parameters())
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    quant_config.check_exclude_modules([n for n, _ in linears] + _vocab_names(model))
    total = 0
    for name, m in linears:
        K, N = m.in_features, m.out_features
        g = quant_config.resolve_group_size(K) if quant_config.grouped else None
        algo = quant_config.quant_algo
        stays = (quant_config.excludes(name) or (quant_config.grouped and g is None)
                 or (algo == FP8 and FP8Linear.supports(K, N) is not None)
                 or (algo in (W4A16, W4A16_AWQ) and W4A16Linear.supports(N, torch.device(device_type)) is not None))
        if stays:
            total += dense([m.weight, m.bias])
        else:
            seen.add(id(m.weight))
            total += _quantized_layer_bytes(algo, N, K, g) + dense([m.bias])
    embeds, heads = _vocab_modules(model)
    vocab = embeds + heads
    for _, m in vocab:
        tied = [n for n, x in vocab if x.weight is m.weight]  # a tied pair is one table: both or neither
        if any(quant_config.excludes(n) for n in tied):
            total += dense([m.weight])
        elif id(m.weight) not in seen:
            seen.add(id(m.weight))
            V, H = m.weight.shape
            total += V * H + 4 * V  # int8 codes + an fp32 scale per row; a tied pair holds one table
    return total + dense(model.parameters())
