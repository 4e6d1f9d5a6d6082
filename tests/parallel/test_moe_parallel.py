"""Mixture-of-experts models split across ranks on the CPU (gloo): expert parallel, MoE tensor
parallel and pipeline parallel.

Oracle: the same engine at TP=1 (itself checked against transformers in tests/models/test_moe_parity).
fp32 greedy token ids must be identical on a batch of different prompt lengths with inflight arrivals
and chunked prefill.
"""

import pytest
import torch

from rtllm import SamplingParams
from rtllm.layers.moe import FusedMoE
from rtllm.models.loader import load_model
from rtllm.parallel import weights
from rtllm.parallel.mapping import Mapping
from tests.parallel.harness import ENGINE, run_split
from tests.tiny import make_checkpoint, make_engine, ramp_prompts, run_engine

PROMPTS = ramp_prompts(6, seed=5, lo=3, hi=90)
ARRIVALS = [0, 0, 1, 2, 5, 9]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ARCHS = ["mixtral", "qwen3_moe"]  # top-2 renormalized / top-4 with norm_topk_prob; 8 experts each


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    paths = {}
    for arch in ARCHS:
        path = str(tmp_path_factory.mktemp(arch))
        make_checkpoint(path, arch)
        paths[arch] = path
    return paths


@pytest.fixture(scope="module")
def reference(ckpts):
    return {a: run_engine(make_engine(p, **ENGINE), PROMPTS, GREEDY, ARRIVALS) for a, p in ckpts.items()}


def _expert_shapes(shapes):
    return [s for s in shapes if len(s) == 3]  # the stacked w13 [E, 2I, H] / w2 [E, H, I]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp, pp, ep", [(2, 1, 2), (2, 1, 1), (1, 2, None)],
                         ids=["ep2", "moe-tp2", "pp2"])
def test_moe_split_equals_single_rank(ckpts, reference, arch, tp, pp, ep):
    out, shapes = run_split(ckpts[arch], tp, pp, PROMPTS, GREEDY, ARRIVALS, ep=ep, **ENGINE)
    assert out == reference[arch]
    experts = _expert_shapes(shapes[0])
    assert experts and shapes[0] == shapes[tp - 1]  # ranks of one stage hold equal shares
    inter = 48 if arch == "mixtral" else 32
    if ep == 2:  # half the experts per rank, each whole
        assert all(s[0] == 4 for s in experts) and (4, 2 * inter, 64) in experts
    elif tp == 2:  # every expert, half its width per rank
        assert all(s[0] == 8 for s in experts) and (8, inter, 64) in experts and (8, 64, inter // 2) in experts


def _load_rank(path, mapping):
    return load_model(path, dtype="float32", device="cpu", mapping=mapping)


@pytest.mark.parametrize("ep, mtp", [(2, 1), (1, 2)])
def test_rank_holds_its_experts_and_reads_only_them(ckpts, ep, mtp):
    """Each rank's stacked weights are the exact slices of the TP=1 model's (experts by index for expert
    parallel, intermediate rows / columns for MoE tensor parallel), and it reads about half the experts'
    bytes of the file."""
    path = ckpts["mixtral"]
    full = {n: m for n, m in _load_rank(path, None).model.named_modules() if isinstance(m, FusedMoE)}
    inter = 48
    for rank in range(2):
        mapping = Mapping(2, 2, 1, moe_tp_size=mtp, moe_ep_size=ep, rank=rank)
        before = weights.bytes_read()
        model = _load_rank(path, mapping).model
        read = weights.bytes_read() - before
        for name, moe in ((n, m) for n, m in model.named_modules() if isinstance(m, FusedMoE)):
            ref = full[name]
            e0, ne = (rank * 4, 4) if ep == 2 else (0, 8)
            i0, ni = (rank * inter // 2, inter // 2) if mtp == 2 else (0, inter)
            gate = ref.w13[e0:e0 + ne, i0:i0 + ni]
            up = ref.w13[e0:e0 + ne, inter + i0:inter + i0 + ni]
            assert torch.equal(moe.w13, torch.cat([gate, up], dim=1))
            assert torch.equal(moe.w2, ref.w2[e0:e0 + ne, :, i0:i0 + ni])
            assert torch.equal(moe.gate.weight, ref.gate.weight)  # the router is replicated
        expert_bytes = sum(m.w13.numel() + m.w2.numel() for m in full.values()) * 4
        # attention / embedding shards are half too; the replicated norms and routers are small
        assert read < 0.6 * (expert_bytes + 2 * 260 * 64 * 4 + 2 * 4 * 64 * 64 * 4)



def test_llm_expert_parallel(ckpts, reference):
    """LLM(tensor_parallel_size=2, moe_expert_parallel_size=2): worker processes, inflight arrivals."""
    from rtllm import LLM, KvCacheConfig

    opts = dict(dtype="float32", max_seq_len=512, max_num_tokens=64, max_batch_size=8,
                kv_cache_config=KvCacheConfig(max_tokens=2048, tokens_per_block=8))
    with LLM(ckpts["qwen3_moe"], tensor_parallel_size=2, moe_expert_parallel_size=2, **opts) as llm:
        first = [llm.generate_async(p, GREEDY) for p in PROMPTS[:3]]
        first[0].result(timeout=60)
        later = [llm.generate_async(p, GREEDY) for p in PROMPTS[3:]]
        out = [r.result(timeout=60).outputs[0].token_ids for r in first + later]
    assert out == reference["qwen3_moe"]
