"""The LLM API on a tiny random checkpoint with a byte-level tokenizer (one token per byte)."""

import asyncio
import json
import time

import pytest
import torch

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from tests.tiny import hf_greedy, make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = make_checkpoint(str(path), "qwen3")
    return str(path), hf


@pytest.fixture(scope="module")
def llm(tiny):
    with LLM(tiny[0], dtype="float32", max_seq_len=256, max_num_tokens=256, max_batch_size=16,
             kv_cache_config=KvCacheConfig(max_tokens=4096, tokens_per_block=16)) as llm:
        yield llm


def used_blocks(llm, timeout: float = 5.0):
    """Blocks in use once the engine has caught up: aborts (a stop string's included) reach the engine
    asynchronously, so wait up to ``timeout`` s for them to be freed."""
    deadline = time.monotonic() + timeout
    while llm.executor.stats().used_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    return llm.executor.stats().used_blocks


def test_generate_text_and_token_ids_match_transformers(llm, tiny):
    _, hf = tiny
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0)
    out = llm.generate("Hello there", params)
    ids = llm.tokenizer.encode("Hello there")
    assert out.prompt == "Hello there" and out.prompt_token_ids == ids and out.finished
    assert out.outputs[0].token_ids == hf_greedy(hf, ids, 12)
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    assert out.outputs[0].finish_reason == "length"
    outs = llm.generate([ids, "abc"], params, use_tqdm=False)
    abc = llm.tokenizer.encode("abc")
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, ids, 12), hf_greedy(hf, abc, 12)]
    m = outs[0].metrics
    assert 0 < m.time_to_first_token <= m.e2e_latency and m.time_per_output_token > 0


def test_seeds(llm):
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=123)
    a = llm.generate("seed test", p).outputs[0].text
    b = llm.generate("seed test", p).outputs[0].text
    c = llm.generate("seed test", SamplingParams(max_tokens=24, temperature=1.0, seed=124)).outputs[0].text
    assert a == b and a != c


def test_seeded_output_independent_of_batch(llm):
    p = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    alone = llm.generate("batch", p).outputs[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0) for _ in range(5)]
    outs = llm.generate(["x", "batch", "yy", "zzz", "w", "v"], [others[0], p, *others[1:]], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone


def test_stop_strings_across_token_boundaries(llm):
    p = dict(max_tokens=30, min_tokens=30, temperature=0)
    base = llm.generate("stop", SamplingParams(**p)).outputs[0]
    text = base.text
    stop = text[5:8]  # several byte tokens: the match spans token boundaries
    assert len(stop.encode()) >= 2
    first = text.find(stop)
    out = llm.generate("stop", SamplingParams(**p, stop=[stop])).outputs[0]
    assert out.text == text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    keep = llm.generate("stop", SamplingParams(**p, stop=stop, include_stop_str_in_output=True)).outputs[0]
    assert keep.text == text[:first + len(stop)]
    assert used_blocks(llm) == 0


def test_stop_token_ids(llm):
    base = llm.generate("tok", SamplingParams(max_tokens=20, temperature=0)).outputs[0]
    stop_tok = base.token_ids[4]
    out = llm.generate("tok", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok])).outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_streaming_deltas_join_to_final_text(llm):
    p = SamplingParams(max_tokens=40, temperature=0.7, seed=3, stop=["zz"])
    final = llm.generate("stream me", p).outputs[0]
    deltas, ids = [], []
    for out in llm.generate_async("stream me", p, streaming=True):
        deltas.append(out.outputs[0].text_diff)
        ids.extend(out.outputs[0].token_ids_diff)
    assert "".join(deltas) == final.text and ids == final.token_ids and out.finished


def test_async_streaming_and_abort_frees_blocks(llm):
    async def main():
        res = llm.generate_async("abort me please", SamplingParams(max_tokens=230, min_tokens=230), streaming=True)
        last = None
        async for last in res:
            if last.outputs[0].finish_reason is None:  # abort at the first chunk, while it holds blocks
                res.abort()
        return last

    out = asyncio.run(main())
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert len(out.outputs[0].token_ids) < 230
    assert used_blocks(llm) == 0  # the engine frees the blocks at its next step


def test_aresult(llm):
    out = asyncio.run(llm.generate_async("hi", SamplingParams(max_tokens=5)).aresult())
    assert out.finished and len(out.outputs[0].token_ids) <= 5


def test_n_and_logprobs(llm):
    out = llm.generate("many", SamplingParams(max_tokens=8, min_tokens=8, temperature=1.0, seed=1, n=3,
                                              logprobs=2))
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    ids = llm.tokenizer.encode("many")
    for o in out.outputs:
        assert len(o.logprobs) == 8
        # check the first token's logprobs against a direct forward
        ref = None
        for tok, entry in zip(o.token_ids[:1], o.logprobs[:1]):
            assert tok in entry and len(entry) in (2, 3)
            ref = entry[tok]
        assert o.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(o.token_ids, o.logprobs)))
        assert ref is not None
    _ = ids


def test_logprobs_values_match_transformers(llm, tiny):
    _, hf = tiny
    ids = llm.tokenizer.encode("lp")
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=3)).outputs[0]
    ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1], -1)
    top = ref.topk(3)
    assert set(out.logprobs[0]) == set(top.indices.tolist())
    for t, v in zip(top.indices.tolist(), top.values.tolist()):
        assert out.logprobs[0][t] == pytest.approx(v, abs=1e-4)


def test_chat(llm, tiny):
    _, hf = tiny
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=6, min_tokens=6, temperature=0))
    text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == hf_greedy(hf, ids, 6)
    with pytest.raises(InvalidRequestError):
        llm.chat([{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("make_bad", [
    lambda llm: llm.generate("", SamplingParams()),
    lambda llm: llm.generate("x" * 300, SamplingParams()),
    lambda llm: llm.generate([5, 10, 99999], SamplingParams()),
    lambda llm: llm.generate([-1], SamplingParams()),
    lambda llm: llm.generate("ok", SamplingParams(max_tokens=0)),
    lambda llm: llm.generate("ok", SamplingParams(temperature=-0.5)),
    lambda llm: llm.generate("ok", SamplingParams(top_p=0.0)),
    lambda llm: llm.generate("ok", SamplingParams(top_p=1.5)),
    lambda llm: llm.generate(3.14, SamplingParams()),
], ids=["empty", "too-long", "id-outside-vocab", "negative-id", "max_tokens-0", "temperature<0", "top_p=0",
        "top_p>1", "not-a-prompt"])
def test_bad_requests_fail_clearly_and_engine_keeps_serving(llm, make_bad):
    other = llm.generate_async("survivor", SamplingParams(max_tokens=30, min_tokens=30, temperature=0))
    with pytest.raises(InvalidRequestError) as e:
        make_bad(llm)
    assert str(e.value)  # names the problem
    assert len(other.result(timeout=60).outputs[0].token_ids) == 30
    assert llm.generate("still fine", SamplingParams(max_tokens=3)).finished


def test_bad_request_messages_name_the_problem(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_seq_len=256"):
        llm.generate("x" * 300, SamplingParams())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([99999], SamplingParams())
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=2)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=-3)


def test_bad_models(tmp_path, tiny):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    # corrupt config.json
    import shutil

    bad = tmp_path / "badcfg"
    shutil.copytree(tiny[0], bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(bad), device="cpu")
    # truncated safetensors
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny[0], trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: 1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(trunc), device="cpu")
    # unsupported architecture names the supported ones
    arch = tmp_path / "arch"
    shutil.copytree(tiny[0], arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        LLM(str(arch), device="cpu")


def test_shutdown_and_context_manager(tiny):
    llm = LLM(tiny[0], dtype="float32", max_seq_len=64, kv_cache_config=KvCacheConfig(max_tokens=256))
    assert llm.generate("a", SamplingParams(max_tokens=2)).finished
    llm.shutdown()
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("a")


def test_cuda_graph_sizes():
    """The ladder stops at the smaller of the config's and the engine's max batch size; explicit
    batch_sizes are captured as given (their largest is the config's max_batch_size), and sizes
    above the engine's limit are left out; a bad size is a ConfigError naming the field."""
    from rtllm.config import CudaGraphConfig
    from rtllm.errors import ConfigError

    assert CudaGraphConfig(max_batch_size=40).capture_sizes(512) == [1, 2, 4, 8, 16, 32, 40]
    assert CudaGraphConfig().capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    explicit = CudaGraphConfig(batch_sizes=[512, 3])
    assert explicit.max_batch_size == 512
    assert explicit.capture_sizes(512) == [3, 512]
    assert explicit.capture_sizes(256) == [3]
    with pytest.raises(ConfigError, match="batch_sizes"):
        CudaGraphConfig(batch_sizes=[0])
