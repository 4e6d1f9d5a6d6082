"""Diagnose bf16 agreement on the default model: which pairs of (engine, transformers) x (bf16, fp32)
agree on the teacher-forced top-1, and how big the logit gaps are where they disagree.
RTLLM_AGREE_TP=N runs the engine split over N GPUs (tensor parallel; multi-process executor)."""

import contextlib
import os

import torch
import transformers as tf
from torch.nn.attention import SDPBackend, sdpa_kernel

from rtllm import LLM, SamplingParams

path = os.environ.get("RTLLM_DEFAULT_MODEL", "")
TP = int(os.environ.get("RTLLM_AGREE_TP", "1"))
topics = ["the ocean", "a robot", "Paris", "mathematics", "a dragon", "the moon", "coffee", "a library",
          "winter", "a violin", "the internet", "gardening", "a volcano", "chess", "bread", "a lighthouse",
          "trains", "the desert", "a museum", "rain"]


def hf_logits(dtype, seqs, attn="sdpa", backend=None):
    """transformers' logits; attn: its attn_implementation; backend: an SDPA backend to force."""
    m = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype, attn_implementation=attn).cuda().eval()
    out = []
    ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for s in seqs:
            out.append(m(torch.tensor([s], device="cuda")).logits[0].float())
    del m
    return out


def engine_top1(dtype, seqs, plens):
    with LLM(dtype=dtype, device="cuda", max_seq_len=512, max_batch_size=20, tensor_parallel_size=TP,
             executor_type="inprocess" if TP == 1 else "multiprocess") as llm:
        outs = llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=5, temperature=0), use_tqdm=False)
    # the top token, ties (equal bf16 logits) to the lowest id as argmax breaks them
    return [[max(top, key=lambda kv: (kv[1], -kv[0]))[0] for _, top in o.prompt_logprobs[p:]]
            for o, p in zip(outs, plens)]


def main() -> None:
    global path
    path = path or os.environ["RTLLM_DEFAULT_MODEL"]
    with LLM(dtype="float32", device="cuda", max_seq_len=512, max_batch_size=20, executor_type="inprocess") as llm:
        prompts = [llm.tokenizer.encode(f"Write a short paragraph about {t}.") for t in topics]
        conts = [o.outputs[0].token_ids for o in llm.generate(
            prompts, SamplingParams(max_tokens=64, min_tokens=64, temperature=0), use_tqdm=False)]
    seqs = [p + c for p, c in zip(prompts, conts)]
    plens = [len(p) for p in prompts]
    tops = {"ours_bf16": engine_top1("bfloat16", seqs, plens), "ours_fp32": engine_top1("float32", seqs, plens)}
    # transformers against itself (eager attention, SDPA's flash kernel forced): the bf16 noise floor
    variants = (("hf_bf16", torch.bfloat16, "sdpa", None), ("hf_fp32", torch.float32, "sdpa", None),
                ("hf_bf16_eager", torch.bfloat16, "eager", None),
                ("hf_bf16_flash", torch.bfloat16, "sdpa", SDPBackend.FLASH_ATTENTION))
    for name, dt, attn, backend in variants:
        lg = hf_logits(dt, seqs, attn, backend)
        tops[name] = [lg_i[p - 1 : len(s) - 1].argmax(-1).tolist() for lg_i, p, s in zip(lg, plens, seqs)]
        if name == "hf_fp32":
            ref32 = lg
    names = list(tops)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            agree = sum(x == y for ta, tb in zip(tops[a], tops[b]) for x, y in zip(ta, tb))
            total = sum(len(t) for t in tops[a])
            print(f"{a:>10} vs {b:<10} top-1 agreement {agree / total:.4f}")
    # where ours_bf16 and hf_bf16 disagree: the fp32 top-2 gap
    gaps = []
    for k, (ta, tb) in enumerate(zip(tops["ours_bf16"], tops["hf_bf16"])):
        for j, (x, y) in enumerate(zip(ta, tb)):
            if x != y:
                row = ref32[k][plens[k] - 1 + j]
                top2 = row.topk(2).values
                gaps.append(float(top2[0] - top2[1]))
    print("fp32 top-2 logit gaps at disagreements:", sorted(round(g, 3) for g in gaps))


if __name__ == "__main__":  # the multi-process executor spawns workers that re-import this file
    main()
