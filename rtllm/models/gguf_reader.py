"""Read a llama.cpp GGUF file into a Hugging Face-shaped checkpoint.

``load_gguf(path)`` returns a :class:`GGUFCheckpoint` whose ``config`` is a transformers-v4 style
``config.json`` dict and whose ``tensors`` use HF parameter names and HF shapes, dequantized to
float32. Invariants:

- a tensor's torch shape is GGUF's shape reversed (GGUF lists the fastest-moving dimension first),
  so ``token_embd.weight`` becomes ``model.embed_tokens.weight`` [vocab, hidden];
- for ``llama`` files the row permutation llama.cpp's converter applies to q_proj / k_proj (rotary
  halves interleaved per head) is undone, so the tensors equal the original HF ones;
- a file without ``output.weight`` has ``tie_word_embeddings`` True and no ``lm_head.weight``;
- every failure (missing file, corrupt header, unknown tensor, quant type the ``gguf`` package cannot
  dequantize) raises :class:`~rtllm.errors.ModelLoadError` naming the path and the culprit.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch

from rtllm.errors import ModelLoadError, UnsupportedArchitectureError

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_REQUIRED_BLOCK_PARTS = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                         "ffn_gate", "ffn_up", "ffn_down")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_T = gguf.GGMLQuantizationType


@dataclass
class GGUFTokenizerData:
    """The ``tokenizer.*`` metadata of a GGUF file, as stored (ids index ``tokens``).

    ``model`` is ``tokenizer.ggml.model`` ("gpt2" = byte-level BPE, "llama" = SentencePiece) or ""
    when the file has no tokenizer; ``token_types`` follow llama.cpp (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte). ``add_bos_token`` None means "not stated".
    """

    model: str = ""
    pre: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_types: list[int] | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    eom_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    source: str = ""


@dataclass
class GGUFCheckpoint:
    """A GGUF file as an HF checkpoint: config dict, float32 tensors by HF name, tokenizer metadata."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: GGUFTokenizerData
    # the quantization block of the file's block-quantized weights (32 for Q4_0 / Q4_1 / Q8_0 and the
    # K-quants' sub-blocks); None when every tensor is stored in floating point
    quant_block: int | None = None


class _Reader(gguf.GGUFReader):
    """``GGUFReader`` slicing a plain ndarray view of its memmap.

    The stock reader slices the ``np.memmap`` itself, and numpy's memmap bookkeeping on each of the
    ~250k small slices of a 50k-token vocabulary costs seconds; the bytes read are identical.
    """

    _plain_src: Any = None
    _plain: np.ndarray

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if self._plain_src is not self.data:
            self._plain, self._plain_src = self.data.view(np.ndarray), self.data
        count = int(count)
        arr = self._plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _open(path: str) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """The reader and its metadata (``GGUF.*`` header fields left out)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path!r} does not exist")
    try:
        reader = _Reader(path, "r")
        return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # the gguf package raises bare ValueError/KeyError/struct errors
        raise ModelLoadError(f"{path!r} is not a readable GGUF file (corrupt or truncated?): {e}") from e


def _tokenizer_data(meta: dict[str, Any], path: str) -> GGUFTokenizerData:
    def get(key: str, cast: Any = None) -> Any:
        value = meta.get("tokenizer.ggml." + key)
        return value if value is None or cast is None else cast(value)

    ids = {f: get(key, int) for f, key in (
        ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("eot_token_id", "eot_token_id"),
        ("eom_token_id", "eom_token_id"), ("unk_token_id", "unknown_token_id"),
        ("pad_token_id", "padding_token_id"))}
    flags = {f: get(f, bool) for f in ("add_bos_token", "add_eos_token", "add_space_prefix")}
    types = get("token_type")
    return GGUFTokenizerData(
        model=get("model") or "", pre=get("pre"), tokens=list(get("tokens") or []),
        token_types=None if types is None else [int(t) for t in types],
        merges=get("merges"), scores=get("scores"), chat_template=meta.get("tokenizer.chat_template"),
        source=path, **ids, **flags)


def load_gguf_tokenizer(path: str) -> GGUFTokenizerData:
    """Read only the tokenizer metadata of a GGUF file (no tensor is dequantized)."""
    return _tokenizer_data(_open(os.fspath(path))[1], os.fspath(path))


def _llama3_rope_scaling(factors: np.ndarray, theta: float, rot_dim: int, original_ctx: int,
                         path: str) -> dict | None:
    """Recover HF ``rope_type: llama3`` parameters from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores one divisor per rotary pair: 1 for high frequencies, ``factor`` for low ones
    and ``1 / ((1 - s) / factor + s)`` in between, where ``s = (ctx / wavelen - low) / (high - low)``
    is linear in 1 / wavelen. Fitting that line gives ``low``/``high`` for the chosen ``ctx``
    (any ``ctx`` reproduces the same frequencies, so the metadata value or 8192 is used).
    """
    f = factors.astype(np.float64)
    factor = _f32(f.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = theta ** (-np.arange(0, rot_dim, 2, dtype=np.float64)[: len(f)] / rot_dim)
    x = inv_freq / (2 * math.pi)
    smooth = (f > 1.0 + 1e-4) & (f < factor * (1 - 1e-4))
    if smooth.sum() < 2:
        raise ModelLoadError(f"{path!r}: rope_freqs.weight has fewer than two interpolated frequencies; "
                             "cannot infer the llama3 rope scaling")
    s = (1.0 / f[smooth] - 1.0 / factor) / (1.0 - 1.0 / factor)
    a, b = np.polyfit(x[smooth], s, 1)
    low = -b * original_ctx / a
    high = low + original_ctx / a
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 4),
            "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": original_ctx}


def _rope_scaling(meta: dict[str, Any], arch: str, path: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        ctx = meta.get(f"{arch}.rope.scaling.original_context_length")
        if ctx is not None:
            out["original_max_position_embeddings"] = int(ctx)
        return out
    raise ModelLoadError(f"{path!r}: unsupported {arch}.rope.scaling.type={kind!r} (linear, yarn)")


def _f32(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _config(meta: dict[str, Any], arch: str, tok: GGUFTokenizerData, names: set[str], vocab_rows: int,
            path: str) -> dict:
    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ModelLoadError(f"{path!r}: GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(tok.tokens) or vocab_rows
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "torch_dtype": "float32",
    }
    if tok.pad_token_id is not None:
        config["pad_token_id"] = tok.pad_token_id
    scaling = _rope_scaling(meta, arch, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _hf_name(name: str, path: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    m = _BLOCK_RE.fullmatch(name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ModelLoadError(f"{path!r}: unexpected tensor {name!r} (no Hugging Face equivalent known)")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _coarse_rows(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Regroup whole quant blocks into fewer, longer rows (same bytes, same order).

    ``gguf.quants`` works 16 rows at a time with per-call numpy overhead; blocks are independent,
    so longer rows give identical values several times faster.
    """
    if data.ndim < 2 or qtype in (_T.F16, _T.BF16):
        return data
    rows = math.prod(data.shape[:-1])
    k = max(1, min(rows, (1 << 17) // max(1, data.shape[-1])))
    while rows % k:
        k -= 1
    return data.reshape(rows // k, k * data.shape[-1])


def _dequantize(t: Any, path: str) -> np.ndarray:
    """One GGUF tensor as a fresh, writable float32 array in torch (row-major, reversed) shape."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    try:
        if qtype == _T.F32:
            out = np.array(t.data, dtype=np.float32, copy=True)
        elif qtype == _T.F64:
            out = np.asarray(t.data, dtype=np.float64).astype(np.float32)
        else:
            out = gguf.quants.dequantize(_coarse_rows(np.asarray(t.data), qtype), qtype)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"{path!r}: tensor {t.name!r} has GGML type {qtype.name}, which cannot be dequantized "
            f"(supported include F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)") from e
    except Exception as e:
        raise ModelLoadError(f"{path!r}: tensor {t.name!r} ({qtype.name}) is corrupt: {e}") from e
    if out.size != math.prod(shape):
        raise ModelLoadError(f"{path!r}: tensor {t.name!r} has {out.size} values, expected shape {shape}")
    return out.reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (rotary halves interleaved per head).

    The converter wrote ``w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)``;
    this returns the original HF rows. Works for weights [out, in] and biases [out].
    """
    rows = w.shape[0]
    if rows % (2 * n_head) != 0:
        raise ModelLoadError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str) -> GGUFCheckpoint:
    """Read and dequantize a llama / qwen2 / qwen3 GGUF file into an HF-named float32 checkpoint."""
    path = os.fspath(path)
    reader, meta = _open(path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path!r}: GGUF general.architecture={arch!r} is not supported; supported: "
            + ", ".join(f"{k} ({v})" for k, v in _ARCHITECTURES.items()))
    tok = _tokenizer_data(meta, path)
    names = {t.name for t in reader.tensors}
    embd = [int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"]
    config = _config(meta, arch, tok, names, embd[0] if embd else 0, path)
    layers = range(config["num_hidden_layers"])
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{part}.weight" for i in layers for part in _REQUIRED_BLOCK_PARTS]
    missing = [n for n in required if n not in names]
    if missing:
        raise ModelLoadError(f"{path!r}: tensors missing: {', '.join(missing[:8])}")
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            ctx = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
            rot_dim = int(meta.get(f"{arch}.rope.dimension_count", config["head_dim"]))
            scaling = _llama3_rope_scaling(_dequantize(t, path), config["rope_theta"], rot_dim, ctx, path)
            if scaling is not None and "rope_scaling" not in config:
                config["rope_scaling"] = scaling
            continue
        hf = _hf_name(t.name, path)
        arr = _dequantize(t, path)
        proj = hf.split(".")[-2]
        if arch == "llama" and proj in heads:
            arr = unpermute_qk(arr, heads[proj])
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(arr))
    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    block_quantized = any(t.tensor_type not in float_types for t in reader.tensors if len(t.shape) == 2)
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=tok, quant_block=32 if block_quantized else None)
