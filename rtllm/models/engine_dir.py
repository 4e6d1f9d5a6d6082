"""Engine directories (written by ``rtllm build``): read them back into a ready model.

An engine directory holds a model exactly as the runtime runs it, already fused and quantized:

- ``config.json``: ``format`` = ENGINE_FORMAT and ``format_version`` (the marker ``load_model``
  detects), the rtllm and torch versions it was built with, the model's own config
  (``pretrained_config``, the HF-shaped dict ``ModelConfig`` reads), the build config (limits the
  runtime takes as defaults), the quant config, the weights' dtype, the device type (and GPU name)
  the layouts were packed for, one spec per quantized layer (class, plain attributes, tensor
  names: rtllm.layers.quant.serialize; the INT8 embedding and LM head included), the size of
  the weights file, and with an FP8 KV cache ``kv_cache_scales`` (each attention layer's
  [k_scale, v_scale], calibrated at build time);
- ``rank0.safetensors``: every parameter by its rtllm name (fused ``qkv_proj`` / ``gate_up_proj``),
  quantized layers as their packed tensors and scales; a tied LM head is stored once (dense: under
  the embedding's ``weight``; INT8: its spec's ``tied`` maps ``qweight`` / ``scales`` to the
  embedding's tensors, which both layers hold again after loading). An engine built for
  tp_size * pp_size > 1 ranks holds one ``rank{r}.safetensors`` per rank (that rank's slice, already
  quantized), and config.json lists them under ``ranks`` (each rank's ``weights`` and
  ``quantized_layers``; the top-level entries are rank 0's); it loads only with the same tp / pp;
- the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, chat template...), so the
  directory loads alone;
- ``build_log.json``: what the build did and how long it took (not read when loading);
- ``kernel_tuning.json`` (a build on a GPU, rtllm.builder.tuning): the decode GEMV launch configurations
  timed fastest on the build GPU, with its name and the Triton version (read when loading; the runtime
  uses them only on the same GPU and Triton). Timings differ between builds, so this file does too.

Loading builds the model's modules, swaps each quantized layer for one restored from its tensors
and copies the rest: nothing is quantized or calibrated. Wrong marker, another format version, a
missing or truncated weights file, missing, extra or misshapen tensors: each a ModelLoadError
naming the file and the culprit. Writing is rtllm.builder's (``engine_tensors`` collects what to
write, so the layout is defined here once).
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from safetensors import SafetensorError, safe_open

from rtllm.errors import ConfigError, ModelLoadError
from rtllm.layers.quant.base import frozen
from rtllm.layers.quant.serialize import is_quantized_layer, layer_spec, restore_quantized_layer
from rtllm.models.config import ModelConfig, parse_dtype
from rtllm.models.registry import get_model_class

logger = logging.getLogger(__name__)

ENGINE_FORMAT = "rtllm-engine"
ENGINE_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "rank0.safetensors"  # rank_weights_name(0): the one file of a single-rank engine
BUILD_LOG_NAME = "build_log.json"
TUNING_NAME = "kernel_tuning.json"
_REQUIRED_KEYS = ("pretrained_config", "build_config", "dtype", "device", "quantized_layers", "weights")


def is_engine_dir(path: str) -> bool:
    """Whether ``path`` is a directory whose config.json carries the engine marker."""
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == ENGINE_FORMAT


def read_engine_config(path: str) -> dict:
    """The engine directory's config.json, checked for the marker, the format version and its keys."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path!r} is not an engine directory: no {CONFIG_NAME}") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"engine directory {path!r}: {CONFIG_NAME} is unreadable: {e}") from e
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        raise ModelLoadError(f"{cfg_path}: not an rtllm engine config (format is not {ENGINE_FORMAT!r})")
    version = data.get("format_version")
    if version != ENGINE_FORMAT_VERSION:
        raise ModelLoadError(
            f"{cfg_path}: engine format version {version!r} (built by rtllm {data.get('rtllm_version', '?')}); "
            f"this rtllm reads version {ENGINE_FORMAT_VERSION}: rebuild the engine with `rtllm build`")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelLoadError(f"{cfg_path}: engine config lacks {missing} (corrupt or hand-edited): rebuild it")
    world = data.get("tp_size", 1) * data.get("pp_size", 1)
    ranks = data.get("ranks")
    if world > 1 and (not isinstance(ranks, list) or len(ranks) != world
                      or not all(isinstance(r, dict) and {"weights", "quantized_layers"} <= set(r) for r in ranks)):
        raise ModelLoadError(f"{cfg_path}: an engine for {world} ranks must list {world} 'ranks' entries with "
                             f"'weights' and 'quantized_layers' (corrupt or hand-edited): rebuild it")
    return data


def rank_weights_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def check_engine_mapping(data: dict, mapping, path: str) -> int:
    """The rank of this load in an engine built for data's tp / pp; a ConfigError names a mismatch."""
    built = (data.get("tp_size", 1), data.get("pp_size", 1))
    want = (mapping.tp_size, mapping.pp_size) if mapping is not None else (1, 1)
    if built != want:
        raise ConfigError(f"the engine at {path!r} was built for tp_size={built[0]}, pp_size={built[1]} (one weights "
                          f"file per rank); this load asks for tp_size={want[0]}, pp_size={want[1]}: load it with "
                          f"tensor_parallel_size={built[0]}, pipeline_parallel_size={built[1]} (--tp / --pp), or "
                          f"rebuild it with --tp {want[0]} --pp {want[1]}")
    if mapping is not None and built != (1, 1):
        layout = data.get("moe_ep_size", 1)
        if mapping.moe_ep_size != layout:
            raise ConfigError(f"the engine at {path!r} was built with moe_expert_parallel_size={layout}; this load "
                              f"asks for {mapping.moe_ep_size}: load it with the same, or rebuild it")
    return 0 if mapping is None else mapping.rank


def engine_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What an engine directory stores of a loaded model: (tensors by parameter name, contiguous on
    the CPU; quantized layer name -> its spec). A tied parameter is stored under its first name; a
    quantized layer holding it records ``tied``: {its parameter name: the stored name}."""
    tensors: dict[str, torch.Tensor] = {}
    stored_as: dict[int, str] = {}
    storages: set[int] = set()
    for name, p in model.named_parameters():  # remove_duplicate: a tied LM head is listed once
        stored_as[id(p)] = name
        t = p.detach()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # distinct parameters viewing the same memory (safetensors refuses that): a copy
            t = t.clone()
        storages.add(ptr)
        tensors[name] = t.contiguous().cpu()
    specs = {}
    for name, m in model.named_modules():
        if not is_quantized_layer(m):
            continue
        spec = layer_spec(m)
        tied = {t: stored_as[id(p)] for t, p in m.named_parameters(recurse=False)
                if p is not None and stored_as[id(p)] != f"{name}.{t}"}
        if tied:
            spec["tied"] = tied
        specs[name] = spec
    return tensors, specs


def kv_cache_scales(model: torch.nn.Module) -> dict[str, list[float]]:
    """{attention layer name: [k_scale, v_scale]}: an FP8 KV cache's per-layer scales, as config.json
    stores them (``kv_cache_scales``; calibrated at build time, or 1.0)."""
    from rtllm.layers.attention import Attention

    return {n: [m.k_scale, m.v_scale] for n, m in model.named_modules() if isinstance(m, Attention)}


def _set_kv_cache_scales(model: torch.nn.Module, stored: dict, where: str) -> None:
    from rtllm.layers.attention import Attention

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    if not isinstance(stored, dict) or set(stored) != set(layers) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) and x > 0 for x in v)
            for v in stored.values()):
        raise ModelLoadError(f"{where}: 'kv_cache_scales' must give [k_scale, v_scale] (positive) for each of the "
                             f"{len(layers)} attention layers (corrupt or hand-edited engine config): rebuild it")
    for name, (k, v) in stored.items():
        layers[name].k_scale, layers[name].v_scale = k, v


def load_engine_dir(path: str, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
                    max_positions: int | None = None, quant_config: object | None = None, mapping=None):
    """Load a built engine (see the module doc) onto ``device``; returns a loader.LoadedModel.

    ``dtype`` must be "auto" or the dtype it was built with; ``quant_config``, when it quantizes,
    must equal the stored one (the weights are already quantized: nothing is requantized).
    ``max_positions`` (the rotary table's length) defaults to the built max_seq_len. ``mapping``
    (rtllm.parallel.Mapping, for an engine built for several ranks): this rank's slice, read from its
    own file; its tp / pp must be the engine's."""
    from rtllm.models.loader import LoadedModel, _weight_bytes, build_model

    t0 = time.perf_counter()
    device = torch.device(device)
    data = read_engine_config(path)
    rank = check_engine_mapping(data, mapping, path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    config = ModelConfig.from_dict(data["pretrained_config"], source=cfg_path)
    if mapping is not None and mapping.world_size > 1:
        mapping.validate_for(config)
        config.mapping = mapping
    entry = data["ranks"][rank] if "ranks" in data else data  # the top-level entries are rank 0's
    weights_info, specs = entry["weights"], entry["quantized_layers"]
    weights_path = os.path.join(path, rank_weights_name(rank))
    built_dtype = parse_dtype(data["dtype"])
    if dtype != "auto" and parse_dtype(dtype) != built_dtype:
        raise ConfigError(f"dtype={dtype!r}: the engine at {path!r} was built with dtype "
                          f"{data['dtype']!r}; pass dtype='auto' or rebuild it with the dtype you want")
    _check_quant_config(quant_config, data.get("quant_config"), path)
    _check_device(data, device, path)
    try:
        model_cls = get_model_class(config.architectures)
    except ModelLoadError as e:
        module = data.get("model_module")
        hint = f" (it was built with the class from module {module!r}: load that plugin, e.g. " \
               f"RTLLM_PLUGINS={module.rsplit('.', 1)[0]})" if module and not module.startswith("rtllm.") else ""
        raise ModelLoadError(f"{path}: {e}{hint}") from e
    max_positions = max_positions or int(data["build_config"].get("max_seq_len") or config.max_position_embeddings)

    _check_weights_file(weights_path, weights_info)
    model = build_model(model_cls, config, built_dtype, device, max_positions)

    try:
        with safe_open(weights_path, framework="pt", device=str(device)) as f:
            names = set(f.keys())
            _restore_quantized(model, specs, names, f, weights_path)
            _load_dense(model, names, f, weights_path)
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read engine weights {weights_path}: {e}") from e
    if "kv_cache_scales" in data:
        _set_kv_cache_scales(model, data["kv_cache_scales"], cfg_path)
    secs = time.perf_counter() - t0
    weight_bytes = _weight_bytes(model)
    logger.info("loaded engine %s (%s, %s, %s) in %.2f s: %.1f MiB of weights, nothing re-quantized", path,
                config.architecture, data["dtype"],
                (data.get("quant_config") or {}).get("quant_algo") or "not quantized", secs, weight_bytes / 2**20)
    kv_algo = (data.get("quant_config") or {}).get("kv_cache_quant_algo")
    return LoadedModel(model, config, built_dtype, path, secs, weight_bytes, kv_cache_quant_algo=kv_algo,
                       kernel_tuning=read_kernel_tuning(path))


def read_kernel_tuning(path: str) -> dict | None:
    """The engine's kernel_tuning.json (see the module doc), None when it has none; a file that is not a JSON
    object with ``gpu_name``, ``triton_version`` and a list ``gemv`` of objects is a ModelLoadError."""
    file = os.path.join(path, TUNING_NAME)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: cannot read the kernel tuning ({e}); rebuild the engine, or delete the file "
                             f"to run with the built-in kernel configurations") from e
    ok = (isinstance(data, dict) and {"gpu_name", "triton_version", "gemv"} <= set(data)
          and isinstance(data["gemv"], list) and all(isinstance(r, dict) for r in data["gemv"]))
    if not ok:
        raise ModelLoadError(f"{file}: not a kernel tuning file (a JSON object with gpu_name, triton_version and a "
                             f"list gemv of configurations); rebuild the engine, or delete the file")
    return data


def _check_quant_config(quant_config: object | None, stored: dict | None, path: str) -> None:
    algo = getattr(quant_config, "quant_algo", None)
    exclude = getattr(quant_config, "exclude_modules", None) or None
    if algo is None and exclude is None:
        return
    stored = stored or {}
    keys = ("quant_algo", "group_size", "kv_cache_quant_algo", "exclude_modules") if algo is not None else (
        "exclude_modules",)  # no algorithm: only the opt-out (which applies to a pre-quantized source) is compared
    want = {k: stored.get(k) for k in keys}
    if algo is not None and getattr(quant_config, "kv_cache_quant_algo", None):
        want["kv_cache_scales"] = stored.get("kv_cache_scales", "static")  # engines from before the field: static
    got = {k: getattr(quant_config, k, None) for k in want}
    want["exclude_modules"] = want["exclude_modules"] or None  # [] and None both exclude nothing
    got["exclude_modules"] = got["exclude_modules"] or None
    if got.get("group_size", 0) is None:
        want["group_size"] = got["group_size"] = None  # "the format's default" matches what was built
    if got != want:
        raise ConfigError(f"quant_config={got}: the engine at {path!r} is already quantized as {want}; "
                          f"load it without a quant_config (or rebuild it with the one you want)")


def _check_device(data: dict, device: torch.device, path: str) -> None:
    built = data["device"]
    if built != device.type:
        raise ModelLoadError(f"the engine at {path!r} was built for {built!r} (its packed weight layouts are that "
                             f"device's); this load is on {device.type!r}: rebuild it there with `rtllm build`")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        if data.get("gpu_name") and data["gpu_name"] != gpu:
            logger.warning("the engine at %s was built on %s; this GPU is %s (it runs, with the built-in kernel "
                           "configurations instead of those tuned at build: rebuild it here to tune for this GPU)",
                           path, data["gpu_name"], gpu)
    if data.get("torch_version") and data["torch_version"] != torch.__version__:
        logger.warning("the engine at %s was built with torch %s; this is torch %s (packed int4 layouts may "
                       "differ between versions: rebuild if outputs look wrong)", path, data["torch_version"],
                       torch.__version__)


def _check_weights_file(weights_path: str, info: dict) -> None:
    if not os.path.isfile(weights_path):
        raise ModelLoadError(f"engine weights {weights_path} are missing: the directory is incomplete, rebuild it")
    size, want = os.path.getsize(weights_path), info.get("bytes") if isinstance(info, dict) else None
    if want is not None and size != want:
        raise ModelLoadError(f"engine weights {weights_path} have {size} bytes, config.json says {want}: the file "
                             f"is truncated or was replaced; rebuild the engine")


_ALIGN = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` at a 64-byte aligned address: tensors read from a safetensors file sit at the file's offsets
    (8-byte aligned), and some CPU kernels (torch's int8 weight-only GEMM) crash on such addresses."""
    return t.clone() if t.data_ptr() % _ALIGN else t


def _restore_quantized(model: torch.nn.Module, specs: dict[str, dict], names: set[str], f, where: str) -> None:
    shared: dict[str, torch.nn.Parameter] = {}  # stored name -> the one Parameter every layer holding it gets
    for layer_name, spec in specs.items():
        try:
            dense = model.get_submodule(layer_name)
        except AttributeError as e:
            raise ModelLoadError(f"{where}: quantized layer {layer_name!r} is not a module of "
                                 f"{type(model).__name__}") from e
        tied = spec.get("tied") or {}
        if not isinstance(tied, dict) or not set(tied) <= set(spec.get("tensors", ())):
            raise ModelLoadError(f"{where}: layer {layer_name!r}: bad 'tied' entry {tied!r} (corrupt engine "
                                 f"directory: rebuild it)")
        tensors = {}
        for t in spec.get("tensors", ()):
            full = tied.get(t, f"{layer_name}.{t}")
            if full not in shared:
                if full not in names:
                    raise ModelLoadError(f"{where}: tensor {full!r} is missing (corrupt engine directory: rebuild it)")
                shared[full] = frozen(_aligned(f.get_tensor(full)))
                names.discard(full)
            tensors[t] = shared[full]
        try:
            new = restore_quantized_layer(spec, tensors, dense)
        except ValueError as e:
            raise ModelLoadError(f"{where}: layer {layer_name!r}: {e}") from e
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def _load_dense(model: torch.nn.Module, names: set[str], f, where: str) -> None:
    params = dict(model.named_parameters())  # after the swap: the quantized layers' own are consumed
    quantized = {n for n, m in model.named_modules() if is_quantized_layer(m)}
    for name in sorted(params):
        if name.rpartition(".")[0] in quantized:
            continue
        if name not in names:
            raise ModelLoadError(f"{where}: tensor {name!r} is missing (corrupt engine directory: rebuild it)")
        t = _aligned(f.get_tensor(name))
        p = params[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ModelLoadError(f"{where}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, the model expects "
                                 f"{tuple(p.shape)} {p.dtype} (corrupt engine directory or another model)")
        p.data = t
        names.discard(name)
    if names:
        extra = sorted(names)
        raise ModelLoadError(f"{where}: {len(extra)} tensors match no parameter, e.g. {extra[:5]} (the engine was "
                             f"built for another model class: rebuild it)")
