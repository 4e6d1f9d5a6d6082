"""QuantConfig: which quantization the engine applies to a model's weights (TensorRT-LLM names).

Validated on construction: a wrong value fails at once with a ConfigError naming the field and
the allowed values. Algorithms (docs/QUANTIZATION.md has the layouts and kernels):

- ``FP8``: e4m3 weights with per-output-channel scales, activations quantized per token at run
  time (``torch._scaled_mm`` on CUDA sm_89+; an exact-semantics emulation on the CPU).
- ``W8A16``: INT8 weight-only, per-channel symmetric scales.
- ``W4A16``: INT4 weight-only, round-to-nearest asymmetric per group along the input dimension.
- ``W4A16_AWQ``: the W4A16 format after AWQ's activation-aware per-input-channel scaling, found
  on calibration text (public-domain KJV verses, see rtllm.quantization.calib_data).
- ``NVFP4``: e2m1 weights, e4m3 scales per 16 input channels and one fp32 scale per tensor;
  dequantized to 16 bits for the GEMM (no FP4 tensor cores before Blackwell).

``kv_cache_quant_algo`` (None or ``FP8``): ``FP8`` makes the engine keep its KV cache in float8_e4m3fn
(static per-layer scales 1.0; docs/QUANTIZATION.md, *FP8 KV cache*).

Whenever weights are quantized (any ``quant_algo``, or a pre-quantized checkpoint), the token
embedding and the LM head are stored INT8 with one symmetric absmax scale per vocabulary row
(``VOCAB_QUANT_ALGO``; a tied pair shares one table). ``exclude_modules`` (TensorRT-LLM / ModelOpt's
name) keeps the modules it names in the model dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from rtllm.errors import ConfigError

FP8 = "FP8"
W8A16 = "W8A16"
W4A16 = "W4A16"
W4A16_AWQ = "W4A16_AWQ"
NVFP4 = "NVFP4"
SUPPORTED_QUANT_ALGOS: tuple[str, ...] = (FP8, W8A16, W4A16, W4A16_AWQ, NVFP4)
KV_CACHE_SCALES: tuple[str, ...] = ("calibrate", "static")  # how an FP8 KV cache's per-layer scales are set
KV_CACHE_QUANT_ALGOS: tuple[str, ...] = (FP8,)

W4A16_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
NVFP4_BLOCK_SIZE = 16
# group sizes each grouped format accepts, and the one it uses when group_size is None
GROUP_SIZES: dict[str, tuple[int, ...]] = {W4A16: W4A16_GROUP_SIZES, W4A16_AWQ: W4A16_GROUP_SIZES,
                                           NVFP4: (NVFP4_BLOCK_SIZE,)}
DEFAULT_GROUP_SIZE: dict[str, int] = {W4A16: 128, W4A16_AWQ: 128, NVFP4: NVFP4_BLOCK_SIZE}
# devices each algorithm has kernels for
_DEVICES: dict[str, tuple[str, ...]] = {a: ("cpu", "cuda") for a in SUPPORTED_QUANT_ALGOS}
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) on
# the format of the token embedding and the LM head when weights are quantized (unless excluded):
# int8 codes with one fp32 absmax scale per vocabulary row (the LM head runs as a W8A16 linear)
VOCAB_QUANT_ALGO = W8A16


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"QuantConfig.{name}={value!r}: must be a positive int")


@dataclass
class QuantConfig:
    """quant_algo: None (no quantization) or one of SUPPORTED_QUANT_ALGOS (case-insensitive,
    stored upper-case).

    group_size: input channels that share one scale (W4A16 / W4A16_AWQ: 32, 64, 128 or 256;
    NVFP4: 16; FP8 / W8A16 are per-channel and take None). None uses the format's default (128
    for INT4), and a layer whose in_features it does not divide uses the largest supported group
    below it that does (the loader logs which). An explicit group_size must divide the
    in_features of every layer it quantizes, else loading fails with a ConfigError.

    kv_cache_quant_algo: None or "FP8" (an FP8 KV cache; see the module doc).
    kv_cache_scales: with an FP8 KV cache, "static" (default: k_scale = v_scale = 1.0 in every
    layer, no calibration pass) or "calibrate" (each attention layer's k_scale / v_scale = the
    amax of its post-RoPE keys / values over the calibration text, divided by 448, measured at
    load; a model without a tokenizer, or split across ranks, keeps 1.0 and says so). On the
    default model static scales measured better (docs/QUANTIZATION.md): e4m3's relative precision
    does not depend on the scale, so calibration pays off only for caches whose values exceed 448
    or fall below 2^-6.
    calib_size / calib_max_seq_length: W4A16_AWQ calibration, the number of text sequences and
    the tokens in each (TensorRT-LLM's names).

    exclude_modules: module names or fnmatch globs (TensorRT-LLM / ModelOpt's field) whose modules
    stay in the model dtype when weights are quantized. A pattern matches a module's full name
    (``lm_head``, ``model.embed_tokens``, ``model.layers.3.mlp.down_proj``), any dotted suffix of
    it (``embed_tokens``, ``mlp.down_proj``), or a module that contains it (``model.layers.0``
    keeps that layer's linear layers). Default None: nothing excluded, so the token embedding
    and the LM head are INT8 per row (``VOCAB_QUANT_ALGO``) and every linear layer takes
    ``quant_algo``. A tied embedding / LM head is one table: excluding either keeps both. Each
    pattern must match a module that this load would quantize, else loading fails naming it. On
    a pre-quantized checkpoint (no ``quant_algo``) rtllm quantizes only the embedding and the LM
    head, so only they can be excluded."""

    quant_algo: str | None = None
    group_size: int | None = None
    kv_cache_quant_algo: str | None = None
    calib_size: int = 16
    calib_max_seq_length: int = 256
    exclude_modules: list[str] | None = None
    kv_cache_scales: str = "static"

    def __post_init__(self) -> None:
        if self.kv_cache_scales not in KV_CACHE_SCALES:
            raise ConfigError(f"QuantConfig.kv_cache_scales={self.kv_cache_scales!r}: must be one of "
                              f"{list(KV_CACHE_SCALES)}")
        self.quant_algo = self._algo("quant_algo", self.quant_algo, SUPPORTED_QUANT_ALGOS)
        self.kv_cache_quant_algo = self._algo("kv_cache_quant_algo", self.kv_cache_quant_algo,
                                              KV_CACHE_QUANT_ALGOS)
        g = self.group_size
        if g is not None:
            allowed = GROUP_SIZES.get(self.quant_algo) if self.quant_algo else W4A16_GROUP_SIZES
            if allowed is None:
                raise ConfigError(f"QuantConfig.group_size={g!r}: {self.quant_algo} has per-channel scales; "
                                  f"group_size must be None")
            if not isinstance(g, int) or isinstance(g, bool) or g not in allowed:
                algo = f" for {self.quant_algo}" if self.quant_algo else ""
                raise ConfigError(f"QuantConfig.group_size={g!r}: must be None or one of {list(allowed)}{algo}")
        _check_positive_int("calib_size", self.calib_size)
        _check_positive_int("calib_max_seq_length", self.calib_max_seq_length)
        ex = self.exclude_modules
        if ex is not None:
            if isinstance(ex, str) or not isinstance(ex, list | tuple) or not all(
                    isinstance(p, str) and p.strip() == p and p for p in ex):
                raise ConfigError(f"QuantConfig.exclude_modules={ex!r}: must be None or a list of module names "
                                  f"or globs (non-empty strings without surrounding spaces), e.g. ['lm_head']")
            self.exclude_modules = list(ex)  # stored as a list: the engine config's JSON reads back equal

    @classmethod
    def from_name(cls, name: str | None, group_size: int | None = None,
                  kv_cache_dtype: str = "auto", exclude_modules: list[str] | None = None) -> QuantConfig | None:
        """The config for command-line names: weights "none", "fp8", "w8a16", "w4a16", "w4a16_awq",
        "nvfp4"; ``group_size`` applies to the grouped INT4 formats only (a ConfigError for the
        others); ``kv_cache_dtype`` "auto" (the model's) or "fp8"; ``exclude_modules`` as the field
        (with "none" it still applies to a pre-quantized checkpoint). None when nothing is set."""
        kv = {"auto": None, "fp8": FP8}.get(str(kv_cache_dtype).lower(), "?")
        if kv == "?":
            raise ConfigError(f"kv_cache_dtype={kv_cache_dtype!r}: must be 'auto' or 'fp8'")
        if name is None or name.lower() == "none":
            if group_size is not None:
                raise ConfigError(f"QuantConfig.group_size={group_size}: given without a quantization algorithm")
            if kv is None and not exclude_modules:
                return None
            return cls(kv_cache_quant_algo=kv, exclude_modules=exclude_modules or None)
        algo = name.upper()
        if group_size is not None and algo not in (W4A16, W4A16_AWQ):
            raise ConfigError(f"QuantConfig.group_size={group_size}: applies to {W4A16} / {W4A16_AWQ}, not {algo}")
        return cls(algo, group_size, kv_cache_quant_algo=kv, exclude_modules=exclude_modules or None)

    @staticmethod
    def _algo(name: str, value: object, allowed: tuple[str, ...]) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or value.upper() not in allowed:
            raise ConfigError(f"QuantConfig.{name}={value!r}: must be None or one of {list(allowed)}")
        return value.upper()

    @property
    def enabled(self) -> bool:
        return self.quant_algo is not None

    def excludes(self, module_name: str) -> bool:
        """Whether ``exclude_modules`` keeps the module ``module_name`` in the model dtype."""
        return any(_matches(p, module_name) for p in self.exclude_modules or ())

    def check_exclude_modules(self, candidates: Iterable[str], what: str = "quantized") -> None:
        """ConfigError naming every ``exclude_modules`` pattern that matches none of ``candidates`` (the
        names of the modules this load would quantize); ``what`` says what they are in the message."""
        names = list(candidates)
        unmatched = [p for p in self.exclude_modules or () if not any(_matches(p, n) for n in names)]
        if unmatched:
            shown = names if len(names) <= 8 else [*names[:3], "...", *names[-3:]]
            raise ConfigError(f"QuantConfig.exclude_modules: {unmatched} match no module that is {what} here; "
                              f"the modules are {shown} ({len(names)}; fused q|k|v and gate|up are named "
                              f"qkv_proj and gate_up_proj)")

    @property
    def grouped(self) -> bool:
        """Whether the weight format has group-wise scales along the input dimension."""
        return self.quant_algo in GROUP_SIZES

    def resolve_group_size(self, in_features: int) -> int | None:
        """The group a layer with ``in_features`` inputs uses (grouped formats only).

        Explicit group_size: it, or ConfigError when it does not divide in_features. None: the
        format's default, else the largest allowed group below it that divides in_features, else
        None (the layer stays dense; the loader reports it)."""
        allowed = GROUP_SIZES[self.quant_algo]
        fits = [g for g in allowed if in_features % g == 0]
        if self.group_size is not None:
            if in_features % self.group_size:
                raise ConfigError(f"QuantConfig.group_size={self.group_size}: does not divide in_features="
                                  f"{in_features} of a layer to quantize; allowed for it: {fits or 'none'} "
                                  f"(or None: the largest that fits, per layer)")
            return self.group_size
        below = [g for g in fits if g <= DEFAULT_GROUP_SIZE[self.quant_algo]]
        return max(below) if below else None

    def check_device(self, device: object) -> None:
        """Raise ConfigError when this algorithm has no kernel for ``device`` (a str or torch.device).

        FP8 on CUDA needs FP8 tensor cores (compute capability 8.9+), checked when a GPU is visible."""
        if not self.enabled:
            return
        kind = str(device).split(":")[0]
        allowed = _DEVICES[self.quant_algo]
        if kind not in allowed:
            raise ConfigError(f"QuantConfig.quant_algo={self.quant_algo!r}: {self.quant_algo} runs on "
                              f"{' / '.join(d.upper() for d in allowed)} only (device={str(device)!r})")
        if kind == "cuda" and self.quant_algo == FP8:
            import torch

            try:
                cap = torch.cuda.get_device_capability(device if ":" in str(device) else None)
            except (RuntimeError, AssertionError, AttributeError):  # no GPU visible: checked again at load
                return
            if tuple(cap) < FP8_MIN_CAPABILITY:
                raise ConfigError(f"QuantConfig.quant_algo='FP8': needs a GPU with FP8 tensor cores (compute "
                                  f"capability >= 8.9, Ada / Hopper); this one is sm_{cap[0]}{cap[1]}. "
                                  f"Allowed here: {[a for a in SUPPORTED_QUANT_ALGOS if a != FP8]}")


def _matches(pattern: str, name: str) -> bool:
    """A pattern matches the module ``name`` itself, a dotted suffix of it, or a module containing it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):  # the module, then its parents
        for start in range(end):  # the full dotted name, then its suffixes
            if fnmatchcase(".".join(parts[start:end]), pattern):
                return True
    return False
