"""Kernel tuning at build time (rtllm.builder.tuning) and its use at load (rtllm.runtime.kernel_tuning): which
decode GEMV launches a model makes, the tuning procedure (run here in the Triton interpreter: the timings
mean nothing on a CPU, the choice among configurations that compute the right product is what is tested),
the engine file, and that a load never tunes. tests/gpu/test_gpu_build_tuning.py builds on a GPU."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import triton

import rtllm.kernels.gemv_tuning as gemv_tuning
from rtllm.builder import BuildConfig, build
from rtllm.builder.tuning import decode_gemv_shapes, tune_gemvs
from rtllm.errors import ModelLoadError
from rtllm.kernels import triton_quant_gemv_config as gemv_cfg
from rtllm.kernels.triton_quant_gemv_config import GemvConfig
from rtllm.layers.linear import Linear
from rtllm.layers.moe import MoeRouter
from rtllm.layers.parallel_linear import RowParallelLinear
from rtllm.layers.quant.int4 import W4A16Linear
from rtllm.models.engine_dir import TUNING_NAME
from rtllm.models.loader import load_model
from rtllm.parallel.mapping import Mapping
from rtllm.quantization.config import QuantConfig
from rtllm.runtime.kernel_tuning import use_engine_tuning
from tests.tiny import VOCAB, make_checkpoint

LIMITS = dict(max_batch_size=8, max_num_tokens=256, max_input_len=128, max_seq_len=512)
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture()
def tuned_table(monkeypatch):
    """The process's GEMV table, restored after the test."""
    monkeypatch.setattr(gemv_cfg, "TUNED", dict(gemv_cfg.TUNED))
    return gemv_cfg.TUNED


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt"))
    make_checkpoint(path, "llama")  # hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, untied head
    return path


# the tiny Llama's projections: qkv (4 + 2 * 2) * 16 = 128 x 64, o 64 x 64, gate|up 256 x 64, down 64 x 128, head
PROJECTIONS = {(128, 64), (64, 64), (256, 64), (64, 128), (VOCAB, 64)}


@pytest.mark.parametrize("quant,kind,rows", [(None, "w16", (1,)), ("W8A16", "w8", (1, 2))])
def test_decode_gemv_shapes_are_the_models_projections(ckpt, quant, kind, rows):
    model = load_model(ckpt, "bfloat16", quant_config=quant and QuantConfig(quant)).model
    assert set(decode_gemv_shapes(model)) == {(kind, m, n, k) for m in rows for n, k in PROJECTIONS}


def test_decode_gemv_shapes_of_int4_layers_and_what_runs_no_gemv():
    torch.manual_seed(0)
    dense = Linear(64, 96)
    dense.weight.data = torch.randn(96, 64).bfloat16()
    biased = Linear(64, 32, bias=True)
    biased.weight.data, biased.bias.data = torch.randn(32, 64).bfloat16(), torch.zeros(32).bfloat16()
    w4 = W4A16Linear.from_linear(dense, 32, backend="triton")
    w4_cpu = W4A16Linear.from_linear(dense, 32, backend="cpu")  # the CPU int4 kernel's layout: no GEMV
    fp32 = Linear(64, 16)  # the GEMV reads 16-bit weights only
    # a row-parallel layer (tp 2: half the input columns) adds its bias after the all-reduce: bias-free GEMM
    row = RowParallelLinear(128, 48, True, Mapping(2, tp_size=2, rank=1)).to(torch.bfloat16)
    router = MoeRouter(64, 8).to(torch.bfloat16)  # its GEMM where the fused router launch does not run
    model = torch.nn.ModuleList([w4, w4_cpu, biased, fp32, row, router])
    assert decode_gemv_shapes(model) == [("w16", 1, 8, 64), ("w16", 1, 48, 64), ("w4g32", 1, 96, 64),
                                         ("w4g32", 2, 96, 64)]


def test_tuning_picks_a_configuration_that_runs_and_the_table_uses_it(tuned_table):
    """The interpreter runs each candidate (a 48-column tile cannot be laid out: reported and skipped); the
    chosen one is among those that ran, with its product checked; the table then returns it."""
    shapes = [("w8", 1, 64, 128), ("w4g32", 2, 64, 128), ("w16", 1, 32, 64), ("fp8", 1, 32, 64)]
    configs = {k: [GemvConfig(16, 64, 1, 4), GemvConfig(32, 32, 2, 4, False)] for k in shapes}
    configs[("w8", 1, 64, 128)].append(GemvConfig(48, 64, 1, 4))
    data = tune_gemvs(shapes, torch.device("cpu"), configs)
    assert data["gpu_name"] is None and data["triton_version"] == triton.__version__ and data["seconds"] > 0
    assert [(r["kind"], r["M"], r["N"], r["K"]) for r in data["gemv"]] == shapes
    assert list(data["failed"]) == ["w8 M=1 N=64 K=128"] and "n48k64s1w4p" in data["failed"]["w8 M=1 N=64 K=128"][0]
    for row, key in zip(data["gemv"], shapes):
        chosen = GemvConfig(row["block_n"], row["block_k"], row["split"], row["num_warps"], row["prefetch"])
        assert chosen in configs[key][:2] and row["us"] > 0
    assert gemv_cfg.use_tuned(data["gemv"]) == 4
    for row, (kind, M, N, K) in zip(data["gemv"], shapes):
        assert gemv_cfg.gemv_config(kind, M, N, K, 132).block_n == row["block_n"]


def _tuning(gpu: str, version: str = triton.__version__) -> dict:
    row = {"kind": "w8", "M": 1, "N": 4096, "K": 4096, "block_n": 8, "block_k": 2048, "split": 1, "num_warps": 8,
           "prefetch": True, "tc": False, "stages": 3, "us": 9.0}
    return {"gpu_name": gpu, "triton_version": version, "gemv": [row], "failed": {}, "seconds": 1.0}


def test_engine_tuning_is_used_only_on_its_gpu_and_triton(tuned_table, caplog):
    before = gemv_cfg.gemv_config("w8", 1, 4096, 4096, 132)
    with caplog.at_level(logging.WARNING, logger="rtllm.runtime.kernel_tuning"):
        assert use_engine_tuning(_tuning(H100), "NVIDIA H200", "e") == 0
        assert use_engine_tuning(_tuning(H100, "0.0.1"), H100, "e") == 0
    assert "tuned on NVIDIA H100 80GB HBM3" in caplog.text and "with Triton 0.0.1" in caplog.text
    assert use_engine_tuning(_tuning(H100), None, "e") == 0  # a CPU
    assert gemv_cfg.gemv_config("w8", 1, 4096, 4096, 132) == before
    assert use_engine_tuning(_tuning(H100), H100, "e") == 1
    assert gemv_cfg.gemv_config("w8", 1, 4096, 4096, 132) == GemvConfig(8, 2048, 1, 8, True)
    bad = _tuning(H100)
    bad["gemv"][0]["block_n"] = "wide"
    with pytest.raises(ValueError, match="GEMV configuration row"):
        use_engine_tuning(bad, H100, "e")


def test_the_environment_file_wins_over_an_engines_tuning(tuned_table, tmp_path, monkeypatch):
    """RTLLM_QUANT_GEMV_CONFIG (the user's explicit table) keeps its shapes; the engine's others apply."""
    env_row = dict(_tuning(H100)["gemv"][0], block_n=64, block_k=256)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([env_row]))
    monkeypatch.setenv("RTLLM_QUANT_GEMV_CONFIG", str(path))
    monkeypatch.setattr(gemv_cfg, "_env_loaded", False)
    monkeypatch.setattr(gemv_cfg, "_env_keys", set())
    other = dict(env_row, N=1024, block_n=4)
    assert gemv_cfg.use_tuned(_tuning(H100)["gemv"] + [other]) == 1
    assert gemv_cfg.gemv_config("w8", 1, 4096, 4096, 132).block_n == 64
    assert gemv_cfg.gemv_config("w8", 1, 1024, 4096, 132).block_n == 4


def test_cpu_build_tunes_nothing_and_says_why(ckpt, tmp_path):
    out = str(tmp_path / "engine")
    os.makedirs(out)
    log = build(ckpt, BuildConfig(quant_config=QuantConfig("W8A16"), **LIMITS), out, device="cpu").log
    assert "CPU engine runs no Triton kernels" in log["kernel_tuning"]["skipped"]
    assert not os.path.exists(os.path.join(out, TUNING_NAME))
    with open(os.path.join(out, TUNING_NAME), "w") as f:  # an earlier build's file goes on a rebuild
        json.dump(_tuning(H100), f)
    log = build(ckpt, BuildConfig(tune_kernels=False, **LIMITS), out, device="cpu").log
    assert log["kernel_tuning"] == {"skipped": "BuildConfig.tune_kernels=False"}
    assert not os.path.exists(os.path.join(out, TUNING_NAME))


def test_engine_load_reads_the_tuning_and_never_tunes(ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "engine")
    build(ckpt, BuildConfig(**LIMITS), out, device="cpu")
    assert load_model(out).kernel_tuning is None
    with open(os.path.join(out, TUNING_NAME), "w") as f:
        json.dump(_tuning(H100), f)

    def boom(*a, **k):
        raise AssertionError("loading an engine directory must not tune kernels")

    monkeypatch.setattr(gemv_tuning, "tune", boom)
    assert load_model(out).kernel_tuning == _tuning(H100)
    for text in ("{not json", json.dumps({"gpu_name": H100, "gemv": "all"})):
        with open(os.path.join(out, TUNING_NAME), "w") as f:
            f.write(text)
        with pytest.raises(ModelLoadError, match=TUNING_NAME):
            load_model(out)
