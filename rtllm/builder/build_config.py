"""BuildConfig: what ``rtllm build`` bakes into an engine directory (TensorRT-LLM's field names).

Validated on construction (each wrong value a ConfigError naming the field, the value and what
is allowed) and again against the model when the build resolves it (``resolve``). The limits
(max_batch_size, max_input_len, max_seq_len, max_num_tokens) become the runtime's defaults and
ceilings when ``LLM(engine_dir)`` loads the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rtllm.errors import ConfigError
from rtllm.quantization.config import QuantConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8")


def _bad(name: str, value: object, rule: str) -> ConfigError:
    return ConfigError(f"BuildConfig.{name}={value!r}: {rule}")


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _bad(name, value, "must be a positive integer")


@dataclass
class BuildConfig:
    """Build-time limits and choices of an engine.

    max_input_len: longest prompt (tokens) a request may have. max_seq_len: prompt + output tokens
    of one request; None takes the model's max_position_embeddings (and may not exceed it).
    max_batch_size: requests in the running batch. max_beam_width: beams per request (only 1:
    beam search is not implemented). max_num_tokens: tokens one step computes (the scheduler's
    budget); must be >= max_batch_size so every running request can decode. opt_num_tokens: the
    token count kernels are tuned for (None: max_num_tokens; recorded, not yet used).
    dtype: the activations' and dense weights' dtype ("auto": the checkpoint's, bf16 on a GPU for
    an fp32 checkpoint, as at load). kv_cache_dtype: "auto" (the model dtype) or "fp8" (stored as
    QuantConfig.kv_cache_quant_algo="FP8"; the engine then keeps its KV cache in e4m3, see
    docs/QUANTIZATION.md). tokens_per_block: the KV block size the
    runtime defaults to (a power of two). quant_config: weight quantization
    (rtllm.quantization.QuantConfig) applied during the build; None: none.
    tp_size / pp_size: tensor / pipeline parallel ranks: the build writes one weights file per rank
    (checked against the model's heads, widths and layers when it loads). moe_ep_size: MoE models,
    the experts split across this many of the tp ranks (must divide tp_size).
    tune_kernels: time the decode GEMV kernels' launch configurations for this model's shapes on the
    build GPU and store the fastest in the engine (rtllm.builder.tuning; a CPU build has nothing to tune).
    """

    max_input_len: int = 1024
    max_seq_len: int | None = None
    max_batch_size: int = 2048
    max_beam_width: int = 1
    max_num_tokens: int = 8192
    opt_num_tokens: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    tokens_per_block: int = 32
    quant_config: QuantConfig | None = None
    tp_size: int = 1
    pp_size: int = 1
    moe_ep_size: int = 1
    tune_kernels: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.tune_kernels, bool):
            raise _bad("tune_kernels", self.tune_kernels, "must be True or False")
        for name in ("max_input_len", "max_batch_size", "max_beam_width", "max_num_tokens", "tokens_per_block",
                     "tp_size", "pp_size", "moe_ep_size"):
            _positive_int(name, getattr(self, name))
        for name in ("max_seq_len", "opt_num_tokens"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.max_beam_width != 1:
            raise _bad("max_beam_width", self.max_beam_width, "only 1 is supported (beam search is not implemented)")
        if self.tp_size % self.moe_ep_size:
            raise _bad("moe_ep_size", self.moe_ep_size, f"must divide tp_size={self.tp_size} (the experts split "
                       f"across moe_ep_size of the tp ranks)")
        if self.tokens_per_block & (self.tokens_per_block - 1):
            raise _bad("tokens_per_block", self.tokens_per_block, "must be a power of two")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"must be one of {list(DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise _bad("kv_cache_dtype", self.kv_cache_dtype, f"must be one of {list(KV_CACHE_DTYPES)}")
        if self.quant_config is not None and not isinstance(self.quant_config, QuantConfig):
            raise _bad("quant_config", self.quant_config, "must be a QuantConfig or None")
        if self.kv_cache_dtype == "fp8":
            qc = self.quant_config or QuantConfig()
            if qc.kv_cache_quant_algo not in (None, "FP8"):  # pragma: no cover - QuantConfig allows FP8 only
                raise _bad("kv_cache_dtype", self.kv_cache_dtype, "conflicts with quant_config.kv_cache_quant_algo")
            self.quant_config = dataclasses.replace(qc, kv_cache_quant_algo="FP8")
        if self.max_num_tokens < self.max_batch_size:
            raise _bad("max_num_tokens", self.max_num_tokens,
                       f"must be >= max_batch_size={self.max_batch_size} (every running request decodes one "
                       f"token a step)")
        if self.opt_num_tokens is not None and self.opt_num_tokens > self.max_num_tokens:
            raise _bad("opt_num_tokens", self.opt_num_tokens, f"must be <= max_num_tokens={self.max_num_tokens}")
        if self.max_seq_len is not None:
            self._check_input_len(self.max_seq_len)

    def _check_input_len(self, max_seq_len: int) -> None:
        if self.max_input_len > max_seq_len:
            raise _bad("max_input_len", self.max_input_len, f"must be <= max_seq_len={max_seq_len}")

    def resolve(self, max_position_embeddings: int) -> BuildConfig:
        """A copy with max_seq_len filled in from the model (its max_position_embeddings) and checked
        against it."""
        msl = self.max_seq_len
        if msl is None:
            msl = max_position_embeddings
        elif msl > max_position_embeddings:
            raise _bad("max_seq_len", msl, f"must be <= the model's max_position_embeddings="
                       f"{max_position_embeddings} (or None to take it)")
        self._check_input_len(msl)
        return dataclasses.replace(self, max_seq_len=msl)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "quant_config"}
        qc = self.quant_config
        out["quant_config"] = None if qc is None else dataclasses.asdict(qc)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BuildConfig:
        """Inverse of ``to_dict``; unknown keys are a ConfigError (an engine from a newer rtllm)."""
        if not isinstance(data, dict):
            raise ConfigError(f"BuildConfig: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"BuildConfig: unknown fields {unknown}; known: {sorted(names)}")
        kw = dict(data)
        qc = kw.pop("quant_config", None)
        if qc is not None:
            kw["quant_config"] = QuantConfig(**qc)
        return cls(**kw)
