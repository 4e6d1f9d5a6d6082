"""build(model, BuildConfig, output_dir): turn a checkpoint into an engine directory.

Steps: validate the BuildConfig, load the checkpoint (HF directory or GGUF file) with
rtllm.models.loader.load_model, which fuses q|k|v and gate|up while loading and applies the
quantization (AWQ calibration included), check the limits against the model, then write the
engine directory (layout: rtllm.models.engine_dir): ``config.json``, ``rank0.safetensors`` with the
parameters exactly as the runtime holds them (one ``rank{r}.safetensors`` per rank when tp_size *
pp_size > 1: each rank's slice is loaded, reading only its shard, quantized and written in turn),
the tokenizer files (copied from an HF directory, exported from a GGUF file's metadata and checked
against it), and ``build_log.json``.

Same inputs on the same machine give byte-identical ``config.json`` and weights (no timestamps or
paths in them; the log has those). A build on a GPU also times the decode GEMV kernels' launch
configurations for the model's shapes and writes the fastest to ``kernel_tuning.json``
(rtllm.builder.tuning; ``BuildConfig.tune_kernels``), which differs between builds as timings do.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from rtllm.builder.build_config import BuildConfig
from rtllm.builder.tuning import decode_gemv_shapes, tune_gemvs
from rtllm.errors import ConfigError, ModelLoadError
from rtllm.models.engine_dir import (
    BUILD_LOG_NAME,
    CONFIG_NAME,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    TUNING_NAME,
    engine_tensors,
    is_engine_dir,
    kv_cache_scales,
    rank_weights_name,
)
from rtllm.models.gguf_reader import GGUFTokenizerData
from rtllm.models.loader import load_model
from rtllm.parallel.mapping import Mapping
from rtllm.plugins import load_plugins
from rtllm.tokenizer import Tokenizer, build_gguf_backend

logger = logging.getLogger(__name__)

# the files Tokenizer.from_pretrained (and transformers) read from an HF directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")
_PROBE = "Hello, world! The capital of France is Paris. 1234 + 5678 = 6912.\n<|im_start|>user\nhi<|im_end|>"


def _rtllm_version() -> str:
    # not rtllm.__version__: importing the package module would import the user API above this layer
    try:
        return importlib.metadata.version("rtllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class BuildResult:
    output_dir: str
    build_config: BuildConfig  # resolved (max_seq_len filled in)
    log: dict  # what build_log.json holds


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"build device={device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"build device={device!r}: no CUDA device is available")
    return torch.device(device)


def _prepare_output(output_dir: str) -> None:
    if os.path.isfile(output_dir):
        raise ConfigError(f"output_dir={output_dir!r} is a file; give a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not is_engine_dir(output_dir):
        raise ConfigError(f"output_dir={output_dir!r} exists and is not an engine directory; refusing to write "
                          f"into it (give a new or empty directory, or an engine directory to replace)")
    os.makedirs(output_dir, exist_ok=True)


def build(model: str, build_config: BuildConfig | None = None, output_dir: str | None = None,
          device: str = "auto") -> BuildResult:
    """Build ``model`` (an HF checkpoint directory or a .gguf file; a bare config.json gives random
    weights) into the engine directory ``output_dir`` for ``device`` ("auto": CUDA when available).
    The device matters: packed INT4 layouts differ between the CPU and CUDA kernels, and an engine
    loads only on the device type it was built for."""
    t_start = time.perf_counter()
    load_plugins()  # a plugin's architecture builds like a built-in one
    bc = build_config if build_config is not None else BuildConfig()
    if not isinstance(bc, BuildConfig):
        raise ConfigError(f"build_config must be a BuildConfig, got {type(bc).__name__}")
    if not output_dir:
        raise ConfigError("build() needs an output_dir")
    if not isinstance(model, str) or not os.path.exists(model):
        raise ModelLoadError(f"model path {model!r} does not exist (give an HF checkpoint directory or a .gguf file)")
    if is_engine_dir(model):
        raise ConfigError(f"{model!r} is already an engine directory; build from the original checkpoint")
    dev = _resolve_device(device)
    qc = bc.quant_config
    if (bc.tp_size * bc.pp_size > 1 and qc is not None and qc.kv_cache_quant_algo
            and qc.kv_cache_scales == "calibrate"):
        raise ConfigError("QuantConfig.kv_cache_scales='calibrate' is not supported for an engine split across "
                          f"ranks (tp_size={bc.tp_size}, pp_size={bc.pp_size}): the calibration pass runs on one "
                          "rank; build with kv_cache_scales='static' or at tp_size = pp_size = 1")
    if bc.quant_config is not None:
        bc.quant_config.check_device(dev)
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        from rtllm.models.config import ModelConfig

        model_cfg = ModelConfig.from_file(os.path.join(model, "config.json"))
        bc.resolve(model_cfg.max_position_embeddings)  # fail early
        if bc.tp_size * bc.pp_size > 1:
            Mapping(bc.tp_size * bc.pp_size, bc.tp_size, bc.pp_size,
                    moe_ep_size=bc.moe_ep_size).validate_for(model_cfg)
    _prepare_output(output_dir)

    world = bc.tp_size * bc.pp_size
    load_s = save_s = 0.0
    gemv_shapes: set = set()  # the decode GEMV launches of every rank's slice (rtllm.builder.tuning)
    ranks = []  # per rank: {"weights": {file, bytes, num_tensors}, "quantized_layers": specs}
    by_dtype: Counter = Counter()
    runtime_bytes = 0
    for rank in range(world):  # one rank at a time: its slice loaded (only its shard read), quantized, written
        mapping = Mapping(world, bc.tp_size, bc.pp_size, moe_ep_size=bc.moe_ep_size, rank=rank) if world > 1 else None
        t0 = time.perf_counter()
        loaded = load_model(model, bc.dtype, dev, max_positions=bc.max_seq_len, quant_config=bc.quant_config,
                            mapping=mapping)
        load_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        tensors, specs = engine_tensors(loaded.model)
        name = rank_weights_name(rank)
        weights_path = os.path.join(output_dir, name)
        tmp = weights_path + ".tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})  # one key: safetensors writes metadata in hash order
        os.replace(tmp, weights_path)
        save_s += time.perf_counter() - t0
        ranks.append({"weights": {"file": name, "bytes": os.path.getsize(weights_path), "num_tensors": len(tensors)},
                      "quantized_layers": specs})
        for t in tensors.values():
            by_dtype[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
        runtime_bytes += loaded.weight_bytes
        gemv_shapes.update(decode_gemv_shapes(loaded.model))
        if rank < world - 1:
            del loaded, tensors
    cfg = loaded.config
    bc = bc.resolve(cfg.max_position_embeddings)
    fp8_kv = bc.quant_config is not None and bc.quant_config.kv_cache_quant_algo is not None
    tensors_total = sum(r["weights"]["num_tensors"] for r in ranks)
    weights_bytes = sum(r["weights"]["bytes"] for r in ranks)

    t0 = time.perf_counter()
    tokenizer_files = _write_tokenizer(loaded.tokenizer_source, output_dir)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuning = _tune_kernels(bc, dev, sorted(gemv_shapes), output_dir)
    tune_s = time.perf_counter() - t0

    raw = dict(cfg.raw)
    engine_cfg = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "rtllm_version": _rtllm_version(),
        "torch_version": torch.__version__,
        "architecture": cfg.architecture,
        "model_module": type(loaded.model).__module__,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": dev.type,
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "tp_size": bc.tp_size,
        "pp_size": bc.pp_size,
        **({"moe_ep_size": bc.moe_ep_size, "ranks": ranks} if world > 1 else {}),
        "build_config": bc.to_dict(),
        "quant_config": None if bc.quant_config is None else dataclasses.asdict(bc.quant_config),
        "pretrained_config": raw,
        "eos_token_id": raw.get("eos_token_id"),  # the tokenizer reads it from config.json, as for an HF dir
        "tokenizer_files": tokenizer_files,
        "quantized_layers": ranks[0]["quantized_layers"],
        "weights": ranks[0]["weights"],
        **({"kv_cache_scales": kv_cache_scales(loaded.model)} if world == 1 and fp8_kv else {}),
    }
    try:
        text = json.dumps(engine_cfg, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{model}: the model config cannot be written as JSON: {e}") from e
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(text + "\n")

    log = {
        "source": os.path.abspath(model),
        "output_dir": os.path.abspath(output_dir),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "device": dev.type if dev.type == "cpu" else f"cuda ({engine_cfg['gpu_name']})",
        "rtllm_version": _rtllm_version(),
        "torch_version": torch.__version__,
        "architecture": cfg.architecture,
        "dtype": engine_cfg["dtype"],
        "build_config": bc.to_dict(),
        "timings_s": {"load_fuse_quantize": round(load_s, 3), "save_weights": round(save_s, 3),
                      "tokenizer": round(tokenizer_s, 3), "tune_kernels": round(tune_s, 3),
                      "total": round(time.perf_counter() - t_start, 3)},
        "sizes_bytes": {"weights_file": weights_bytes, "runtime_weights": runtime_bytes,
                        "per_rank": [r["weights"]["bytes"] for r in ranks],
                        "by_dtype": dict(sorted(by_dtype.items()))},
        "num_tensors": tensors_total,
        "quantized_layers": dict(sorted(Counter(s["class"] for r in ranks
                                                for s in r["quantized_layers"].values()).items())),
        "tokenizer_files": tokenizer_files,
        "kernel_tuning": tuning,
    }
    with open(os.path.join(output_dir, BUILD_LOG_NAME), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=2)
        f.write("\n")
    logger.info("built %s -> %s in %.2f s (%d rank%s): %d tensors, %.1f MiB (%s)", model, output_dir,
                log["timings_s"]["total"], world, "s" if world > 1 else "", tensors_total, weights_bytes / 2**20,
                log["quantized_layers"] or "not quantized")
    return BuildResult(output_dir, bc, log)


def _tune_kernels(bc: BuildConfig, dev: torch.device, shapes: list, output_dir: str) -> dict:
    """Tune the decode GEMVs on the build GPU into kernel_tuning.json (rtllm.builder.tuning); a summary for the
    build log. An earlier build's file in the directory is removed first (its GPU or model may differ)."""
    path = os.path.join(output_dir, TUNING_NAME)
    if os.path.exists(path):
        os.remove(path)
    if not bc.tune_kernels:
        return {"skipped": "BuildConfig.tune_kernels=False"}
    if dev.type != "cuda":
        return {"skipped": "a CPU engine runs no Triton kernels: nothing to tune"}
    if not shapes:
        return {"skipped": "the model has no decode GEMV launch to tune"}
    logger.info("tuning %d decode GEMV shapes on %s (BuildConfig.tune_kernels=False skips it)", len(shapes),
                torch.cuda.get_device_name(dev))
    data = tune_gemvs(shapes, dev)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return {"file": TUNING_NAME, "gpu_name": data["gpu_name"], "shapes": len(shapes), "tuned": len(data["gemv"]),
            "failed": len(data["failed"]), "seconds": data["seconds"]}


def _write_tokenizer(source: object, output_dir: str) -> list[str]:
    """Copy an HF directory's tokenizer files, or export a GGUF file's tokenizer; the file names written."""
    if source is None:  # random weights from a bare config.json: no tokenizer
        return []
    if isinstance(source, GGUFTokenizerData):
        return export_gguf_tokenizer(source, output_dir)
    written = []
    for name in TOKENIZER_FILES:
        src = os.path.join(str(source), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(output_dir, name))
            written.append(name)
    return written


def export_gguf_tokenizer(data: GGUFTokenizerData, output_dir: str) -> list[str]:
    """Write a GGUF file's tokenizer as HF files (tokenizer.json, tokenizer_config.json, chat template,
    generation_config.json with its end-of-turn ids), then check that loading them gives the tokenizer
    the GGUF file gives (special tokens, end ids, template, and the ids of a probe text)."""
    backend = build_gguf_backend(data)
    backend.save(os.path.join(output_dir, "tokenizer.json"))

    def token(i: int | None) -> str | None:
        return data.tokens[i] if i is not None and 0 <= i < len(data.tokens) else None

    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(data.bos_token_id),
               "eos_token": token(data.eos_token_id), "add_bos_token": bool(data.add_bos_token),
               "add_eos_token": bool(data.add_eos_token)}
    files = ["tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, indent=2, sort_keys=True)
    if data.chat_template:
        with open(os.path.join(output_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(data.chat_template)
        files.append("chat_template.jinja")
    extra = [i for i in (data.eot_token_id, data.eom_token_id) if i is not None]
    if extra:
        with open(os.path.join(output_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": extra}, f, indent=2)
        files.append("generation_config.json")
    want, got = Tokenizer.from_gguf(data), Tokenizer.from_pretrained(output_dir)
    for what, a, b in (("end-of-sequence ids", want.eos_token_ids, got.eos_token_ids),
                       ("BOS", (want.bos_token_id, want.add_bos_token), (got.bos_token_id, got.add_bos_token)),
                       ("chat template", want.chat_template, got.chat_template),
                       ("probe text ids", want.encode(_PROBE), got.encode(_PROBE))):
        if a != b:
            raise ModelLoadError(f"exporting the GGUF tokenizer of {data.source!r} changed its {what}: {a!r} != {b!r}")
    return sorted(files)
