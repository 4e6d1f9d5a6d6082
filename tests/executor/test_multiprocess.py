"""The multi-process executor: the engine loop in a spawned worker, driven over ZeroMQ.

Oracles: the in-process executor and transformers on the same tiny checkpoint (fp32 greedy ids
identical). Failure paths: bad requests, start-up errors, a worker killed mid-generation, a
parent that exits or dies without shutting down.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.config import EngineConfig
from rtllm.errors import ConfigError, EngineDeadError, InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from rtllm.executor.inprocess import InProcessExecutor
from rtllm.executor.multiprocess import MultiProcessExecutor
from rtllm.executor.request import GenerationRequest
from rtllm.runtime.py_executor import NewRequest
from tests.tiny import make_checkpoint, ramp_prompts

OPTS = dict(dtype="float32", max_seq_len=1000, max_num_tokens=256, max_batch_size=16,
            kv_cache_config=KvCacheConfig(max_tokens=8192, tokens_per_block=16))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = make_checkpoint(str(path), "llama")
    return str(path), hf


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(ckpt[0], executor_type="multiprocess", **OPTS) as llm:
        yield llm


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=0)


def argmax(n: int) -> SamplingParams:
    """Plain argmax decoding: nothing masked (the tokenizer's <|im_end|> is an end token to rtllm but
    not to transformers' min_new_tokens), nothing stops."""
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def hf_argmax(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def wait_blocks_free(llm, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while llm.executor.stats().used_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    return llm.executor.stats().used_blocks


def worker_gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` exits within ``timeout`` s. An orphan stays a zombie until init reaps it: that counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(120)
def test_greedy_batch_matches_inprocess_and_transformers(llm, ckpt):
    path, hf = ckpt
    assert isinstance(llm.executor, MultiProcessExecutor) and llm.executor.worker_pid != os.getpid()
    prompts = ramp_prompts(6, seed=3, lo=2, hi=50)
    mp = [o.outputs[0].token_ids for o in llm.generate(prompts, argmax(12), use_tqdm=False)]
    with LLM(path, executor_type="inprocess", **OPTS) as ip_llm:
        assert isinstance(ip_llm.executor, InProcessExecutor)
        ip = [o.outputs[0].token_ids for o in ip_llm.generate(prompts, argmax(12), use_tqdm=False)]
        ip_info = ip_llm.executor.engine_info
        assert ip_llm.executor.stats().used_blocks == 0
    assert mp == ip == [hf_argmax(hf, p, 12) for p in prompts]
    info = llm.executor.engine_info
    timing = ("load_seconds", "startup")
    assert {k: v for k, v in info.items() if k not in timing} == {k: v for k, v in ip_info.items() if k not in timing}
    assert info["vocab_size"] == 260 and info["max_seq_len"] == 1000 and info["kv_capacity_tokens"] == 8192
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["model"] == path
    assert 259 in info["eos_token_ids"]  # the tokenizer's <|im_end|> reached the worker
    assert llm.executor.stats().used_blocks == 0
    with pytest.raises(AttributeError, match="stats"):
        _ = llm.executor.engine


def test_streaming_n2_and_stop_strings(llm):
    p = SamplingParams(max_tokens=40, temperature=0.8, seed=5)
    final = llm.generate("stream me", p).outputs[0]
    deltas, ids = [], []
    for out in llm.generate_async("stream me", p, streaming=True):
        deltas.append(out.outputs[0].text_diff)
        ids.extend(out.outputs[0].token_ids_diff)
    assert "".join(deltas) == final.text and ids == final.token_ids and out.finished

    two = llm.generate("pair", SamplingParams(max_tokens=10, min_tokens=10, temperature=1.0, seed=9, n=2))
    assert [o.index for o in two.outputs] == [0, 1] and all(len(o.token_ids) == 10 for o in two.outputs)
    assert two.outputs[0].token_ids != two.outputs[1].token_ids
    again = llm.generate("pair", SamplingParams(max_tokens=10, min_tokens=10, temperature=1.0, seed=9, n=2))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in two.outputs]

    base = llm.generate("stop", greedy(30)).outputs[0]
    stop = base.text[5:8]
    out = llm.generate("stop", SamplingParams(max_tokens=30, min_tokens=30, temperature=0, stop=[stop])).outputs[0]
    assert out.text == base.text[: base.text.find(stop)] and out.finish_reason == "stop"
    assert wait_blocks_free(llm) == 0  # the stop string's Abort reached the worker


def test_abort_frees_blocks(llm):
    res = llm.generate_async("abort me", SamplingParams(max_tokens=900, min_tokens=900), streaming=True)
    aborted = False
    for out in res:
        if not aborted:  # (after the abort, the blocks may be freed before this thread looks)
            assert not out.finished and llm.executor.stats().used_blocks > 0
            res.abort()
            aborted = True
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) < 900
    assert wait_blocks_free(llm) == 0


@pytest.mark.parametrize("bad", [[], [5, 99999], [-1], [1] * 1000], ids=["empty", "vocab", "negative", "too-long"])
def test_bad_requests_raise_at_submit_and_worker_keeps_serving(llm, bad):
    other = llm.generate_async("survivor", greedy(20))
    with pytest.raises(InvalidRequestError):
        llm.executor.submit(GenerationRequest(bad, SamplingParams()))
    assert len(other.result(timeout=60).outputs[0].token_ids) == 20
    assert llm.generate([1, 2], SamplingParams(max_tokens=2)).finished


def test_bad_request_messages_equal_inprocess(llm, ckpt):
    with LLM(ckpt[0], executor_type="inprocess", **OPTS) as ip_llm:
        for prompt, params in [([99999], SamplingParams()), ([1] * 1000, SamplingParams()),
                               ([1] * 990, SamplingParams(min_tokens=20, max_tokens=20))]:
            msgs = []
            for x in (llm, ip_llm):
                with pytest.raises(InvalidRequestError) as e:
                    x.generate(prompt, params)
                msgs.append(str(e.value))
            assert msgs[0] == msgs[1]


def test_executor_type_is_validated(ckpt):
    with pytest.raises(ConfigError, match="executor_type"):
        LLM(ckpt[0], executor_type="threads")


@pytest.mark.timeout(60)
def test_startup_errors_surface_with_their_type(tmp_path, ckpt):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"), executor_type="multiprocess")
    bad = tmp_path / "badcfg"
    shutil.copytree(ckpt[0], bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 100)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="model.safetensors") as e:
        LLM(str(bad), executor_type="multiprocess", dtype="float32")
    assert type(e.value) is ModelLoadError and time.monotonic() - t0 < 30
    assert "in the engine worker process" in str(e.value.__cause__)
    arch = tmp_path / "arch"
    shutil.copytree(ckpt[0], arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        LLM(str(arch), executor_type="multiprocess")


def _die_silently(cfg) -> None:
    os._exit(3)  # a crash before the worker can say anything (a segfault in a native loader, say)


@pytest.mark.timeout(60)
def test_startup_crash_and_foreign_errors_raise_engine_dead(ckpt, monkeypatch):
    from rtllm.config import EngineConfig

    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="failed to start: .*Error"):  # not an rtllm error: wrapped
        MultiProcessExecutor(EngineConfig(ckpt[0], dtype="float32", device="cuda:7"), None)
    monkeypatch.setattr("rtllm.executor.multiprocess.worker_main", _die_silently)
    with pytest.raises(EngineDeadError, match=r"pid \d+\) exited with code 3 during start-up"):
        MultiProcessExecutor(EngineConfig(ckpt[0], dtype="float32"), None)
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(60)
def test_worker_killed_mid_generation_fails_pending_promptly(ckpt):
    llm = LLM(ckpt[0], executor_type="multiprocess", **OPTS)
    ex = llm.executor
    pid = ex.worker_pid
    results = [llm.generate_async(f"req {i}", greedy(900), streaming=True) for i in range(3)]
    next(iter(results[0]))  # generation is under way
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    for res in results:
        with pytest.raises(EngineDeadError, match=f"pid {pid}.*SIGKILL"):
            res.result(timeout=5)
    assert time.monotonic() - t0 < 3
    with pytest.raises(EngineDeadError, match="SIGKILL"):
        llm.generate("after", SamplingParams(max_tokens=2))
    t0 = time.monotonic()
    llm.shutdown()
    llm.shutdown()
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_executor_dropped_without_shutdown_is_released_when_collected(ckpt):
    """A dead worker ends the receiver thread; an executor then dropped without shutdown() becomes
    cyclic garbage. Collecting it must not block (pyzmq's own Context.__del__ would run term() with
    the sockets still open, hanging the process at its next gc), and it releases its ipc dir."""
    import gc
    import weakref

    ex = MultiProcessExecutor(EngineConfig(ckpt[0], dtype="float32"), None)
    ref, ipc_dir, pid = weakref.ref(ex), ex._ipc_dir, ex.worker_pid
    ex._cycle = ex  # as an executor referenced from its own callbacks is
    os.kill(pid, signal.SIGKILL)
    ex._receiver.join(10)
    assert not ex._receiver.is_alive()
    del ex
    gc.collect()
    assert ref() is None and worker_gone(pid, 5) and not os.path.exists(ipc_dir)


@pytest.mark.timeout(60)
def test_failed_step_fails_pending_with_its_error(ckpt):
    llm = LLM(ckpt[0], executor_type="multiprocess", **OPTS)
    pending = llm.generate_async("victim", greedy(900))
    # past validation on purpose: an id outside the embedding makes the worker's step raise
    llm.executor._send_new([NewRequest("poison:0", [99999], SamplingParams())])
    with pytest.raises(EngineDeadError, match="engine step failed: IndexError"):
        pending.result(timeout=30)
    with pytest.raises(EngineDeadError, match="failed: IndexError"):
        llm.generate("after", SamplingParams(max_tokens=2))
    llm.shutdown()


@pytest.mark.timeout(60)
def test_shutdown_fails_pending_and_cleans_up(ckpt):
    llm = LLM(ckpt[0], executor_type="multiprocess", **OPTS)
    ex = llm.executor
    pid, ipc_dir = ex.worker_pid, ex._ipc_dir
    pending = llm.generate_async("long", greedy(900))
    t0 = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - t0 < 10
    with pytest.raises(EngineDeadError, match="shut down"):
        pending.result(timeout=5)
    assert worker_gone(pid, 5) and not os.path.exists(ipc_dir)
    with pytest.raises(EngineDeadError):
        ex.submit(pending.request)
    ex.shutdown()  # idempotent


_SCRIPT = textwrap.dedent("""
    import sys, time
    from rtllm import LLM, KvCacheConfig, SamplingParams

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], dtype="float32", executor_type="multiprocess",
                  kv_cache_config=KvCacheConfig(max_tokens=1024), max_seq_len=512)
        assert llm.generate([1, 2, 3], SamplingParams(max_tokens=2)).finished
        print(llm.executor.worker_pid, llm.executor._ipc_dir, flush=True)
        if sys.argv[2] == "hang":
            time.sleep(60)
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_orphan_worker_when_the_parent_goes(tmp_path, ckpt, how):
    script = tmp_path / "client.py"
    script.write_text(_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), ckpt[0], "hang" if how == "sigkill" else "exit"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    pid, ipc_dir = proc.stdout.readline().split()
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) in (0, -signal.SIGKILL)
    assert worker_gone(int(pid), 10)
    assert not os.path.exists(ipc_dir)  # removed by the parent's exit hook, or by the worker


@pytest.mark.timeout(90)
def test_script_without_main_guard_is_told_to_add_one(tmp_path, ckpt):
    """The worker is spawned: it re-imports the main script, whose module-level LLM() then fails in the
    worker before rtllm's code runs there (exit code 1, no start-up message): the error says what to do."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import sys
        from rtllm import LLM

        LLM(sys.argv[1], dtype="float32", executor_type="multiprocess")
    """))
    proc = subprocess.run([sys.executable, str(script), ckpt[0]], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=80)
    assert proc.returncode != 0
    raised = [line for line in proc.stderr.splitlines() if line.startswith("rtllm.errors.EngineDeadError: ")]
    assert len(raised) == 1, proc.stderr[-2000:]
    assert "exited with code 1 during start-up before it reached rtllm's worker code" in raised[0]
    assert "at module level, move it under `if __name__ == '__main__':`" in raised[0]
