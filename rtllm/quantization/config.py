"""QuantConfig: which quantization the engine applies to a model's weights (TensorRT-LLM names).

Validated on construction: a wrong value fails at once with a ConfigError naming the field.
Supported now: ``W4A16`` (INT4 weight-only, round-to-nearest asymmetric per group along the
input dimension, 16-bit activations), on the CPU. FP8 / INT8 / AWQ / GPTQ come later.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtllm.errors import ConfigError

W4A16 = "W4A16"
SUPPORTED_QUANT_ALGOS: tuple[str, ...] = (W4A16,)
W4A16_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
# devices each algorithm has kernels for today
_DEVICES = {W4A16: ("cpu",)}


@dataclass
class QuantConfig:
    """quant_algo: None (no quantization) or one of SUPPORTED_QUANT_ALGOS (case-insensitive,
    stored upper-case). group_size: input channels that share one scale and zero (W4A16: 32, 64,
    128 or 256). A layer whose in_features the group does not divide uses the largest supported
    group below it that does (the loader logs which)."""

    quant_algo: str | None = None
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.quant_algo is not None:
            if not isinstance(self.quant_algo, str) or self.quant_algo.upper() not in SUPPORTED_QUANT_ALGOS:
                raise ConfigError(f"QuantConfig.quant_algo={self.quant_algo!r}: must be None or one of "
                                  f"{list(SUPPORTED_QUANT_ALGOS)}")
            self.quant_algo = self.quant_algo.upper()
        if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                or self.group_size not in W4A16_GROUP_SIZES):
            raise ConfigError(f"QuantConfig.group_size={self.group_size!r}: must be one of {list(W4A16_GROUP_SIZES)}")

    @property
    def enabled(self) -> bool:
        return self.quant_algo is not None

    def check_device(self, device: object) -> None:
        """Raise ConfigError when this algorithm has no kernel for ``device`` (a str or torch.device)."""
        if not self.enabled:
            return
        kind = str(device).split(":")[0]
        allowed = _DEVICES[self.quant_algo]
        if kind not in allowed:
            raise ConfigError(f"QuantConfig.quant_algo={self.quant_algo!r}: {self.quant_algo} runs on "
                              f"{' / '.join(d.upper() for d in allowed)} only for now (device={str(device)!r}); "
                              f"the GPU kernel comes with the quantization issue")
