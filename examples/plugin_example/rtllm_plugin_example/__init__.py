"""An rtllm plugin (docs/PLUGINS.md): everything a user package can add without editing rtllm.

- ``ScaledEmbeddingLlamaForCausalLM`` (model.py): a Llama whose token embeddings are multiplied by
  ``embedding_multiplier`` from config.json, loaded from checkpoints that name the decoder
  ``backbone.*`` instead of ``model.*`` (a weight-name map);
- a counting RMSNorm kernel (kernels.py) that replaces rtllm's ``rms_norm`` and ``fused_add_rms_norm``;
- the ``ban_tokens`` logits processor factory (processors.py): ``{"name": "ban_tokens", "kwargs":
  {"token_ids": [...]}}`` in ``SamplingParams.logits_processors``.

Loaded by rtllm through the ``rtllm.plugins`` entry point when the package is installed
(``pip install examples/plugin_example``), or with ``RTLLM_PLUGINS=rtllm_plugin_example`` when it is
only importable. Importing the package registers everything; ``register()`` is idempotent.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from rtllm_plugin_example import kernels, model, processors

    model.register()
    kernels.register()
    processors.register()
    _registered = True


register()
