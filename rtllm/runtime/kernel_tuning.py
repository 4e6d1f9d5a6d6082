"""An engine directory's build-time kernel tuning (rtllm.builder.tuning) put to use when it loads: the
decode GEMV launch configurations timed fastest on the build GPU, used on the same GPU with the same
Triton; nothing is tuned at load."""

from __future__ import annotations

import logging

import triton

from rtllm.kernels.triton_quant_gemv_config import use_tuned

logger = logging.getLogger(__name__)


def use_engine_tuning(tuning: dict | None, gpu_name: str | None, source: str) -> int:
    """Use ``tuning`` (rtllm.models.engine_dir.read_kernel_tuning's dict) in this process when ``gpu_name`` (this
    device's; None on a CPU) and the Triton version are those it was tuned with; else log why not. Returns
    the number of GEMV configurations now in use (RTLLM_QUANT_GEMV_CONFIG, read at the first launch, still
    overrides them). A malformed row is a ValueError naming it."""
    if tuning is None or gpu_name is None:
        return 0
    built = (tuning.get("gpu_name"), tuning.get("triton_version"))
    if built != (gpu_name, triton.__version__):
        logger.warning("the engine at %s was tuned on %s with Triton %s; this is %s with Triton %s: its %d tuned "
                       "kernel configurations are not used (the built-in table is; rebuild the engine here to tune "
                       "for this GPU)", source, built[0], built[1], gpu_name, triton.__version__,
                       len(tuning.get("gemv", ())))
        return 0
    n = use_tuned(tuning["gemv"])
    logger.info("the engine at %s: %d decode GEMV configurations tuned at build on this GPU are in use (nothing "
                "is tuned at load)", source, n)
    return n
