"""Our GGUF-built tokenizer must tokenize, decode and render chat templates
exactly like transformers' tokenizer loaded from the same GGUF; the incremental
detokenizer must never emit half a character."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.helpers.tiny_models import hf_smollm2_tokenizer, smollm2_gguf_path

pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "",
    " leading space and trailing space ",
    "In 2024, 12345 people paid $3.14 each; 1,000,000 in total!",
    "héllo naïve café — “quotes” ünïcödé ß æ ø",
    "😀 🚀 👨‍👩‍👧 🏳️‍🌈 中文字符 日本語のテキスト 한국어 العربية עברית",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>name<file_sep>x<|im_end|>",
    "  multiple   spaces\n\n\ttabs\r\nwindows",
    "don't I'm we've they'll she'd IT'S",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|> not special: <im_start> <|im_start",
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_path(smollm2_gguf_path())


@pytest.fixture(scope="module")
def ref():
    return hf_smollm2_tokenizer()


def test_metadata(ours, ref):
    assert ours.vocab_size == 49152 == len(ref)
    assert ours.bos_token_id == 1 == ref.bos_token_id
    assert ours.eos_token_ids == (2,) and ref.eos_token_id == 2
    assert ours.encode("<|im_start|>") == [1]


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(ours, ref, add_special):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special) == \
            ref.encode(text, add_special_tokens=add_special), text


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(ours, ref, skip):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        if not skip:
            assert ours.decode(ids, skip_special_tokens=False) == text


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? 😀"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, ref, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_errors(ours):
    bare = Tokenizer(ours._tok, special_tokens={}, eos_token_ids=(2,), chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    strict = Tokenizer(ours._tok, special_tokens={}, eos_token_ids=(2,),
                       chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])


def test_folder_roundtrip_and_transformers_agree(ours, ref, tmp_path):
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_path(tmp_path)
    assert again.eos_token_ids == ours.eos_token_ids and again.bos_token_id == ours.bos_token_id
    assert again.chat_template == ours.chat_template
    from transformers import AutoTokenizer
    hf_folder = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == hf_folder.encode(text), text
    assert again.apply_chat_template(CONVERSATIONS[1]) == \
        hf_folder.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)


def test_not_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_path(tmp_path)


MULTIBYTE = "Emoji 😀🚀🏳️‍🌈, CJK 中文字符 日本語のテキスト, accents é ü ß — and “quotes”. Ω≈ç√∫"


def test_multibyte_characters_are_split_across_tokens(ours):
    """Precondition of the detokenizer tests: some single tokens are partial characters."""
    ids = ours.encode(MULTIBYTE)
    assert any("\ufffd" in ours.decode([i]) for i in ids)


@pytest.mark.parametrize("seed", range(5))
def test_incremental_detokenizer(ours, seed):
    rng = random.Random(seed)
    prompt = ours.encode("<|im_start|>user\nsay something<|im_end|>\n<|im_start|>assistant\n")
    out = ours.encode(MULTIBYTE + " done.<|im_end|>")
    detok = IncrementalDetokenizer(ours, prompt)
    pieces, i = [], 0
    while i < len(out):
        n = 1 if seed == 0 else rng.randint(1, 3)   # seed 0: one token per step
        piece = detok.step(out[i:i + n])
        assert "\ufffd" not in piece
        pieces.append(piece)
        i += n
    assert "".join(pieces) == detok.text == ours.decode(out) == MULTIBYTE + " done."


def test_incremental_detokenizer_keeps_special_tokens_when_asked(ours):
    out = ours.encode("a<|im_end|>b 😀")
    detok = IncrementalDetokenizer(ours, [], skip_special_tokens=False)
    assert "".join(detok.step([t]) for t in out) == "a<|im_end|>b 😀"


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, engine.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_names_resolve_to_tokenizers_without_torch():
    """The router and the model loader share one lookup (engine.tokenizer), and the
    router reaches it without importing torch."""
    code = ("import sys; from router.tokenizer import RouterTokenizer; "
            "from engine.tokenizer import resolve_tokenizer_path as r; "
            "assert r('smollm2-135m') == r('dummy:llama3-8b') and r('smollm2-135m').suffix == '.gguf'; "
            "assert str(r('/some/folder')) == '/some/folder'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from engine.models import loader
    from engine.tokenizer import embedded_gguf_path, resolve_tokenizer_path
    assert loader.embedded_gguf_path is embedded_gguf_path
    assert resolve_tokenizer_path("smollm2-135m") == embedded_gguf_path() == smollm2_gguf_path()
