"""What the client sees of a sample's tokens: text deltas, stop strings, EOS."""

from router.detokenize import SampleText


def feed_all(text: SampleText, chunks):
    out, stopped = [], False
    for ids in chunks:
        delta, stopped = text.feed(ids)
        out.append(delta)
        if stopped:
            break
    out.append(text.finish())
    return out, stopped


def test_plain_text_streams_as_it_comes(tokenizer):
    ids = tokenizer.encode(" The quick brown fox jumps")
    text = SampleText(tokenizer.detokenizer([1]))
    deltas, stopped = feed_all(text, [[t] for t in ids])
    assert "".join(deltas) == " The quick brown fox jumps" and not stopped
    assert deltas[0] == " The"                     # nothing held back without stop strings


def test_a_stop_string_split_over_chunks_is_cut_and_never_shown(tokenizer):
    ids = tokenizer.encode(" one two three four five")
    text = SampleText(tokenizer.detokenizer([1]), stop=["three f"])
    deltas, stopped = feed_all(text, [[t] for t in ids])
    assert stopped and text.stop_reason == "three f"
    assert "".join(deltas) == " one two "
    assert all("three" not in d for d in deltas)


def test_text_that_might_start_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    text = SampleText(tokenizer.detokenizer([1]), stop=["xyz!"])
    first, _ = text.feed(tokenizer.encode(" abc"))
    assert first == " "           # the last 3 chars are held back: a 4-char stop string could still end here
    second, _ = text.feed(tokenizer.encode(" defgh"))
    assert first + second + text.finish() == " abc defgh"


def test_a_trailing_eos_is_not_text(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    text = SampleText(tokenizer.detokenizer([1], skip_special_tokens=False), eos_token_ids=(eos,))
    deltas, _ = feed_all(text, [tokenizer.encode(" hi") + [eos]])
    assert "".join(deltas) == " hi"
