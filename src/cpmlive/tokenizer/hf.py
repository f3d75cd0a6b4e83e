"""The tokenizer of an HF model directory (Llama, Qwen, Mistral, GLM-4, MiniCPM): ``tokenizer.json``
through the ``tokenizers`` library, with the rules transformers (5.x) lays over that file.

Those rules, which decide the ids as much as the file does:

* the added tokens of ``tokenizer_config.json`` (``added_tokens_decoder``) and its named special
  tokens (``bos_token``, ``eos_token``, ... and ``additional_special_tokens``) join the file's added
  tokens where it lacks them, the named ones as special tokens; ``special_tokens_map.json`` is read
  only where the config has no ``added_tokens_decoder``;
* the special tokens ``tokenizer(text)`` adds are the file's post-processor's: transformers drops
  ``add_bos_token``/``add_eos_token`` when a ``tokenizer.json`` is present, and adds none where the
  file has no post-processor;
* a ``LlamaTokenizer`` whose file is not byte-level gets Llama's own pre-tokenizer back (no
  normalizer; Metaspace, prefixing the first piece, or every piece where ``legacy`` is true):
  Llama-2's ``tokenizer.json`` prefixes ``▁`` by a normalizer, also after a special token inside
  the text, where transformers 5 does not;
* ``clean_up_tokenization_spaces`` is ignored for BPE models, as transformers ignores it;
* the chat template (``chat_template.jinja`` beside, else the config's ``chat_template``, one string
  or a list of named ones) renders in transformers' sandboxed Jinja environment, with the named
  special tokens as variables.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from cpmlive.errors import CpmliveError

VOCAB_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# What a writer copies to carry a tokenizer over (the ones a directory has).
TOKENIZER_FILES = (VOCAB_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE)
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The special tokens a transformers class supplies where the config does not name them.
CLASS_DEFAULTS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None where there is no such file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpmliveError(f"{path}: not a valid JSON {what} ({exc})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: a {what} must be a JSON object")
    return data


def _read_backend(path: Path) -> tuple[Any, str]:
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json`` and the file's text, refused in one line
    when it is not one."""
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CpmliveError(f"{path}: cannot read the tokenizer ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CpmliveError(f"{path}: not a tokenizers JSON (a tokenizer.json has a \"model\" object)")
    try:
        return Tokenizer.from_str(text), text
    except Exception as exc:  # the Rust binding raises plain Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CpmliveError(f"{path}: not a tokenizers JSON ({reason})") from None


def _token_text(value: Any) -> str | None:
    """A named token's text: a string, or the ``content`` of a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: Any, special: bool | None = None) -> Any:
    """A ``tokenizers.AddedToken`` from a string or a serialized AddedToken (a dict)."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        return AddedToken(value, special=True if special is None else special)
    fields = {key: value[key] for key in TOKEN_FIELDS if key in value}
    if special is not None and not fields.get("special", False):
        fields["special"] = special
    return AddedToken(**fields)


def _special_tokens(config: dict[str, Any], tokens_map: dict[str, Any] | None) -> tuple[dict[str, Any], list[Any]]:
    """The named special tokens (attribute -> str or serialized AddedToken; the standard seven and a
    model's own ``*_token`` keys) and the extra special tokens, as transformers resolves them."""
    defaults = CLASS_DEFAULTS.get(str(config.get("tokenizer_class", "")).removesuffix("Fast"), {})
    named: dict[str, Any] = {key: config[key] if key in config else defaults.get(key) for key in NAMED_TOKENS}
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extras, dict):
        named.update(extras)
        extras = []
    named.update({key: value for key, value in config.items()
                  if key not in NAMED_TOKENS and key.endswith("_token") and isinstance(value, str)})
    extras = list(extras)
    if "added_tokens_decoder" not in config and tokens_map:
        for key, value in tokens_map.items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                extras += [token for token in value if token not in extras]
            else:
                named[key] = value
    return {key: value for key, value in named.items() if _token_text(value) is not None}, extras


# ---- chat templates, rendered as transformers renders them (utils/chat_template_utils.py) --------------


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> Any:
    """``template`` compiled in transformers' environment: sandboxed (immutable), ``trim_blocks`` and
    ``lstrip_blocks``, loop controls, the ``{% generation %}`` tag, and its globals and ``tojson``."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (which marks the assistant's tokens for
        transformers' masks) renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's own signature trick)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                               namespace=TemplateNamespace)
    return environment.from_string(template)


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like data (transformers' ``_plain_template_data``); any
    other object becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The messages as transformers hands them to a template: keys whose value is None dropped,
    the reasoning filled in under ``reasoning_content`` and ``thinking`` from any of its names."""
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise CpmliveError(f"a chat message must be an object with a role and content, not {message!r}")
        message = {key: value for key, value in _plain(message).items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def render_chat(template: str, messages: list[Any], add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    """``messages`` through ``template`` with ``variables`` (``tools``, ``documents``, the special
    tokens, ...); a template that fails is refused in one line saying why."""
    import jinja2

    if not messages:
        raise CpmliveError("cannot apply a chat template to an empty conversation")
    variables = _plain({"tools": None, "documents": None, **variables})
    try:
        return compile_chat_template(template).render(messages=_chat_messages(messages),
                                                      add_generation_prompt=add_generation_prompt, **variables)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            ZeroDivisionError, OverflowError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CpmliveError(f"the chat template failed to render: {reason}") from None


class HFTokenizer:
    """The tokenizer of an HF model directory, opened on its ``tokenizer.json``.

    ``encode`` adds no special token; ``encode_for_model`` is ``tokenizer(text)["input_ids"]``
    (the file's post-processor: Llama's ``<s>``, GLM-4's ``[gMASK]<sop>``, nothing for Qwen).
    ``bos_id`` is the BOS token, or where there is none (Qwen) the EOS token, which in such
    models' training data ends the document before; ``stop_ids`` adds ``generation_config.json``'s
    ``eos_token_id`` (Qwen's chat models stop at ``<|im_end|>`` and ``<|endoftext|>``).
    """

    vocab_file = VOCAB_FILE
    mask_id = newline_id = space_id = bod_id = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        directory = self.path.parent
        self.backend, text = _read_backend(self.path)
        self.config = _read_json(directory / CONFIG_FILE, "tokenizer config") or {}
        tokens_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE, "special tokens map")
        self.special_tokens, extras = _special_tokens(self.config, tokens_map)
        self._add_config_tokens(extras)
        self._restore_class_pipeline(byte_level='"ByteLevel"' in text)
        self.backend.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
        generation = _read_json(directory / GENERATION_CONFIG_FILE, "generation config") or {}
        self._set_special_ids(generation.get("eos_token_id"))
        self.chat_templates = self._read_chat_templates(directory)
        self.model_max_length = self.config.get("model_max_length")
        self._clean_up = bool(self.config.get("clean_up_tokenization_spaces", False)) and (
            type(self.backend.model).__name__ != "BPE"
            or bool(self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    # ---- opening -----------------------------------------------------------------------------------

    def _add_config_tokens(self, extras: list[Any]) -> None:
        """The config's added tokens and the named special tokens the file lacks, added as transformers
        adds them (the config's properties win over the file's where they differ)."""
        existing = {repr(token) for token in self.backend.get_added_tokens_decoder().values()}
        declared = self.config.get("added_tokens_decoder") or {}
        to_add = []
        for _, value in sorted(((int(key), value) for key, value in declared.items()), key=lambda item: item[0]):
            token = _added_token(value)
            if repr(token) not in existing:
                to_add.append(token)
        known = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        known |= {token.content for token in to_add}
        for value in [*self.special_tokens.values(), *extras]:
            text = _token_text(value)
            if text is not None and text not in known:
                to_add.append(_added_token(value, special=True))
                known.add(text)
        if to_add:
            self.backend.add_tokens(to_add)

    def _restore_class_pipeline(self, byte_level: bool) -> None:
        """Llama's own pre-tokenizer and decoder, which transformers' ``LlamaTokenizer`` builds over
        the file's vocabulary and merges (a file that mentions ``"ByteLevel"`` AutoTokenizer reads
        as it is, as Llama 3's)."""
        from tokenizers import decoders, pre_tokenizers

        if str(self.config.get("tokenizer_class", "")).removesuffix("Fast") != "LlamaTokenizer":
            return
        if type(self.backend.model).__name__ != "BPE" or byte_level:
            return
        add_prefix_space = self.config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        if add_prefix_space:
            scheme = "always" if self.config.get("legacy", False) else "first"
        else:
            scheme = "never"
        self.backend.normalizer = None
        self.backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        self.backend.decoder = decoders.Sequence(steps)

    def _set_special_ids(self, generation_eos: Any) -> None:
        def token_id(attribute: str) -> int | None:
            text = _token_text(self.special_tokens.get(attribute))
            return None if text is None else self.backend.token_to_id(text)

        eos_ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        eos_ids = [i for i in eos_ids if isinstance(i, int) and not isinstance(i, bool)]
        eos = token_id("eos_token")
        eos = token_id("sep_token") if eos is None and not eos_ids else eos  # an encoder's (BERT's) [SEP]
        self.mask_id = token_id("mask_token")
        if eos is None and not eos_ids:
            raise CpmliveError(f"{self.path}: the tokenizer names no end-of-sequence token (eos_token in "
                               f"{CONFIG_FILE} or eos_token_id in {GENERATION_CONFIG_FILE})")
        self._eos_id = eos if eos is not None else eos_ids[0]
        bos = token_id("bos_token")
        self._bos_id = bos if bos is not None else self._eos_id
        pad = token_id("pad_token")
        self._pad_id = pad if pad is not None else self._eos_id
        self._unk_id = token_id("unk_token")
        self._stop_ids = frozenset([self._eos_id, *eos_ids])
        self._has_bos = bos is not None

    def _read_chat_templates(self, directory: Path) -> dict[str, str]:
        """The chat templates by name (``default`` for the single one), as transformers finds them."""
        files: dict[str, str] = {}
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            files["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (directory / CHAT_TEMPLATE_DIR).is_dir():
            for template_file in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                files[template_file.name.removesuffix(".jinja")] = template_file.read_text(encoding="utf-8")
        if files:
            return files
        template = self.config.get("chat_template")
        if isinstance(template, str):
            return {"default": template}
        if isinstance(template, list):
            try:
                return {str(entry["name"]): str(entry["template"]) for entry in template}
            except (TypeError, KeyError):
                raise CpmliveError(f"{self.path.parent / CONFIG_FILE}: chat_template must be a string or a list of "
                                   "{\"name\", \"template\"} objects") from None
        return {}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], hf_compat: bool = False) -> "HFTokenizer":
        """The tokenizer of a ``tokenizer.json`` (or of the directory that holds one)."""
        if hf_compat:
            raise CpmliveError("--hf-tokenizer is CPM-Ant's; an HF directory's tokenizer is its tokenizer.json")
        path = Path(path)
        return cls(path / VOCAB_FILE if path.is_dir() else path)

    @classmethod
    def for_model(cls, vocab: Path, vocab_size: int, hf_compat: bool = False) -> "HFTokenizer":
        """The tokenizer of a model directory, refused when it has more tokens than the embedding
        has rows (fewer is fine: Qwen pads its embedding)."""
        if hf_compat:
            raise CpmliveError("hf_tokenizer is CPM-Ant's; an HF directory's tokenizer is its tokenizer.json")
        tokenizer = cls.from_file(vocab)
        if tokenizer.vocab_size > vocab_size:
            raise CpmliveError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens, the embedding "
                               f"only {vocab_size} rows")
        return tokenizer

    @classmethod
    def reads(cls, vocab: str | os.PathLike[str]) -> bool:
        """Whether ``vocab`` is this tokenizer's kind of file: a ``.json`` (a ``tokenizer.json``)."""
        return Path(vocab).suffix == ".json"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Copy ``tokenizer.json`` to ``path`` and the files beside it that shape it
        (:data:`TOKENIZER_FILES`, where the source has them) to ``path``'s directory."""
        target = Path(path)
        shutil.copyfile(self.path, target)
        for name in TOKENIZER_FILES[1:]:
            source = self.path.parent / name
            if source.is_file() and source.resolve() != (target.parent / name).resolve():
                shutil.copyfile(source, target.parent / name)

    # ---- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (the highest id + 1)."""
        added = self.backend.get_added_tokens_decoder()
        return max(self.backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    @property
    def tokens(self) -> list[str]:
        """Every id's token ("" where the vocabulary has a hole)."""
        return [self.backend.id_to_token(i) or "" for i in range(self.vocab_size)]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise CpmliveError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self.backend.id_to_token(token_id) or ""

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode_for_model`` starts a text with the BOS token."""
        return self._has_bos and self.encode_for_model("")[:1] == [self._bos_id]

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    # ---- text --------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def pieces_with_ids(self, text: str) -> list[tuple[str, int]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(zip(encoding.tokens, encoding.ids))

    def encode(self, text: str) -> list[int]:
        """The text's ids, no special token added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_for_model(self, text: str) -> list[int]:
        """``tokenizer(text)["input_ids"]``: with the special tokens the post-processor adds."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """transformers' ``decode``; negative ids (padding) are dropped, and so are ids past the
        tokenizer, as HF drops them (Qwen's embedding has rows no token names: a sampled one is no text)."""
        size = self.vocab_size
        id_list = [int(i) for i in ids if 0 <= int(i) < size]
        text = self.backend.decode(id_list, skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in CLEANUPS:
                text = text.replace(before, after)
        return text

    # ---- chat --------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None where the tokenizer has none, or only named ones)."""
        return self.chat_templates.get("default")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The conversation rendered as transformers' ``apply_chat_template(..., tokenize=False)``
        renders it; ``extra`` goes to the template (``tools``, ``documents``, ``enable_thinking``,
        ...), and ``chat_template`` picks a named template or gives one."""
        template = self._pick_template(extra.pop("chat_template", None), extra.get("tools"))
        variables = {key: _token_text(value) for key, value in self.special_tokens.items()}
        return render_chat(template, messages, add_generation_prompt, {**variables, **extra})

    def _pick_template(self, name_or_template: str | None, tools: Any) -> str:
        if name_or_template is not None:
            return self.chat_templates.get(name_or_template, name_or_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise CpmliveError(f"{self.path.parent}: the tokenizer has several chat templates and no default "
                               f"({', '.join(sorted(self.chat_templates))}); name one")
        raise CpmliveError(f"{self.path.parent}: the tokenizer has no chat template")


__all__ = ["HFTokenizer", "TOKENIZER_FILES", "VOCAB_FILE"]
