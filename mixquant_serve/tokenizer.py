"""Tokenizer without torch or transformers: `tokenizers` for text, jinja2 for chat templates.

`Tokenizer.from_path` loads a Hugging Face model folder the way transformers' generic
`TokenizersBackend` does (tokenizer.json plus the special tokens of tokenizer_config.json), and chat
templates render in the same sandboxed jinja environment, so ids, text and prompts equal `AutoTokenizer`'s.
Folders whose `tokenizer_class` names a model-specific class that transformers rebuilds from vocab and
merges are read from their tokenizer.json as it is.

`IncrementalDetokenizer` turns a request's output ids into streamed text with stop strings (vLLM
semantics): text is committed once its last character is complete, and the tail that could still begin a
stop string is held back, so a stream never shows text that is later taken back.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REPLACEMENT_CHAR = "\ufffd"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_CLEANUP_PAIRS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


# ---------------------------------------------------------------- folder reading
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, with the legacy special_tokens_map.json merged in as transformers does."""
    cfg = _read_json(folder / "tokenizer_config.json")
    if "additional_special_tokens" in cfg:
        cfg.setdefault("extra_special_tokens", cfg.pop("additional_special_tokens"))
    if "added_tokens_decoder" not in cfg:
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                old = list(cfg.get("extra_special_tokens") or [])
                cfg["extra_special_tokens"] = old + [t for t in value if t not in old]
            elif isinstance(value, dict):
                cfg[key] = {**value, "__type": "AddedToken", "special": True}
            else:
                cfg[key] = value
    return cfg


def _read_templates(folder: Path, cfg: dict[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja and additional_chat_templates/*.jinja win over the config's chat_template."""
    found = {}
    if (folder / "chat_template.jinja").is_file():
        found["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        found[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if found:
        return found["default"] if list(found) == ["default"] else found
    template = cfg.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template


def _is_token_value(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and value.get("__type") == "AddedToken")


def _named_tokens(cfg: dict[str, Any]) -> dict[str, Any]:
    """Named special tokens: the standard ones plus any other `*_token` string in the config."""
    named = {k: cfg[k] for k in NAMED_SPECIAL_TOKENS if cfg.get(k) is not None}
    named |= {k: v for k, v in cfg.items() if k.endswith("_token") and k not in named and _is_token_value(v)}
    extra = cfg.get("extra_special_tokens")
    return named | extra if isinstance(extra, dict) else named


def _content(value: Any) -> str:
    return value if isinstance(value, str) else value["content"]


def _to_added(value: Any, special: bool | None = None) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=True)
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    fields = {k: v for k, v in value.items() if k in flags}
    if special is not None:
        fields["special"] = special or fields.get("special", False)
    return AddedToken(value["content"], **fields)


def _sync_added_tokens(tok: RustTokenizer, cfg: dict[str, Any], named: dict[str, Any]) -> None:
    """Re-add the config's added tokens and add missing special tokens, as TokenizersBackend.__init__ does."""
    names = {_content(v) for v in named.values()}
    entries = sorted(cfg.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
    from_cfg = [_to_added(v, special=v["content"] in names) for _, v in entries]
    present = {t.content for t in tok.get_added_tokens_decoder().values()} | {t.content for t in from_cfg}
    extra = cfg.get("extra_special_tokens")
    wanted = [_to_added(v, special=True) for v in named.values()]
    wanted += [_to_added(v) for v in (extra if isinstance(extra, list) else [])]
    missing = []
    for token in wanted:
        if token.content not in present:
            present.add(token.content)
            missing.append(token)
    if from_cfg or missing:
        tok.add_tokens(from_cfg + missing)


# ---------------------------------------------------------------- chat templates
class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    return _environment().from_string(source)


@functools.lru_cache(maxsize=64)
def template_variables(source: str) -> frozenset[str]:
    return frozenset(meta.find_undeclared_variables(_environment().parse(source)))


def _mark_final_message(messages: list[dict], field: str) -> tuple[list[dict], str]:
    """Append the continue tag to the final message's text; returns the new messages and that text."""
    messages = copy.deepcopy(messages)
    final = messages[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
    if isinstance(final, str):
        messages[-1][field] = final + _CONTINUE_TAG
        return messages, final
    for block in reversed(final):
        if "text" in block:
            text, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
            return messages, text
    raise ValueError("continue_final_message is set but the final message has no text to continue!")


def _cut_at_tag(rendered: str, final: str) -> str:
    if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ValueError("continue_final_message: the chat template dropped part of the final message")
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


# ---------------------------------------------------------------- the tokenizer
def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, others for chars from 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


_CHAR_TO_BYTE = {c: b for b, c in _byte_to_char().items()}


def _decoder_types(spec: dict[str, Any] | None) -> set[str]:
    if not spec:
        return set()
    return {spec["type"]}.union(*(_decoder_types(d) for d in spec.get("decoders", [])))


class Tokenizer:
    """A model's tokenizer and chat template; every method matches transformers' tokenizer of the folder."""

    def __init__(self, tok: RustTokenizer, cfg: dict[str, Any], chat_template: str | dict[str, str] | None):
        self._tok = tok
        named = _named_tokens(cfg)
        self.special_tokens_map = {k: _content(v) for k, v in named.items()}  # template variables
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.bos_token_id = tok.token_to_id(self.bos_token) if self.bos_token is not None else None
        self.eos_token_id = tok.token_to_id(self.eos_token) if self.eos_token is not None else None
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)  # added tokens included, = len(hf)
        added = tok.get_added_tokens_decoder()
        named_ids = {tok.token_to_id(t) for t in self.special_tokens_map.values()} - {None}
        self.special_token_ids = frozenset({i for i, t in added.items() if t.special} | named_ids)
        self._added_ids = frozenset(added)
        self.chat_template = chat_template
        bpe = type(tok.model).__name__ == "BPE"
        force = cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        self.cleans_up = bool(cfg.get("clean_up_tokenization_spaces", False)) and (not bpe or force)
        decoders = _decoder_types(json.loads(tok.decoder.__getstate__())) if tok.decoder else set()
        self._byte_level = "ByteLevel" in decoders
        self._byte_fallback = "ByteFallback" in decoders
        self._bytes_cache: dict[int, bytes] = {}

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (added tokens of tokenizer_config.json included)."""
        return self._tok.to_str()

    @classmethod
    def from_path(cls, path: str, chat_template: str | None = None) -> Tokenizer:
        folder = Path(path)
        cfg = _read_config(folder)
        tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        _sync_added_tokens(tok, cfg, _named_tokens(cfg))
        tok.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        return cls(tok, cfg, chat_template if chat_template is not None else _read_templates(folder, cfg))

    # ---- text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.clean_up(text) if self.cleans_up else text

    def decode_raw(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode without transformers' clean-up of spaces before punctuation."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def clean_up(text: str) -> str:
        for old, new in _CLEANUP_PAIRS:
            text = text.replace(old, new)
        return text

    def is_byte_token(self, token_id: int) -> bool:
        """A byte-fallback token (`<0xE4>`): a piece of a character, never text on its own."""
        if not self._byte_fallback or token_id in self._added_ids:
            return False
        token = self._tok.id_to_token(token_id)
        return token is not None and _BYTE_TOKEN.fullmatch(token) is not None

    def _one_token_bytes(self, token_id: int) -> bytes:
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if self.is_byte_token(token_id):
            return bytes([int(token[3:5], 16)])
        if self._byte_level and token_id not in self._added_ids and all(c in _CHAR_TO_BYTE for c in token):
            return bytes(_CHAR_TO_BYTE[c] for c in token)
        # Decoding the token twice and keeping the second copy gives its text inside a sequence,
        # past decoders that strip a leading space from the first token only.
        once, twice = self._tok.decode([token_id], False), self._tok.decode([token_id, token_id], False)
        return (twice[len(once) :] if twice.startswith(once) else once).encode()

    def token_bytes(self, ids: Sequence[int]) -> list[list[int]]:
        """UTF-8 bytes each token contributes to the text (OpenAI logprobs `bytes`)."""
        out = []
        for token_id in ids:
            if token_id not in self._bytes_cache:
                self._bytes_cache[token_id] = self._one_token_bytes(token_id)
            out.append(list(self._bytes_cache[token_id]))
        return out

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Printable text of each token (OpenAI logprobs `token`); a piece of a character shows as U+FFFD."""
        return [bytes(b).decode("utf-8", errors="replace") for b in self.token_bytes(ids)]

    # ---- chat
    def _template(self, override: str | None, tools: list[dict] | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if override is not None:
                return templates.get(override, override)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"no default chat template among {sorted(templates)}; name one")
        if override is not None:
            return override
        if templates is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=")
        return templates

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @property
    def template_supports_tools(self) -> bool:
        return self.has_chat_template and "tools" in template_variables(self._template(None, []))

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool | str = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation.")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        source = self._template(chat_template, tools)
        final = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            messages, final = _mark_final_message(messages, field)
        rendered = compile_template(source).render(
            messages=messages,
            tools=list(tools) if tools is not None else None,
            documents=template_kwargs.pop("documents", None),
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_kwargs},
        )
        return rendered if final is None else _cut_at_tag(rendered, final)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, **kw: Any) -> list[int]:
        text = self.apply_chat_template(messages, tools, add_generation_prompt, **kw)
        return self.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- streaming
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for their leading space
CLEANUP_HOLDBACK = 8  # characters that clean-up may still rewrite once more text arrives


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class IncrementalDetokenizer:
    """Per-request streaming detokenization with stop strings (vLLM semantics)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = tuple(s for s in stop if s)
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read] were decoded last time: the context for the next text
        self._read = len(self._ids)  # ids[read:] have not become text yet
        self._raw = ""  # committed output text before any clean-up
        self._sent = 0  # characters of the visible text already returned
        self._final: str | None = None  # the text once a stop string was hit
        self.stopped = False

    @property
    def text(self) -> str:
        if self._final is not None:
            return self._final
        return self._tok.clean_up(self._raw) if self._tok.cleans_up else self._raw

    def add(self, new_ids: Sequence[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        for token_id in new_ids:
            self._ids.append(token_id)
            self._commit(final=False)
        return self._emit(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._commit(final=True)
        return self._emit(final=True)[0]

    def _commit(self, final: bool) -> None:
        """Move the decoded text of ids[read:] into `_raw` once its last character is complete."""
        ids = self._ids
        prefix_text = self._tok.decode_raw(ids[self._prefix : self._read], self._skip)
        new_text = self._tok.decode_raw(ids[self._prefix :], self._skip)
        if len(new_text) <= len(prefix_text):
            return
        if not final and (new_text.endswith(_REPLACEMENT_CHAR) or self._ends_in_byte_token()):
            return  # the character may continue in the next token
        self._raw += new_text[len(prefix_text) :]
        del ids[: self._read]  # ids before read are no longer needed as context
        self._prefix, self._read = 0, len(ids)

    def _ends_in_byte_token(self) -> bool:
        """Whether the last token that reaches the decoder is a byte piece, which the next may extend."""
        skipped = self._tok.special_token_ids if self._skip else frozenset()
        last = next((i for i in reversed(self._ids) if i not in skipped), None)
        return last is not None and self._tok.is_byte_token(last)

    def _emit(self, final: bool) -> tuple[str, bool]:
        text = self.text
        # The stop string that ends first is the one that would have stopped generation.
        hits = [(i + len(s), i) for s in self._stops if (i := text.find(s, self._sent)) >= 0]
        if hits:
            self._final, self.stopped = text[: min(hits)[1]], True
            return self._final[self._sent :], True
        end = len(text)
        if not final:
            end -= max(_partial_stop_len(text, self._stops), CLEANUP_HOLDBACK if self._tok.cleans_up else 0)
        end = max(end, self._sent)
        delta, self._sent = text[self._sent : end], end
        return delta, False
