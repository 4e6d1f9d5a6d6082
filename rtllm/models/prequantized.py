"""Pre-quantized Hugging Face checkpoints (FP8, AWQ, GPTQ) loaded onto rtllm's quantized layers.

``config.json``'s ``quantization_config`` names the layout (rtllm.quantization.hf_formats has the
tensor layouts and their math). Loading goes in two steps around the model's ``load_weights``:

1. ``divert(weights)`` keeps each linear layer's quantized tensors (``qweight``, ``qzeros``,
   ``scales``, ``g_idx``, float8 ``weight`` + ``weight_scale``...) aside and passes every other
   tensor (embeddings, norms, biases, layers left unquantized) to the model as usual. Quantized
   tensors of a layer that is not an rtllm ``Linear`` (e.g. a quantized LM head) are dequantized and
   passed on as that layer's ``weight``.
2. ``apply(model)`` replaces each ``Linear`` whose parts were quantized: FP8 -> ``FP8Linear`` (per-tensor
   scales become per-channel ones, so a fused q|k|v or gate|up concatenates its parts exactly), AWQ and
   4-bit GPTQ -> ``W4A16Linear`` (zero points become rtllm's ``zeros = (8 - z) * s``; act-order GPTQ
   keeps an input permutation). Layouts no rtllm layer holds (FP8 block scales, 8-bit GPTQ, groups
   the INT4 kernels do not take, act-order parts with different orders, shapes a kernel refuses) are
   dequantized into the dense layer, and the loader logs which and why.

The model is still built dense first, so loading peaks at the dense model's memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

from rtllm.errors import ConfigError, ModelLoadError
from rtllm.layers.linear import Linear
from rtllm.layers.quant import FP8Linear, W4A16Linear
from rtllm.quantization.config import FP8, W4A16_GROUP_SIZES, QuantConfig
from rtllm.quantization.hf_formats import (
    QUANT_TENSOR_NAMES,
    CheckpointQuant,
    awq_to_w4,
    dequantize_awq,
    dequantize_fp8_checkpoint,
    dequantize_gptq,
    fp8_channel_scales,
    gptq_to_w4,
    parse_quantization_config,
)

logger = logging.getLogger(__name__)

_FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# tensors each layout reads; anything else diverted is reported as ignored
_USED = {"fp8": {"weight", "weight_scale", "weight_scale_inv"}, "awq": {"qweight", "qzeros", "scales"},
         "gptq": {"qweight", "qzeros", "scales", "g_idx"}}
_WHY_IGNORED = {"input_scale": "static activation scales: rtllm quantizes activations per token at run time",
                "k_scale": "KV cache scales: the KV cache stays in the model dtype",
                "v_scale": "KV cache scales: the KV cache stays in the model dtype",
                "kv_scale": "KV cache scales: the KV cache stays in the model dtype",
                "output_scale": "KV cache scales: the KV cache stays in the model dtype"}


def read_checkpoint_quant(model_dir: str) -> CheckpointQuant | None:
    """The checkpoint's quantization from ``model_dir/config.json`` (None: not pre-quantized)."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig.from_file reports a bad config.json
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return None if qc is None else parse_quantization_config(qc, path)


def check_no_quant_config(quant: CheckpointQuant, quant_config: QuantConfig | None, source: str) -> None:
    if quant_config is not None and quant_config.enabled:
        raise ConfigError(f"QuantConfig.quant_algo={quant_config.quant_algo!r}: {source} is already quantized "
                          f"(quant_method {quant.method!r}); load it without quant_algo")


def _has_weight(d: dict[str, torch.Tensor]) -> bool:
    return "weight" in d or "qweight" in d or "weight_packed" in d


class PrequantizedLoader:
    """Holds a checkpoint's quantized tensors while the model loads, then builds the quantized layers."""

    def __init__(self, quant: CheckpointQuant, model: nn.Module, source: str) -> None:
        self.quant, self.model, self.source = quant, model, source
        self.store: dict[str, dict[str, torch.Tensor]] = {}
        self.ignored: Counter[str] = Counter()
        # rtllm Linear name -> its checkpoint prefixes, in output-row order (fused layers have several)
        self.targets: dict[str, list[str]] = {}
        stacked = getattr(model, "stacked_params", [])
        for name, m in model.named_modules():
            if not isinstance(m, Linear):
                continue
            head, _, last = name.rpartition(".")
            parts = [(ckpt, shard) for ckpt, fused, shard in stacked if fused == last]
            if parts:
                index = getattr(m, "_index", None)
                parts.sort(key=lambda p: index[p[1]] if index is not None else int(p[1]))
                self.targets[name] = [f"{head}.{ckpt}" if head else ckpt for ckpt, _ in parts]
            else:
                self.targets[name] = [name]
        self.part_of = {p for prefixes in self.targets.values() for p in prefixes}

    # -- step 1 -------------------------------------------------------------------------------
    def divert(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in weights:
            prefix, _, leaf = name.rpartition(".")
            if leaf in QUANT_TENSOR_NAMES or (leaf == "weight" and t.dtype in _FP8_TYPES):
                self.store.setdefault(prefix, {})[leaf] = t
                continue
            yield name, t
        for prefix in [p for p in self.store if p not in self.part_of]:
            d = self.store.pop(prefix)
            if _has_weight(d):
                logger.info("%s: %s is quantized but not a linear layer rtllm quantizes: dequantized",
                            self.source, prefix)
                yield f"{prefix}.weight", self._dequantize(prefix, d)
            else:
                self.ignored.update(d)

    # -- step 2 -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> set[str]:
        """Replace (or fill, when dequantized) every Linear whose parts the checkpoint quantized; returns
        the names of the dense ``weight`` parameters that this satisfied."""
        done: set[str] = set()
        built: Counter[str] = Counter()
        dequantized: Counter[str] = Counter()
        for lin_name, prefixes in self.targets.items():
            parts = [self.store.pop(p, {}) for p in prefixes]
            for d in parts:
                self.ignored.update(k for k in d if k not in _USED[self.quant.kind])
            quantized = [_has_weight(d) for d in parts]
            if not any(quantized):
                continue
            lin = self.model.get_submodule(lin_name)
            if not all(quantized):  # some parts dense in the checkpoint: keep the layer dense
                self._fill_dense(lin, prefixes, parts, quantized)
                dequantized["some parts of the fused layer are not quantized"] += 1
                continue
            new, why = self._build(lin, prefixes, parts)
            if new is None:
                self._fill_dense(lin, prefixes, parts, quantized)
                dequantized[why] += 1
            else:
                new.copy_attributes(lin)
                parent_name, _, child = lin_name.rpartition(".")
                setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, new)
                built[f"{type(new).__name__}{self._group_note(new)}"] += 1
            done.add(f"{lin_name}.weight")
        logger.info("%s: pre-quantized %s checkpoint: %s", self.source, self.quant.method,
                    ", ".join(f"{n} x {k}" for k, n in built.items()) or "no layers kept quantized")
        for why, n in dequantized.items():
            logger.warning("%s: %d linear layers dequantized to %s: %s", self.source, n,
                           next(self.model.parameters()).dtype, why)
        for leaf, n in self.ignored.items():
            logger.info("%s: ignored %d '%s' tensors (%s)", self.source, n, leaf,
                        _WHY_IGNORED.get(leaf, "not used by this layout"))
        return done

    @staticmethod
    def _group_note(layer: nn.Module) -> str:
        g = getattr(layer, "group_size", None)
        perm = " act-order" if getattr(layer, "input_perm", None) is not None else ""
        return f" (group {g}{perm})" if g else ""

    def _fill_dense(self, lin: Linear, prefixes: list[str], parts: list[dict], quantized: list[bool]) -> None:
        row = 0
        for prefix, d, q in zip(prefixes, parts, quantized):
            rows = lin.output_sizes[prefixes.index(prefix)] if len(prefixes) > 1 else lin.out_features
            if q:
                w = self._dequantize(prefix, d)
                if w.shape != (rows, lin.in_features):
                    raise ModelLoadError(f"{self.source}: {prefix} dequantizes to {tuple(w.shape)}, the model "
                                         f"expects {(rows, lin.in_features)}")
                lin.weight[row:row + rows].copy_(w.to(lin.weight.dtype))
            row += rows

    def _dequantize(self, prefix: str, d: dict[str, torch.Tensor]) -> torch.Tensor:
        q = self.quant
        try:
            if "weight_packed" in d:
                raise ModelLoadError(f"{self.source}: {prefix}.weight_packed: packed compressed-tensors "
                                     f"weights are not supported (FP8 compressed-tensors checkpoints are)")
            if q.kind == "fp8":
                scale = d.get("weight_scale", d.get("weight_scale_inv"))
                if "weight" not in d or scale is None:
                    raise ModelLoadError(f"{self.source}: {prefix} has no FP8 weight + weight_scale pair "
                                         f"(found {sorted(d)})")
                return dequantize_fp8_checkpoint(d["weight"], scale)
            if "qweight" not in d or "scales" not in d:
                raise ModelLoadError(f"{self.source}: {prefix}: a {q.method} layer needs qweight and scales "
                                     f"(found {sorted(d)})")
            if q.kind == "awq":
                return dequantize_awq(d["qweight"], d.get("qzeros"), d["scales"])
            if "qzeros" not in d:
                raise ModelLoadError(f"{self.source}: {prefix}: a gptq layer needs qzeros (found {sorted(d)})")
            return dequantize_gptq(d["qweight"], d["qzeros"], d["scales"], d.get("g_idx"), q.bits, q.zero_offset)
        except (ValueError, RuntimeError, IndexError) as e:
            raise ModelLoadError(f"{self.source}: {prefix}: malformed {q.method} tensors: {e}") from e

    def _build(self, lin: Linear, prefixes: list[str], parts: list[dict]) -> tuple[nn.Module | None, str]:
        """(the quantized layer, "") or (None, why it stays dense)."""
        for prefix, d in zip(prefixes, parts):
            if "weight_packed" in d:
                self._dequantize(prefix, d)  # raises: packed compressed-tensors weights are not supported
        device = lin.weight.device
        K, N = lin.in_features, lin.out_features
        if self.quant.kind == "fp8":
            return self._build_fp8(lin, prefixes, parts, device)
        if self.quant.kind == "gptq" and self.quant.bits != 4:
            return None, f"{self.quant.bits}-bit GPTQ has no rtllm layer (W8A16 is per channel, without zero points)"
        codes, scales, zeros, perms = [], [], [], []
        for prefix, d in zip(prefixes, parts):
            if "qweight" not in d or "scales" not in d or (self.quant.kind == "gptq" and "qzeros" not in d):
                self._dequantize(prefix, d)  # raises the error that names what is missing
            try:
                if self.quant.kind == "awq":
                    c, s, z = awq_to_w4(d["qweight"], d.get("qzeros"), d["scales"])
                    perm = None
                else:
                    out = gptq_to_w4(d["qweight"], d["qzeros"], d["scales"], d.get("g_idx"), self.quant.zero_offset)
                    if out is None:
                        return None, "g_idx does not sort into equal contiguous groups"
                    c, s, z, perm = out
            except (ValueError, RuntimeError, IndexError) as e:
                raise ModelLoadError(f"{self.source}: {prefix}: malformed {self.quant.method} tensors: {e}") from e
            codes.append(c)
            scales.append(s)
            zeros.append(z)
            perms.append(perm)
        if any(s.shape[0] != scales[0].shape[0] for s in scales):
            return None, "the fused parts have different group sizes"
        if any((p is None) != (perms[0] is None) or (p is not None and not torch.equal(p, perms[0]))
               for p in perms):
            return None, "the fused parts have different act-order permutations"
        c = torch.cat(codes, 0)
        if c.shape != (N, K):
            raise ModelLoadError(f"{self.source}: {'+'.join(prefixes)} unpack to {tuple(c.shape)}, the model expects "
                                 f"{(N, K)}")
        G = scales[0].shape[0]
        g = K // G
        if K % G or g not in W4A16_GROUP_SIZES:
            return None, f"group size {K / G:g}: the INT4 kernels take {list(W4A16_GROUP_SIZES)}"
        why = W4A16Linear.supports(N, device)
        if why:
            return None, why
        perm = None if perms[0] is None else perms[0].to(device)
        return W4A16Linear.from_codes(c.to(device), torch.cat(scales, 1).to(device), torch.cat(zeros, 1).to(device),
                                      g, lin.bias, input_perm=perm), ""

    def _build_fp8(self, lin: Linear, prefixes: list[str], parts: list[dict], device: torch.device,
                   ) -> tuple[nn.Module | None, str]:
        ws, ss = [], []
        for prefix, d in zip(prefixes, parts):
            w, s = d.get("weight"), d.get("weight_scale", d.get("weight_scale_inv"))
            if w is None or s is None:
                self._dequantize(prefix, d)  # raises the error that names what is missing
            if w.dtype != torch.float8_e4m3fn:
                return None, f"FP8 weights in {w.dtype} (FP8Linear takes float8_e4m3fn)"
            ch = fp8_channel_scales(s, w.shape[0])
            if ch is None:
                return None, f"FP8 block scales ({tuple(s.shape)}): FP8Linear has per-channel scales"
            ws.append(w)
            ss.append(ch)
        w = torch.cat(ws, 0)
        if w.shape != (lin.out_features, lin.in_features):
            raise ModelLoadError(f"{self.source}: {'+'.join(prefixes)} weights are {tuple(w.shape)}, the model "
                                 f"expects {(lin.out_features, lin.in_features)}")
        why = FP8Linear.supports(lin.in_features, lin.out_features)
        if why:
            return None, why
        try:
            QuantConfig(FP8).check_device(device)
        except ConfigError as e:
            return None, str(e)
        return FP8Linear(lin.in_features, lin.out_features, w.to(device), torch.cat(ss).to(device), lin.bias), ""
