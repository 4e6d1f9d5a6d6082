"""Where rtllm's bf16 forward and transformers' bf16 forward part, on the default model (CPU or GPU).

For one sequence: the share of elements that differ in each op of layer 0 when both sides get the
same inputs (norm, q/k/v GEMMs, RoPE, attention, o_proj, gate/up GEMMs, SiLU-and-mul, down), and the
share of the residual stream that differs after each layer of a whole forward. Over 20 prompts x 64
teacher-forced positions (a transformers fp32 greedy continuation): top-1 agreement of the logits,
each sequence prefilled on its own, ties going to the lowest token id on both sides (argmax).

    python scripts/bf16_parity.py [--device cuda] [--prompts 20] [--random]

--random: a SmolLM2-135M-shaped checkpoint with transformers' random init instead of the default
model's GGUF (for a machine without it), random-token prompts; its op-by-op figures mean what they
mean on the real model, its agreement does not (near-uniform logits tie everywhere).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

TOPICS = ["the ocean", "a robot", "Paris", "mathematics", "a dragon", "the moon", "coffee", "a library",
          "winter", "a violin", "the internet", "gardening", "a volcano", "chess", "bread", "a lighthouse",
          "trains", "the desert", "a museum", "rain"]


def neq(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"differ {float((a != b).float().mean()):7.2%}  max |diff| {float(d.max()):.3g}"


@torch.inference_mode()
def layer0(hf, ours, seq: list[int], dev: str) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from rtllm.kernels import attention as ak
    from rtllm.kernels import attention_rope

    ids = torch.tensor([seq], device=dev)
    T = len(seq)
    e = hf.model.embed_tokens(ids)[0]
    Lh, Lo = hf.model.layers[0], ours.model.layers[0]
    a, ao = Lh.self_attn, Lo.self_attn
    print("embedding        ", neq(e, ours.model.embed_tokens(ids[0])))
    n = Lh.input_layernorm(e)
    print("input norm       ", neq(n, Lo.input_layernorm(e)))
    qkv = ao.qkv_proj(n)
    qs, ks = ao.qkv_proj.q_size, ao.qkv_proj.kv_size
    q, k, v = a.q_proj(n), a.k_proj(n), a.v_proj(n)
    print("q / k / v GEMM   ", neq(q, qkv[:, :qs]), "|", neq(k, qkv[:, qs:qs + ks]), "|", neq(v, qkv[:, qs + ks:]))
    D, Hq, Hkv = a.head_dim, q.shape[-1] // a.head_dim, k.shape[-1] // a.head_dim
    pos = torch.arange(T, device=dev)
    cos, sin = hf.model.rotary_emb(e[None], pos[None])
    qh, kh = apply_rotary_pos_emb(q.view(1, T, Hq, D).transpose(1, 2), k.view(1, T, Hkv, D).transpose(1, 2), cos, sin)
    bs = 16
    nb = -(-T // bs)
    kc = torch.zeros(nb + 1, bs, Hkv, D, dtype=q.dtype, device=dev)
    vc = torch.zeros_like(kc)
    slots = torch.arange(bs, bs + T, device=dev)
    qo, ko = attention_rope.rope_and_cache(pos, q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D),
                               ours.model.rotary.cos_sin_cache, kc, vc, slots)
    print("RoPE q / k       ", neq(qh[0].transpose(0, 1), qo), "|", neq(kh[0].transpose(0, 1), ko))
    vh = v.view(1, T, Hkv, D).transpose(1, 2)
    oh = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=a.scaling, enable_gqa=True)
    oh = oh.transpose(1, 2).reshape(T, Hq * D)
    qsl = torch.tensor([0, T], dtype=torch.int32, device=dev)
    oo = ak.paged_prefill_attention(qh[0].transpose(0, 1), kh[0].transpose(0, 1), v.view(T, Hkv, D), kc, vc,
                                    torch.arange(1, nb + 1, dtype=torch.int32, device=dev)[None], qsl,
                                    torch.tensor([T], dtype=torch.int32, device=dev), a.scaling, T, T)
    print("attention (SDPA) ", neq(oh, oo.reshape(T, Hq * D)))
    x = a.o_proj(oh)
    print("o_proj GEMM      ", neq(x, ao.o_proj(oh)))
    h2 = Lh.post_attention_layernorm(e + x)
    y, r = Lo.post_attention_layernorm(x, e)
    print("add + norm       ", neq(h2, y), "| sum", neq(e + x, r))
    m = Lh.mlp
    gu = Lo.mlp.gate_up_proj(h2)
    inter = gu.shape[-1] // 2
    g, u = m.gate_proj(h2), m.up_proj(h2)
    print("gate / up GEMM   ", neq(g, gu[:, :inter]), "|", neq(u, gu[:, inter:]))
    act = m.act_fn(g) * u
    print("SiLU-and-mul     ", neq(act, Lo.mlp.act(torch.cat((g, u), -1))))
    print("down GEMM        ", neq(m.down_proj(act), Lo.mlp.down_proj(act)))


def random_checkpoint() -> str:
    """A SmolLM2-135M-shaped Llama checkpoint (transformers' random init, seed 0) in a temp dir."""
    import tempfile

    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    path = tempfile.mkdtemp(prefix="smollm-random-")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@torch.inference_mode()
def main() -> None:
    import transformers as tf

    from rtllm.llmapi.default_model import default_model_path
    from rtllm.models.forward import prefill_hidden
    from rtllm.models.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--random", action="store_true", help="a random SmolLM2-135M-shaped checkpoint")
    args = ap.parse_args()
    dev = args.device
    if args.random:
        path = random_checkpoint()
        load = dict(pretrained_model_name_or_path=path)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 49152, (12,), generator=g).tolist() for _ in range(args.prompts)]
    else:
        path = default_model_path()
        load = dict(pretrained_model_name_or_path=os.path.dirname(path), gguf_file=os.path.basename(path))
        tok = tf.AutoTokenizer.from_pretrained(**load)
        prompts = [tok(f"Write a short paragraph about {t}.")["input_ids"] for t in TOPICS[: args.prompts]]
    m32 = tf.AutoModelForCausalLM.from_pretrained(**load, dtype=torch.float32).to(dev).eval()
    seqs, plens = [], []
    for p in prompts:
        out = m32.generate(torch.tensor([p], device=dev), max_new_tokens=64, min_new_tokens=64, do_sample=False)
        seqs.append(out[0].tolist())
        plens.append(len(p))
    del m32
    hf = tf.AutoModelForCausalLM.from_pretrained(**load, dtype=torch.bfloat16).to(dev).eval()
    ours = load_model(path, "bfloat16", device=dev).model
    print(f"device {dev}, attention {hf.config._attn_implementation}; layer 0 on the same inputs:")
    layer0(hf, ours, seqs[0], dev)
    acts = []
    hooks = [layer.register_forward_hook(lambda mod, i, o: acts.append(o[0] + o[1])) for layer in ours.model.layers]
    prefill_hidden(ours, seqs[:1])
    for hk in hooks:
        hk.remove()
    ref = hf(torch.tensor(seqs[:1], device=dev), output_hidden_states=True).hidden_states
    print("residual stream after each layer (whole forward):")
    print("  " + " ".join(f"{float((x != r[0]).float().mean()):.0%}" for x, r in zip(acts[:-1], ref[1:-1])))
    agree = total = 0
    for s, p in zip(seqs, plens):
        a = ours.compute_logits(prefill_hidden(ours, [s])[0])[p - 1 : len(s) - 1].argmax(-1)
        b = hf(torch.tensor([s], device=dev)).logits[0, p - 1 : len(s) - 1].argmax(-1)
        agree += int((a == b).sum())
        total += len(a)
    print(f"teacher-forced top-1 agreement, rtllm bf16 vs transformers bf16: {agree / total:.2%} ({agree}/{total})")


if __name__ == "__main__":
    main()
