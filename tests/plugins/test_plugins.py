"""The plugin interface, through the worked example in examples/plugin_example (docs/PLUGINS.md).

Oracles: transformers on the same checkpoint (the custom architecture is a Llama with its embedding
table scaled; banning a token is transformers' ``bad_words_ids``), and rtllm's own kernels for the
replaced RMSNorm.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.errors import ConfigError, InvalidRequestError, RequestFailedError
from rtllm.kernels import dispatch
from rtllm.logits_processors import registered_logits_processors
from rtllm.models import registry
from rtllm.plugins import ENV_VAR, load_plugins, loaded_plugins
from tests.tiny import VOCAB, hf_greedy, make_checkpoint

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "plugin_example")
MULTIPLIER = 1.7
N = 12
GREEDY = SamplingParams(max_tokens=N, min_tokens=N, temperature=0.0)  # EOS masked, as HF min_new_tokens
PROMPTS = [[5, 9, 13, 40, 41], [100, 7, 7, 7, 3, 250, 1]]


@pytest.fixture(scope="module")
def example():
    """The example plugin, importable and loaded in this process (its kernels unregistered after)."""
    path = os.path.abspath(EXAMPLE_DIR)
    sys.path.insert(0, path)
    load_plugins(["rtllm_plugin_example"])
    yield path
    for name in ("rms_norm", "fused_add_rms_norm"):
        dispatch.unregister_kernel(name, "any")
    sys.path.remove(path)


@pytest.fixture(scope="module")
def scaled_ckpt(tmp_path_factory):
    """A checkpoint of the example architecture (backbone.* names, embedding_multiplier) and its oracle:
    the transformers Llama with the embedding table multiplied (the same function)."""
    path = str(tmp_path_factory.mktemp("scaled"))
    hf = make_checkpoint(path, "llama")
    st = os.path.join(path, "model.safetensors")
    tensors = {("backbone." + k.removeprefix("model.") if k.startswith("model.") else k): v
               for k, v in load_file(st).items()}
    tensors["backbone.format_version"] = torch.tensor([1])
    save_file(tensors, st)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(architectures=["ScaledEmbeddingLlamaForCausalLM"], embedding_multiplier=MULTIPLIER)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(MULTIPLIER)
    return path, hf


def _llm(path: str, **kw) -> LLM:
    kw.setdefault("executor_type", "inprocess")
    return LLM(path, dtype="float32", kv_cache_config=KvCacheConfig(max_tokens=2048), max_batch_size=8,
               max_num_tokens=256, max_seq_len=256, **kw)


def _ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def hf_greedy_banned(model, prompt: list[int], n: int, banned: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, bad_words_ids=[[t] for t in banned], pad_token_id=VOCAB - 1)
    return out[0, len(prompt):].tolist()


def ban_eight(output_token_ids, logits):  # module-level: picklable, so it crosses to a worker process
    logits[8] = float("-inf")
    return logits


def fail_after_two(prompt_token_ids, output_token_ids, logits):  # the three-argument form
    if len(output_token_ids) >= 2:
        raise RuntimeError("boom")
    return logits


# -- the example plugin, in process ------------------------------------------------------------

def test_custom_architecture_matches_transformers(example, scaled_ckpt):
    path, hf = scaled_ckpt
    assert "ScaledEmbeddingLlamaForCausalLM" in registry.supported_architectures()
    with _llm(path) as llm:
        got = _ids(llm, PROMPTS, GREEDY)
    assert got == [hf_greedy(hf, p, N) for p in PROMPTS]


def test_custom_kernel_replaces_rms_norm(example, scaled_ckpt):
    from rtllm_plugin_example.kernels import CALLS

    path, hf = scaled_ckpt
    CALLS.clear()
    with _llm(path) as llm:
        got = _ids(llm, PROMPTS, GREEDY)
    layers = 2  # tiny checkpoint: per forward, 1 plain + (2 * layers) fused norms
    assert CALLS["rms_norm"] >= N and CALLS["fused_add_rms_norm"] >= 2 * layers * N, CALLS
    saved = dispatch.registered_kernels()
    try:  # rtllm's own kernels give the same tokens
        for name in saved:
            dispatch.unregister_kernel(name, "any")
        CALLS.clear()
        with _llm(path) as llm:
            assert _ids(llm, PROMPTS, GREEDY) == got
        assert not CALLS
    finally:
        for name, table in saved.items():
            for device, fn in table.items():
                dispatch.register_kernel(name, fn, device=device)


def test_ban_tokens_processor_matches_transformers_bad_words(example, scaled_ckpt):
    path, hf = scaled_ckpt
    with _llm(path) as llm:
        free = _ids(llm, PROMPTS, GREEDY)
        banned = sorted({free[0][0], free[1][1]})
        params = SamplingParams(max_tokens=N, min_tokens=N, temperature=0.0,
                                logits_processors=[{"name": "ban_tokens", "kwargs": {"token_ids": banned}}])
        got = _ids(llm, PROMPTS, params)
        by_path = SamplingParams(max_tokens=N, min_tokens=N, temperature=0.0, logits_processors=[
            {"name": "rtllm_plugin_example.processors:BanTokens", "kwargs": {"token_ids": banned}}])
        assert _ids(llm, PROMPTS, by_path) == got
    assert got == [hf_greedy_banned(hf, p, N, banned) for p in PROMPTS]
    assert not set(banned) & {t for ids in got for t in ids}


# -- logits processors: forms and failures ------------------------------------------------------

def test_callable_processors_and_errors_in_process(example, scaled_ckpt):
    path, hf = scaled_ckpt
    with _llm(path) as llm:
        got = _ids(llm, PROMPTS, SamplingParams(max_tokens=N, min_tokens=N, temperature=0.0,
                                                logits_processors=[ban_eight]))
        assert got == [hf_greedy_banned(hf, p, N, [8]) for p in PROMPTS]
        # a lambda is fine in process
        assert _ids(llm, PROMPTS, SamplingParams(max_tokens=N, min_tokens=N, temperature=0.0,
                                                 logits_processors=[lambda ids, lg: ban_eight(ids, lg)])) == got
        with pytest.raises(InvalidRequestError, match="unknown logits processor 'nope'"):
            llm.generate(PROMPTS[0], SamplingParams(logits_processors=["nope"]))
        with pytest.raises(InvalidRequestError, match="could not be imported"):
            llm.generate(PROMPTS[0], SamplingParams(logits_processors=[{"name": "no.such.module:f", "kwargs": {}}]))
        # a failing processor fails its own request; the other one in the batch and later ones go on
        bad = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=N, temperature=0.0,
                                                            logits_processors=[fail_after_two]))
        good = llm.generate_async(PROMPTS[1], GREEDY)
        with pytest.raises(RequestFailedError, match="boom"):
            bad.result()
        assert good.result().outputs[0].token_ids == hf_greedy(hf, PROMPTS[1], N)
        with pytest.raises(RequestFailedError, match="ValueError: token_ids must be a non-empty list"):
            llm.generate(PROMPTS[0], SamplingParams(logits_processors=[{"name": "ban_tokens",
                                                                         "kwargs": {"token_ids": []}}]))
        assert _ids(llm, PROMPTS[:1], GREEDY) == [hf_greedy(hf, PROMPTS[0], N)]
    with pytest.raises(InvalidRequestError, match="logits_processors"):
        SamplingParams(logits_processors=ban_eight)
    with pytest.raises(InvalidRequestError, match="a dict needs 'name'"):
        SamplingParams(logits_processors=[{"kwargs": {}}])


def test_plugins_load_in_the_worker_process(example, scaled_ckpt, tmp_path, monkeypatch):
    """The default executor runs the engine in a spawned worker: RTLLM_PLUGINS loads the example there
    (architecture, counting kernel, processors by name); module-level callables are pickled over."""
    path, hf = scaled_ckpt
    counts = tmp_path / "counts.json"
    monkeypatch.setenv(ENV_VAR, "rtllm_plugin_example")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([example, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RTLLM_EXAMPLE_COUNT_FILE", str(counts))
    banned = [hf_greedy(hf, PROMPTS[0], 1)[0]]
    with _llm(path, executor_type="multiprocess") as llm:
        assert _ids(llm, PROMPTS, GREEDY) == [hf_greedy(hf, p, N) for p in PROMPTS]
        named = SamplingParams(max_tokens=N, min_tokens=N, temperature=0.0,
                               logits_processors=[{"name": "ban_tokens", "kwargs": {"token_ids": banned}},
                                                  ban_eight])
        assert _ids(llm, PROMPTS, named) == [hf_greedy_banned(hf, p, N, banned + [8]) for p in PROMPTS]
        with pytest.raises(InvalidRequestError, match="cannot be sent to the engine's worker process"):
            llm.generate(PROMPTS[0], SamplingParams(logits_processors=[lambda ids, lg: lg]))
    with open(counts) as f:
        worker = json.load(f)
    assert worker["pid"] != os.getpid() and worker["rms_norm"] > 0 and worker["fused_add_rms_norm"] > 0, worker


# -- registries and discovery ----------------------------------------------------------------------

def test_entry_point_discovery(tmp_path, monkeypatch):
    """A package that declares an 'rtllm.plugins' entry point is loaded by load_plugins()."""
    (tmp_path / "ep_plugin_mod.py").write_text(textwrap.dedent("""
        from rtllm.logits_processors import register_logits_processor

        def register():
            register_logits_processor("ep_marker", lambda ids, logits: logits)
    """))
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rtllm.plugins]\nmarker = ep_plugin_mod:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ep_marker" not in registered_logits_processors()
    new = load_plugins()
    assert "ep_plugin_mod:register" in new and "ep_plugin_mod:register" in loaded_plugins()
    assert registered_logits_processors()["ep_marker"] == "processor"
    assert load_plugins() == []  # once per process


def test_broken_plugin_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin_mod.py").write_text("raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ENV_VAR, "broken_plugin_mod")
    with pytest.raises(ConfigError, match=r"plugin 'broken_plugin_mod' \(RTLLM_PLUGINS\).*missing dependency xyz"):
        load_plugins()


def test_model_registry_api():
    from rtllm.models.llama import LlamaForCausalLM

    class NotAModel:
        pass

    with pytest.raises(TypeError, match="lacks"):
        registry.register_model("NotAModelForCausalLM", NotAModel)

    class Variant(LlamaForCausalLM):
        pass

    assert registry.register_model("TestVariantForCausalLM", Variant, weight_name_map=str.lower) is Variant
    assert registry.get_model_class(["Unknown", "TestVariantForCausalLM"]) is Variant
    assert registry.weight_name_map(Variant) is str.lower
    with pytest.raises(registry.UnsupportedArchitectureError, match="plugin can add one"):
        registry.get_model_class(["NoSuchForCausalLM"])


def test_kernel_registry_api():
    x = torch.randn(3, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="unknown kernel 'softmax'"):
        dispatch.register_kernel("softmax", lambda t: t)
    with pytest.raises(ValueError, match="device='tpu'"):
        dispatch.register_kernel("rms_norm", lambda *a: a[0], device="tpu")
    from rtllm.kernels import norm

    want = norm.rms_norm_torch(x, w, 1e-6)
    saved = dispatch.registered_kernels().get("rms_norm", {})
    try:
        dispatch.register_kernel("rms_norm", lambda x, w, eps: torch.zeros_like(x), device="any")
        dispatch.register_kernel("rms_norm", lambda x, w, eps: torch.ones_like(x), device="cpu")
        assert torch.equal(norm.rms_norm(x, w, 1e-6), torch.ones_like(x))  # device-specific wins
        dispatch.unregister_kernel("rms_norm", "cpu")
        assert torch.equal(norm.rms_norm(x, w, 1e-6), torch.zeros_like(x))
        dispatch.unregister_kernel("rms_norm", "any")
        assert torch.equal(norm.rms_norm(x, w, 1e-6), want)
    finally:
        for device, fn in saved.items():
            dispatch.register_kernel("rms_norm", fn, device=device)


def test_plugin_architecture_builds_into_an_engine(example, scaled_ckpt, tmp_path):
    from rtllm.builder import BuildConfig, build
    from rtllm.quantization.config import QuantConfig

    path, _ = scaled_ckpt
    qc = QuantConfig("W8A16")
    out = str(tmp_path / "engine")
    build(path, BuildConfig(quant_config=qc, max_batch_size=8, max_num_tokens=256, max_input_len=64,
                            max_seq_len=256), out, device="cpu")
    with _llm(path, quant_config=qc) as llm:
        want = _ids(llm, PROMPTS, GREEDY)
    with _llm(out) as llm:
        assert _ids(llm, PROMPTS, GREEDY) == want
