"""LLM: the user API. ``LLM(model).generate(prompts, sampling_params)``, streaming, chat."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence

from tqdm.auto import tqdm

from rtllm.builder.limits import engine_limits, runtime_limits
from rtllm.config import CudaGraphConfig, KvCacheConfig
from rtllm.errors import ConfigError, InvalidRequestError, ModelLoadError
from rtllm.executor.base import GenerationExecutor
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult, RequestOutput
from rtllm.llmapi.default_model import default_model_path
from rtllm.llmapi.llm_args import LlmArgs
from rtllm.models.config import ModelConfig
from rtllm.models.loader import find_gguf
from rtllm.plugins import load_plugins
from rtllm.sampling_params import SamplingParams
from rtllm.tokenizer import Tokenizer
from rtllm.tokenizer.token_ids import TokenIdTokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]
_DEFAULT = object()


class LLM:
    """An engine serving one model.

    ``model``: an HF checkpoint directory, a .gguf file, an engine directory (``rtllm build``), or
    None for the embedded default (SmolLM2-135M-Instruct). Use as a context manager or call ``shutdown()``.
    ``max_batch_size`` / ``max_num_tokens`` / ``max_seq_len`` left None: 64 / 2048 / the model's
    context (capped at 8192) for a checkpoint; an engine directory's build limits, which are
    also ceilings (and its max_input_len caps prompts).
    ``executor_type``: "auto" / "multiprocess" run the engine loop in a worker process (spawned:
    a script that builds an LLM at import time needs the ``if __name__ == "__main__":`` guard);
    "inprocess" runs it on a background thread (``llm.executor.engine`` is then the engine).
    """

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | Tokenizer | None = None,
        dtype: str = "auto",
        kv_cache_config: KvCacheConfig | None = None,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        max_seq_len: int | None = None,
        enable_chunked_prefill: bool = True,
        device: str = "auto",
        cuda_graph_config: CudaGraphConfig | None = _DEFAULT,
        executor_type: str = "auto",
        **kwargs,
    ) -> None:
        self._executor: GenerationExecutor | None = None
        load_plugins()  # user packages' architectures, kernels, logits processors (docs/PLUGINS.md)
        model = model or default_model_path()
        if not os.path.exists(model):
            raise ModelLoadError(
                f"model path {model!r} does not exist (give an HF checkpoint directory or a .gguf file)")
        self._engine = engine_limits(model)  # an engine directory: its build limits are the defaults
        max_batch_size, max_num_tokens, max_seq_len, kv_cache_config = runtime_limits(
            self._engine, max_batch_size, max_num_tokens, max_seq_len, kv_cache_config)
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(LlmArgs)})
        if unknown:
            raise ConfigError(f"LLM() got unknown options {unknown}")
        self.args = LlmArgs(model, tokenizer if isinstance(tokenizer, str) else None, dtype,
                            kv_cache_config or KvCacheConfig(), max_batch_size, max_num_tokens, max_seq_len,
                            enable_chunked_prefill, device,
                            CudaGraphConfig() if cuda_graph_config is _DEFAULT else cuda_graph_config,
                            executor_type=executor_type, **kwargs)
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer = tokenizer
        elif tokenizer is None and model.endswith(".json") and os.path.isfile(model):
            cfg = ModelConfig.from_file(model)  # random weights from a bare config: no tokenizer
            self.tokenizer = TokenIdTokenizer(cfg.vocab_size, cfg.eos_token_ids)
        elif tokenizer is None and self._engine is not None and not self._engine.has_tokenizer:
            self.tokenizer = TokenIdTokenizer(self._engine.vocab_size, list(self._engine.eos_token_ids))
        else:
            src = tokenizer or model
            self.tokenizer = Tokenizer.from_pretrained(find_gguf(src) or src)
        self._executor = GenerationExecutor.create(self.args.engine_config(), self.tokenizer,
                                                   multi_process=self.args.multi_process)

    # -- lifecycle --------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()

    @property
    def executor(self) -> GenerationExecutor:
        if self._executor is None:
            raise RuntimeError("this LLM was shut down")
        return self._executor

    # -- requests ---------------------------------------------------------------------------
    def _make_request(self, prompt: Prompt, params: SamplingParams | None, streaming: bool) -> GenerationRequest:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty: give at least one character")
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids, text = list(prompt), None
        else:
            raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if self._engine is not None and len(ids) > self._engine.max_input_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the engine was built with max_input_len="
                                      f"{self._engine.max_input_len}")
        return GenerationRequest(ids, params, prompt=text, streaming=streaming)

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> GenerationResult:
        """Submit one prompt; returns a GenerationResult: ``await r.aresult()``, ``async for out in r``
        (streaming snapshots with text_diff), or ``r.result()`` from sync code."""
        return self.executor.submit(self._make_request(prompt, sampling_params, streaming))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns a RequestOutput) or a list (returns a list, in order)."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list | tuple) and bool(prompts) and all(isinstance(t, int) for t in prompts))
        if not single and not isinstance(prompts, list | tuple):
            raise InvalidRequestError(
                f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
        plist: list[Prompt] = [prompts] if single else list(prompts)
        if not plist:
            raise InvalidRequestError("generate() got no prompts")
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(plist):
                raise InvalidRequestError(
                    f"got {len(sampling_params)} sampling_params for {len(plist)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(plist)
        requests = [self._make_request(p, sp, False) for p, sp in zip(plist, params_list)]
        results: list[GenerationResult] = []
        try:
            for r in requests:
                results.append(self.executor.submit(r))
        except Exception:
            for res in results:
                res.abort()
            raise
        outputs = []
        for res in tqdm(results, desc="Generating", disable=not use_tqdm or len(results) < 2):
            outputs.append(res.result())
        return outputs[0] if single else outputs

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list) and generate."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        prompts: list[Prompt] = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, add_generation_prompt),
                                         add_special_tokens=False) for c in convs]
        outs = self.generate(prompts, sampling_params, use_tqdm)
        return outs[0] if single else outs
