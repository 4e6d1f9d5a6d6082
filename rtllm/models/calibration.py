"""Calibration at load time: AWQ's activation-aware scaling of a loaded model before INT4 quantization,
and the per-layer scales of an FP8 KV cache (``calibrate_kv_scales``, at the end of this module).

``apply_awq(model, quant_config, sequences)`` runs the dense model once over calibration token
sequences, records the input activations of every ``Linear`` (a subsample of rows), searches
each layer's per-input-channel scale ``s`` (rtllm.quantization.awq), multiplies the weight's
input channels by ``s`` and folds ``1/s`` into the op that produces the layer's input, exactly:

- ``qkv_proj`` <- ``input_layernorm`` weight, ``gate_up_proj`` <- ``post_attention_layernorm``
  weight (RMSNorm is ``w * normalized(x)``, so its weight absorbs a per-channel factor);
- ``down_proj`` <- the ``up`` rows of ``gate_up_proj`` (``silu(gate) * up`` is linear in up);
- ``o_proj`` <- the ``v`` rows of ``qkv_proj`` when every query head has its own KV head; under
  GQA a KV head feeds several heads whose channels want different scales, so the quantized layer
  keeps ``1/s`` and multiplies its input (``awq_input_scale``, one elementwise op);
- any other Linear (an unknown architecture) keeps ``1/s`` the same way.

Then AWQ's clipping search picks, per (row, group), how much to shrink the weight range before
rounding. The model is then quantized by rtllm.layers.quantized_linear as W4A16.

Calibration text is tokenized by a higher layer: ``register_calibration_tokenizer`` is called by
rtllm.tokenizer on import with a factory (tokenizer source -> encode function); ``load_model``
also takes an explicit ``calib_tokenize``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rtllm.errors import ConfigError
from rtllm.layers.attention import Attention
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import AWQ_INPUT_SCALE_ATTR
from rtllm.layers.quant.int4 import W4A16Linear
from rtllm.models.forward import prefill_hidden
from rtllm.quantization.awq import search_awq_clip, search_awq_scale
from rtllm.quantization.calib_data import calibration_texts
from rtllm.quantization.config import QuantConfig

logger = logging.getLogger(__name__)

Encode = Callable[[str], list[int]]
_tokenizer_factory: Callable[[object], Encode] | None = None

AWQ_MAX_ROWS = 512  # activation rows kept per layer for the scale search (a strided subsample)


def register_calibration_tokenizer(factory: Callable[[object], Encode]) -> None:
    """Install ``factory(tokenizer_source) -> encode(text) -> ids`` (rtllm.tokenizer does on import)."""
    global _tokenizer_factory
    _tokenizer_factory = factory


def calibration_encoder(tokenizer_source: object) -> Encode:
    if tokenizer_source is None:
        raise ConfigError("QuantConfig.quant_algo='W4A16_AWQ': calibration needs the model's tokenizer, and this "
                          "model has none (a bare config with random weights); use 'W4A16' instead")
    if _tokenizer_factory is None:
        raise ConfigError("QuantConfig.quant_algo='W4A16_AWQ': no calibration tokenizer is registered "
                          "(import rtllm.tokenizer, or pass calib_tokenize to load_model)")
    return _tokenizer_factory(tokenizer_source)


def calibration_sequences(encode: Encode, quant_config: QuantConfig) -> list[list[int]]:
    """``calib_size`` sequences of ``calib_max_seq_length`` tokens of calibration text (KJV)."""
    n, length = quant_config.calib_size, quant_config.calib_max_seq_length
    seqs = [encode(t)[:length] for t in calibration_texts(n, approx_chars=6 * length)]
    return [s for s in seqs if len(s) >= 2]


def prefill_observed(model: nn.Module, sequences: Sequence[Sequence[int]], kind: type[nn.Module],
                     observe: Callable[[str, nn.Module, tuple], None]) -> None:
    """One prefill pass over ``sequences`` with ``observe(name, module, args)`` called on the inputs
    of every module of type ``kind`` (forward pre-hooks, removed afterwards)."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: observe(name, mod, args))
             for name, m in model.named_modules() if isinstance(m, kind)]
    try:
        prefill_hidden(model, sequences)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def collect_linear_inputs(model: nn.Module, sequences: Sequence[Sequence[int]], max_rows: int = AWQ_MAX_ROWS,
                          ) -> dict[str, torch.Tensor]:
    """Input activations of every Linear over one forward pass: name -> [<= max_rows, K] fp32 (CPU)."""
    total = sum(len(s) for s in sequences)
    stride = max(1, total // max_rows)
    captured: dict[str, torch.Tensor] = {}

    def observe(name: str, _mod: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        captured[name] = x[::stride][:max_rows].float().cpu()

    prefill_observed(model, sequences, Linear, observe)
    return captured


def _fold_targets(model: nn.Module) -> dict[str, Callable[[torch.Tensor], None]]:
    """Linear name -> a function dividing the producer of its input by s, for the Llama-family layout."""
    out: dict[str, Callable[[torch.Tensor], None]] = {}
    prefix = {id(m): n for n, m in model.named_modules()}
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norm1, norm2 = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
        if attn is None or mlp is None or norm1 is None or norm2 is None:
            continue
        qkv, o = getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None)
        gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
        if not all(isinstance(m, Linear) for m in (qkv, o, gate_up, down)):
            continue

        def div_norm(s, norm=norm1):
            norm.weight.div_(s.to(norm.weight.dtype))
        out[prefix[id(qkv)]] = div_norm
        out[prefix[id(gate_up)]] = lambda s, norm=norm2: norm.weight.div_(s.to(norm.weight.dtype))
        inter = gate_up.output_sizes[1]

        def div_up(s, gu=gate_up, inter=inter):
            gu.weight[gu.out_features - inter:].div_(s.to(gu.weight.dtype)[:, None])
        out[prefix[id(down)]] = div_up
        if qkv.q_size == qkv.kv_size and qkv.bias is None:  # no GQA: v channel c feeds o channel c

            def div_v(s, qkv=qkv):
                qkv.weight[qkv.q_size + qkv.kv_size:].div_(s.to(qkv.weight.dtype)[:, None])
            out[prefix[id(o)]] = div_v
    return out


@torch.no_grad()
def apply_awq(model: nn.Module, quant_config: QuantConfig, sequences: Sequence[Sequence[int]],
              clip: bool = True) -> dict[str, float]:
    """Scale (and clip) the dense model's Linear weights for INT4, in place; see the module doc.

    Returns layer name -> output-error ratio AWQ / round-to-nearest on the calibration rows."""
    t0 = time.perf_counter()
    acts = collect_linear_inputs(model, sequences)
    t1 = time.perf_counter()
    folds = _fold_targets(model)
    ratios: dict[str, float] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    for name, lin in layers:
        g = quant_config.resolve_group_size(lin.in_features)
        if g is None or name not in acts or W4A16Linear.supports(lin.out_features, lin.weight.device):
            continue  # stays dense: leave it exactly as loaded
        x = acts.pop(name).to(lin.weight.device)
        s, err, rtn = search_awq_scale(x, lin.weight, g)
        w = lin.weight.float() * s
        if clip:
            w = search_awq_clip(x / s, w, g)
        lin.weight.copy_(w.to(lin.weight.dtype))
        fold = folds.get(name)
        if fold is not None:
            fold(s.to(lin.weight.device))
        else:
            setattr(lin, AWQ_INPUT_SCALE_ATTR, (1.0 / s).to(lin.weight.dtype))
        ratios[name] = err / rtn if rtn > 0 else 1.0
    logger.info("W4A16_AWQ: calibrated %d layers on %d sequences (%d tokens): activations %.1f s, search %.1f s; "
                "mean output error vs round-to-nearest %.2f", len(ratios), len(sequences),
                sum(len(s) for s in sequences), t1 - t0, time.perf_counter() - t1,
                sum(ratios.values()) / max(len(ratios), 1))
    return ratios


FP8_KV_MAX = 448.0  # largest finite float8_e4m3fn: a layer's amax maps onto it


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, sequences: Sequence[Sequence[int]]) -> dict[str, tuple[float, float]]:
    """Set every attention layer's FP8 KV-cache scales from one prefill pass over ``sequences``:
    ``k_scale = amax(|RoPE(k)|) / 448`` (the keys as the cache stores them: k-normed where the model
    has q/k norms, and rotated at their positions by the layer's own RotaryEmbedding)
    and ``v_scale = amax(|v|) / 448``. The pass itself runs with the model's own cache dtype.
    Returns {layer name: (k_scale, v_scale)}; a layer that saw only zeros keeps 1.0."""
    amax: dict[str, list[float]] = {}

    def observe(name: str, mod: nn.Module, args: tuple) -> None:
        positions, _q, k, v = args[:4]
        rotated = mod.cached_keys(positions.long(), k)
        seen = amax.setdefault(name, [0.0, 0.0])
        seen[0] = max(seen[0], float(rotated.abs().max()))
        seen[1] = max(seen[1], float(v.float().abs().max()))

    prefill_observed(model, sequences, Attention, observe)
    scales = {}
    for name, m in model.named_modules():
        if name in amax:
            k_amax, v_amax = amax[name]
            m.k_scale = k_amax / FP8_KV_MAX if k_amax > 0 else 1.0
            m.v_scale = v_amax / FP8_KV_MAX if v_amax > 0 else 1.0
            scales[name] = (m.k_scale, m.v_scale)
    return scales
