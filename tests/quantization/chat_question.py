"""The question the quantization tests ask the default model in bf16, as a chat.

The README's "What is the capital of France?" is a near-tie at the answer's first token on SmolLM2:
in fp32, 'The' leads 'L' by 0.08 logits, well inside bf16's rounding noise (the bf16 model's last
logits differ from fp32's by up to ~0.6, transformers' bf16 by as much). In bf16 the greedy answer
then depends on the CPU's GEMM kernels and thread count (measured: an Intel Xeon with one thread
answers "L'Étoile, la Marseillaise, ...", two threads or an AMD EPYC "The capital of France is
Paris."). Asking for one sentence conditions it: the fp32 greedy answer is the same sentence and
its smallest top-1 / top-2 margin over the first 12 tokens is 0.86 logits (0.08 before). The fp32
checks of the default model (tests/llmapi) keep the README's question."""

QUESTION = "What is the capital of France? Answer in one sentence."


def question_ids(tok) -> list[int]:
    """The chat prompt's token ids (the model's chat template, generation prompt added)."""
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)
