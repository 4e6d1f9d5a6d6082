"""Ranks started by torchrun (rtllm.executor.launcher): every process runs the same script; LLM() with
tensor_parallel_size = WORLD_SIZE makes rank 0 the driver and the other ranks follow it, then exit.

Oracle: the TP=1 engine's greedy tokens for the same prompts (in process)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rtllm import SamplingParams
from rtllm.errors import ConfigError
from rtllm.executor.launcher import launched_rank
from rtllm.parallel.comm import free_port
from tests.tiny import make_engine, ramp_prompts, run_engine

PROMPTS = ramp_prompts(4, seed=13, lo=5, hi=40)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from rtllm import LLM, KvCacheConfig, SamplingParams

    def main():
        ckpt, prompts, tp, pp = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        with LLM(ckpt, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32", max_seq_len=256,
                 max_num_tokens=64, max_batch_size=8, kv_cache_config=KvCacheConfig(max_tokens=1024)) as llm:
            out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            print("RESULT " + json.dumps(out), flush=True)
        print("AFTER rank=" + os.environ["RANK"], flush=True)

    if __name__ == "__main__":  # rank 0 spawns its engine worker (multiprocessing's spawn re-imports this file)
        main()
""")


def _torchrun(tmp_path, nproc, *args, timeout=180):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_torchrun_ranks_serve_one_engine(ckpt, tmp_path, tp, pp):
    want = run_engine(make_engine(ckpt, max_num_tokens=64, max_batch_size=8), PROMPTS, GREEDY)
    proc = _torchrun(tmp_path, 2, ckpt, json.dumps(PROMPTS), str(tp), str(pp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [want]  # printed once: by rank 0
    # rank 1 served inside LLM() and exited there: the script went on on rank 0 only
    assert [line for line in proc.stdout.splitlines() if line.startswith("AFTER")] == ["AFTER rank=0"]


def test_world_size_must_match_tp_times_pp(ckpt, tmp_path):
    proc = _torchrun(tmp_path, 2, ckpt, json.dumps(PROMPTS), "4", "1", timeout=120)
    assert proc.returncode != 0
    assert "the launcher started WORLD_SIZE=2 processes" in proc.stderr and "tp_size * pp_size = 4 * 1" in proc.stderr


def test_launched_rank_reads_the_environment():
    env = dict(RANK="1", WORLD_SIZE="4", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", LOCAL_RANK="1")
    assert launched_rank(env).rank == 1 and launched_rank(env).local_rank == 1
    assert launched_rank({**env, "WORLD_SIZE": "1"}) is None  # one process: nothing to join
    assert launched_rank({"RANK": "0"}) is None
    with pytest.raises(ConfigError, match="RANK=5 is outside"):
        launched_rank({**env, "RANK": "5"})
