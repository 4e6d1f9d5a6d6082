"""Tiny random checkpoints made with transformers (the oracle), and a byte-level tokenizer.

Each checkpoint takes milliseconds to build; every test builds what it needs in a tmp dir.
"""

from __future__ import annotations

import json
import os

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 260  # 256 byte tokens + 4 specials: the tokenizer covers every id


def hf_config(arch: str, **overrides):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    if arch == "llama":
        cls, extra = tf.LlamaConfig, dict(rope_theta=10000.0)
    elif arch == "llama3":
        cls, extra = tf.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif arch == "mistral":
        cls, extra = tf.MistralConfig, dict(sliding_window=None, head_dim=16)
    elif arch == "qwen2":
        cls, extra = tf.Qwen2Config, dict(rope_theta=1e6)
    elif arch == "qwen3":
        cls, extra = tf.Qwen3Config, dict(head_dim=32, rope_theta=1e6)
    elif arch == "mixtral":  # 8 experts of width intermediate_size, top-2 renormalized
        cls, extra = tf.MixtralConfig, dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                            sliding_window=None, rope_theta=1e6)
    elif arch == "qwen3_moe":  # 8 experts of width moe_intermediate_size; dense layers (mlp_only_layers) 128
        cls, extra = tf.Qwen3MoeConfig, dict(head_dim=32, rope_theta=1e6, num_experts=8, num_experts_per_tok=4,
                                             moe_intermediate_size=32, norm_topk_prob=True)
    else:
        raise ValueError(arch)
    common.update(extra)
    common.update(overrides)
    return cls(**common)


def make_checkpoint(path: str, arch: str = "llama", seed: int = 0, dtype=torch.float32, with_tokenizer=True,
                    max_shard_size: str | None = None, **overrides):
    """Write a tiny random HF checkpoint to ``path``; returns the transformers model (fp32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    # random init leaves norms at 1 and biases at 0: perturb them so the test sees them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **kwargs)
    if with_tokenizer:
        write_byte_tokenizer(path)
    return model.float().eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_byte_tokenizer(path: str, v5_layout: bool = True) -> None:
    """A byte-level tokenizer: ids 0..255 are bytes, 256 <s>, 257 </s>, 258 <|im_start|>, 259 <|im_end|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_to_unicode)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if v5_layout:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)
    else:
        cfg["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    # an explicit mask: without it generate() masks every prompt token equal to pad_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, min_new_tokens=max_new_tokens, pad_token_id=VOCAB - 1)
    return out[0, len(prompt):].tolist()


def tied_and_untied(tmp_path_factory, arch: str = "llama") -> dict[str, str]:
    """Two tiny checkpoints of ``arch``, {"untied": path, "tied": path (tie_word_embeddings)}, for tests
    of the embedding / LM head pair."""
    paths = {}
    for name, kw in (("untied", {}), ("tied", dict(tie_word_embeddings=True))):
        paths[name] = str(tmp_path_factory.mktemp(name))
        make_checkpoint(paths[name], arch, **kw)
    return paths


def ramp_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (L,), generator=g).tolist() for L in lens]


def engine_config(path: str, max_batch_size=16, max_num_tokens=256, max_seq_len=512, kv_tokens=8192,
                  tokens_per_block=8, chunked=True, reuse=True, dtype="float32", overlap=False, quant_config=None):
    """The EngineConfig make_engine serves ``path`` with (nothing loaded)."""
    from rtllm.config import EngineConfig, KvCacheConfig, SchedulerConfig

    return EngineConfig(
        path, dtype=dtype,
        kv_cache_config=KvCacheConfig(max_tokens=kv_tokens, tokens_per_block=tokens_per_block,
                                      enable_block_reuse=reuse),
        scheduler_config=SchedulerConfig(max_batch_size, max_num_tokens, max_seq_len, chunked), overlap=overlap,
        quant_config=quant_config)


def make_engine(path: str, loaded=None, **kw):
    """A PyExecutor for ``path`` (keyword arguments: engine_config's); ``loaded``: a LoadedModel to serve
    instead of loading ``path``."""
    from rtllm.runtime.py_executor import PyExecutor

    return PyExecutor(engine_config(path, **kw), loaded=loaded)


def run_engine(engine, prompts: list[list[int]], params, arrivals: list[int] | None = None,
               max_steps: int = 10_000) -> list[list[int]]:
    """Step the engine on this thread; prompt i is enqueued at step arrivals[i]. Returns token ids."""
    from rtllm.runtime.py_executor import NewRequest

    arrivals = arrivals or [0] * len(prompts)
    plist = params if isinstance(params, list) else [params] * len(prompts)
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    done: set[str] = set()
    step = 0
    while len(done) < len(prompts):
        for i, a in enumerate(arrivals):
            if a == step:
                engine.enqueue(NewRequest(str(i), prompts[i], plist[i], seed=plist[i].seed))
        engine._drain_inbox(block=False)
        for u in engine.step():
            outs[u.request_id] += u.new_token_ids
            if u.finished:
                done.add(u.request_id)
        step += 1
        assert step < max_steps, "engine did not finish"
    return [outs[str(i)] for i in range(len(prompts))]


def engine_last_logits(engine, prompt: list[int]) -> torch.Tensor:
    """Logits at the last prompt position, from one prefill step of the engine's model."""
    from rtllm.runtime.request import Request
    from rtllm.runtime.scheduler import ScheduledBatch
    from rtllm.sampling_params import SamplingParams

    req = Request("probe", prompt, SamplingParams(max_tokens=1), frozenset(), 1)
    assert engine.kv.allocate_slots(req, len(prompt))
    try:
        out = engine.runner.execute(ScheduledBatch([req], [len(prompt)]))
    finally:
        engine.kv.free(req)
    return out.sample_logits[0]
