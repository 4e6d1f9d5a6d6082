"""Load a checkpoint into an rtllm model: a Hugging Face directory (safetensors) or a GGUF file.

Native readers only: safetensors / gguf packages, no transformers model classes. Every
failure (missing path, corrupt config or weights, unknown architecture, missing tensors)
raises ModelLoadError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from rtllm.errors import ConfigError, ModelLoadError
from rtllm.layers.quantized_linear import quantize_linear_layers, quantize_vocab_layers
from rtllm.models.config import ModelConfig, parse_dtype
from rtllm.models.prequantized import PrequantizedLoader, check_no_quant_config, read_checkpoint_quant
from rtllm.models.registry import get_model_class, weight_name_map
from rtllm.parallel.mapping import Mapping
from rtllm.parallel.weights import LazyTensor
from rtllm.quantization.config import FP8, NVFP4, W4A16, W4A16_AWQ, QuantConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    dtype: torch.dtype
    tokenizer_source: object  # an HF directory path, or GGUFTokenizerData for a GGUF file
    load_seconds: float
    weight_bytes: int
    kv_cache_quant_algo: str | None = None  # what an engine directory was built with (None: as configured)
    kernel_tuning: dict | None = None  # an engine directory's kernel_tuning.json (engine_dir.read_kernel_tuning)


def find_gguf(path: str) -> str | None:
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return os.path.join(path, ggufs[0])
    return None


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors shards, from model.safetensors.index.json when present."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is malformed: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(model_dir, f))]
        if missing:
            raise ModelLoadError(f"{index} names shards that do not exist: {missing}")
        return [os.path.join(model_dir, f) for f in files]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir!r}")
    return [os.path.join(model_dir, f) for f in files]


def iter_safetensors(files: list[str], lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint entry; ``lazy``: LazyTensors, so a rank reads only its shard."""
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, (LazyTensor(f.get_slice(name)) if lazy else f.get_tensor(name))
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read weights file {path}: {e}") from e
        except OSError as e:
            raise ModelLoadError(f"cannot read weights file {path}: {e}") from e


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill parameters on their device: N(0, 0.02) for matrices, 1 for norm weights, 0 for biases.

    Generated on the device in place, so an 8B model takes seconds, not minutes."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()


def build_model(model_cls: type, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int | None) -> torch.nn.Module:
    """``model_cls(config)`` with its parameters created in ``dtype`` on ``device``, in eval mode
    and frozen (weights not loaded yet)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = model_cls(config, max_positions=max_positions)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def resolve_dtype(dtype: str | torch.dtype, config_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' takes the checkpoint's dtype, except fp32 checkpoints run in bf16 on GPU."""
    if dtype == "auto":
        if device.type == "cuda" and config_dtype == torch.float32:
            return torch.bfloat16
        if device.type == "cpu" and config_dtype == torch.float16:
            return torch.float32  # fp16 matmuls on CPU are slow and lossy; bf16/fp32 are the CPU types
        return config_dtype
    return parse_dtype(dtype)


def load_model(
    model_path: str, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
    max_positions: int | None = None, quant_config: QuantConfig | None = None,
    calib_tokenize: Callable[[str], list[int]] | None = None, mapping: Mapping | None = None,
) -> LoadedModel:
    """Build the model for ``model_path`` on ``device`` and load its weights.

    An engine directory (``rtllm build``) loads through rtllm.models.engine_dir, as stored.

    A pre-quantized HF checkpoint (config.json ``quantization_config``: FP8, AWQ, GPTQ) loads onto
    rtllm's quantized layers as it is (rtllm.models.prequantized); ``quant_config`` must then not
    set ``quant_algo``.

    ``quant_config`` (enabled): the loaded Linear layers are then quantized in place
    (rtllm.layers.quantized_linear); ``weight_bytes`` is the quantized size. W4A16_AWQ first
    calibrates on KJV text (rtllm.models.calibration), tokenized by ``calib_tokenize`` or, when
    None, by the tokenizer rtllm.tokenizer registers for the checkpoint.

    ``mapping`` (tensor / pipeline parallel, world_size > 1): build this rank's slice of the model
    (ModelConfig.mapping) and read only its shard of each safetensors tensor."""
    from rtllm.models.engine_dir import is_engine_dir, load_engine_dir

    split = mapping is not None and mapping.world_size > 1
    if is_engine_dir(model_path):  # built by `rtllm build`: fused, quantized (and sharded) already, loaded as stored
        return load_engine_dir(model_path, dtype, device, max_positions, quant_config, mapping if split else None)
    t0 = time.perf_counter()
    device = torch.device(device)
    if quant_config is not None:
        quant_config.check_device(device)  # before reading any weights
    if not os.path.exists(model_path):
        raise ModelLoadError(f"model path {model_path!r} does not exist")
    gguf_path = find_gguf(model_path)
    random_init = model_path.endswith(".json") and os.path.isfile(model_path)
    prequant = None
    if random_init:  # a bare config.json: random weights, for benchmarks that need no weight files
        config = ModelConfig.from_file(model_path)
        weights = iter(())
        tokenizer_source = None
    elif gguf_path is not None:
        from rtllm.models.gguf_reader import load_gguf

        ckpt = load_gguf(gguf_path)
        config = ModelConfig.from_dict(ckpt.config, source=gguf_path)
        quant_config = _native_group(quant_config, ckpt.quant_block, gguf_path)
        weights: Iterator[tuple[str, torch.Tensor]] = iter(ckpt.tensors.items())
        tokenizer_source: object = ckpt.tokenizer
    else:
        if not os.path.isdir(model_path):
            raise ModelLoadError(f"{model_path!r} is neither a model directory nor a .gguf file")
        config = ModelConfig.from_file(os.path.join(model_path, "config.json"))
        prequant = read_checkpoint_quant(model_path)
        if prequant is not None:
            check_no_quant_config(prequant, quant_config, model_path)
        weights = iter_safetensors(safetensors_files(model_path), lazy=split)
        tokenizer_source = model_path

    model_cls = get_model_class(config.architectures)
    if split:
        _check_split(mapping, config, model_cls, quant_config, prequant)
        config.mapping = mapping
    torch_dtype = resolve_dtype(dtype, config.torch_dtype, device)
    model = build_model(model_cls, config, torch_dtype, device, max_positions)
    if random_init:
        init_random_weights(model, seed=0)
        weights_loaded = {n for n, _ in model.named_parameters()}
    expected = {n for n, _ in model.named_parameters()}
    name_map = weight_name_map(model_cls)
    if name_map is not None:  # a plugin architecture's checkpoint names -> its parameter names (None: skip)
        weights = ((m, t) for n, t in weights if (m := name_map(n)) is not None)
    pq_loader = None
    if prequant is not None:  # a pre-quantized checkpoint: quantized tensors go to rtllm.models.prequantized
        pq_loader = PrequantizedLoader(prequant, model, model_path)
        weights = pq_loader.divert(weights)
    try:
        loaded = weights_loaded if random_init else model.load_weights(weights)
    except KeyError as e:
        raise ModelLoadError(f"{model_path}: checkpoint tensor {e.args[0]!r} has no matching parameter "
                             f"in {config.architecture}") from e
    except ValueError as e:
        raise ModelLoadError(f"{model_path}: {e}") from e
    if pq_loader is not None:
        loaded = loaded | pq_loader.apply()
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"{model_path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    if prequant is not None:  # its linear layers came quantized; the embedding / LM head follow rtllm's default
        logger.info("%s: %s", model_path, quantize_vocab_layers(model, quant_config).vocab_summary())
    weight_bytes = _weight_bytes(model)
    if quant_config is not None and quant_config.enabled:
        staged = split and mapping.pp_size > 1
        if staged:
            quant_config = _whole_model_excludes(model_cls, config, quant_config)
        weight_bytes = quantize_model(model, quant_config, tokenizer_source, calib_tokenize,
                                      check_patterns=not staged)
    if quant_config is not None and quant_config.kv_cache_quant_algo == FP8:
        set_kv_cache_scales(model, quant_config, tokenizer_source, calib_tokenize, split)
    secs = time.perf_counter() - t0
    logger.info("loaded %s (%s, %s) in %.2f s: %.1f MiB of weights", model_path, config.architecture,
                torch_dtype, secs, weight_bytes / 2**20)
    return LoadedModel(model, config, torch_dtype, tokenizer_source, secs, weight_bytes)


def _check_split(mapping: Mapping, config: ModelConfig, model_cls: type, quant_config: QuantConfig | None,
                 prequant: object) -> None:
    """What runs split across ranks today: models whose class supports it (dense and MoE), unquantized or
    quantized at load by a format that needs no calibration (each rank quantizes its own shards)."""
    what = f"tp_size={mapping.tp_size}, pp_size={mapping.pp_size}"
    mapping.validate_for(config)
    if not getattr(model_cls, "supports_parallel", False):
        raise ConfigError(f"{config.architecture} does not support running split across ranks ({what})")
    if prequant is not None:
        raise ConfigError(f"pre-quantized checkpoints do not run with {what} yet (their packed tensors are not "
                          f"split); quantize at load instead (e.g. --quant fp8 on the bf16 checkpoint)")
    if quant_config is not None and quant_config.quant_algo == W4A16_AWQ:
        raise ConfigError(f"{W4A16_AWQ} does not run with {what} yet (its calibration runs on one rank); use "
                          f"{W4A16} (round-to-nearest INT4), or build the AWQ engine at tp_size=1")


def _native_group(quant_config: QuantConfig | None, block: int | None, source: str) -> QuantConfig | None:
    """An INT4 config with no explicit group on a block-quantized GGUF uses the file's block (32):
    requantizing 4-bit codes at a coarser group loses what the file kept (on the default model,
    group 128 costs +67% perplexity; group 32 reproduces every Q4_1 code exactly)."""
    if (quant_config is None or block is None or quant_config.group_size is not None
            or quant_config.quant_algo not in (W4A16, W4A16_AWQ)):
        return quant_config
    logger.info("%s is block-quantized (blocks of %d): %s uses group_size=%d", source, block,
                quant_config.quant_algo, block)
    return dataclasses.replace(quant_config, group_size=block)


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors counted once


def set_kv_cache_scales(model: torch.nn.Module, quant_config: QuantConfig, tokenizer_source: object = None,
                        calib_tokenize: Callable[[str], list[int]] | None = None, split: bool = False) -> None:
    """FP8 KV cache: calibrate each attention layer's k_scale / v_scale on the calibration text
    (QuantConfig.kv_cache_scales="calibrate", rtllm.models.calibration.calibrate_kv_scales), or
    keep 1.0 ("static"; also without a tokenizer or when split across ranks, with a log line)."""
    if quant_config.kv_cache_scales == "static":
        logger.info("FP8 KV cache: static scales 1.0 (kv_cache_scales='static')")
        return
    if split or (tokenizer_source is None and calib_tokenize is None):
        why = "the model is split across ranks" if split else "the model has no tokenizer"
        logger.warning("FP8 KV cache: scales stay 1.0 (%s, so no calibration pass)", why)
        return
    from rtllm.models.calibration import calibrate_kv_scales, calibration_encoder, calibration_sequences

    t0 = time.perf_counter()
    try:
        encode = calib_tokenize or calibration_encoder(tokenizer_source)
    except ConfigError as e:  # no tokenizer registered (rtllm.tokenizer not imported): not worth failing a load
        logger.warning("FP8 KV cache: scales stay 1.0 (no calibration tokenizer: %s)", e)
        return
    scales = calibrate_kv_scales(model, calibration_sequences(encode, quant_config))
    ks, vs = [k for k, _ in scales.values()], [v for _, v in scales.values()]
    logger.info("FP8 KV cache: calibrated %d layers' scales in %.2f s (k_scale %.3g..%.3g, v_scale %.3g..%.3g)",
                len(scales), time.perf_counter() - t0, min(ks), max(ks), min(vs), max(vs))


def _whole_model_excludes(model_cls: type, config: ModelConfig, quant_config: QuantConfig) -> QuantConfig:
    """A pipeline stage holds part of the model: check exclude_modules against the whole model's
    quantizable modules (built on the meta device, no memory), and, for tied embeddings (the
    embedding on the first stage, its copy as LM head on the last), let a pattern naming either keep
    both dense, as on one rank."""
    from rtllm.layers.embedding import LMHead, VocabEmbedding
    from rtllm.layers.linear import Linear

    if not quant_config.exclude_modules:
        return quant_config
    whole = build_model(model_cls, dataclasses.replace(config, mapping=Mapping()), torch.float32,
                        torch.device("meta"), 16)
    names = [n for n, m in whole.named_modules() if isinstance(m, (Linear, VocabEmbedding, LMHead))]
    quant_config.check_exclude_modules(names)
    vocab = [n for n, m in whole.named_modules() if isinstance(m, (VocabEmbedding, LMHead))]
    if config.tie_word_embeddings and any(quant_config.excludes(n) for n in vocab):
        extra = [n for n in vocab if not quant_config.excludes(n)]
        quant_config = dataclasses.replace(quant_config, exclude_modules=[*quant_config.exclude_modules, *extra])
    return quant_config


@torch.no_grad()
def quantize_model(model: torch.nn.Module, quant_config: QuantConfig, tokenizer_source: object = None,
                   calib_tokenize: Callable[[str], list[int]] | None = None, check_patterns: bool = True) -> int:
    """Quantize a loaded (dense) model's linear layers in place, calibrating first for W4A16_AWQ;
    returns the new weight bytes. ``load_model`` calls it; tools that compare formats call it on
    copies of one loaded model. ``check_patterns`` False: exclude_modules was checked against the
    whole model already (a pipeline stage)."""
    dense_bytes = _weight_bytes(model)
    t0 = time.perf_counter()
    if quant_config.quant_algo == W4A16_AWQ:
        from rtllm.models.calibration import apply_awq, calibration_encoder, calibration_sequences

        encode = calib_tokenize or calibration_encoder(tokenizer_source)
        apply_awq(model, quant_config, calibration_sequences(encode, quant_config))
    report = quantize_linear_layers(model, quant_config, check_patterns=check_patterns)
    weight_bytes = _weight_bytes(model)
    groups: dict[int, int] = {}
    for g in report.quantized.values():
        groups[g] = groups.get(g, 0) + 1
    logger.info("%s: quantized %d linear layers (group size, 0 = per channel: layer count %s) in %.2f s; weights "
                "%.1f MiB -> %.1f MiB (%s; norms stay dense)", quant_config.quant_algo, len(report.quantized), groups,
                time.perf_counter() - t0, dense_bytes / 2**20, weight_bytes / 2**20, report.vocab_summary())
    if quant_config.quant_algo == NVFP4:
        logger.warning("NVFP4: weights are dequantized to 16 bits before every GEMM (Hopper has no FP4 tensor "
                       "cores; there is no FP4 GEMM path here): it saves memory, not time")
    if report.skipped:
        logger.warning("%s: %d layers left dense (linear, embedding or LM head), e.g. %s", quant_config.quant_algo,
                       len(report.skipped), dict(list(report.skipped.items())[:3]))
    return weight_bytes
