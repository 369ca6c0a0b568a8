"""Tokenizer metrics (METHODS.md TOK-2..7) against hand counts, closed forms, independent implementations."""

from __future__ import annotations

import math
import unicodedata
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensmith.tokenization import metrics as M


@pytest.fixture(scope="module")
def smol():
    from tokensmith.tokenization.tokenizers import load_tokenizer
    from tokensmith.tokenization.view import TokenizerView

    return TokenizerView(load_tokenizer("smollm2"))


@pytest.fixture(scope="module")
def minilm():
    from tokensmith.tokenization.tokenizers import load_tokenizer
    from tokensmith.tokenization.view import TokenizerView

    return TokenizerView(load_tokenizer("minilm"))


# ------------------------------------------------------------------------------------------- Rényi (TOK-4)

PICK = "pick @@ed pick @@l @@ed pick @@les".split()


def test_renyi_efficiency_reference_numbers():
    counts = Counter(PICK)  # pick 3, @@ed 2, @@l 1, @@les 1
    assert sorted(counts.values()) == [1, 1, 2, 3]
    assert M.renyi_efficiency(counts, 3.0, vocab_size=4) == pytest.approx(0.80315, abs=5e-6)
    assert M.renyi_efficiency(counts, 2.5, vocab_size=4) == pytest.approx(0.82651, abs=5e-6)
    # alpha is honoured (the reference README prints the alpha=3 number for alpha=2.5)
    assert (
        abs(M.renyi_efficiency(counts, 2.5, vocab_size=4) - M.renyi_efficiency(counts, 3.0, vocab_size=4))
        > 0.02
    )
    # closed form by hand: H_3 = -1/2 log2((27 + 8 + 1 + 1) / 343)
    assert M.renyi_entropy(counts, 3.0) == pytest.approx(-0.5 * math.log2(37 / 343), rel=1e-12)


def test_renyi_alpha_to_one_is_shannon_and_true_vocab_matters():
    p = np.array([3, 2, 1, 1]) / 7
    shannon = float(-(p * np.log2(p)).sum())
    assert M.renyi_entropy(PICK and Counter(PICK), 1.0) == pytest.approx(shannon, rel=1e-12)
    for eps in (1e-4, -1e-4):  # continuity at alpha = 1
        assert M.renyi_entropy(Counter(PICK), 1 + eps) == pytest.approx(shannon, abs=1e-3)
    assert M.unigram_entropy(Counter(PICK)) == pytest.approx(shannon, rel=1e-12)
    # zeros (unseen types) do not change the entropy, but |V| does change the efficiency
    assert M.renyi_entropy([3, 2, 1, 1, 0, 0], 2.5) == pytest.approx(M.renyi_entropy([3, 2, 1, 1], 2.5))
    assert M.renyi_efficiency([3, 2, 1, 1], 2.5, vocab_size=16) == pytest.approx(
        M.renyi_efficiency([3, 2, 1, 1], 2.5, vocab_size=4) / 2
    )
    assert M.renyi_entropy([5, 1, 1], math.inf) == pytest.approx(-math.log2(5 / 7))
    with pytest.raises(ValueError, match="true"):
        M.renyi_efficiency([1, 2], 2.5, vocab_size=1)


# ------------------------------------------------------------------------------- premium / parity (TOK-3)


def test_premium_of_a_language_against_itself_is_exactly_one():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, size=200)
    assert M.tokenization_premium(x, x) == 1.0
    s = M.unfairness_summary({"en": x, "de": x * 2, "xx": x}, "en", n_boot=200, seed=1)
    assert s["premium"]["en"] == 1.0 and s["premium"]["xx"] == 1.0
    assert s["premium_ci"]["en"] == (1.0, 1.0)
    assert s["premium"]["de"] == 2.0 and s["premium_ci"]["de"] == (2.0, 2.0)
    langs, m = M.parity_matrix({"en": x, "de": x * 2})
    assert np.all(np.diag(m) == 1.0)


def test_premium_hand_counted_and_parity_matrix():
    en, de, ja = [4, 6], [5, 7], [10, 14]
    assert M.tokenization_premium(de, en) == 12 / 10
    assert M.tokenization_premium(ja, en) == 24 / 10
    langs, m = M.parity_matrix({"en": en, "de": de, "ja": ja})
    assert langs == ["en", "de", "ja"]
    assert m[1, 0] == pytest.approx(1.2) and m[2, 1] == pytest.approx(2.0)
    np.testing.assert_allclose(m * m.T, np.ones((3, 3)), rtol=1e-15)
    s = M.unfairness_summary({"en": en, "de": de, "ja": ja}, "en", n_boot=0)
    assert s["max_min_ratio"] == pytest.approx(2.4) and s["argmax"] == "ja" and s["argmin"] == "en"
    assert s["gini"] == pytest.approx(M.gini([1.0, 1.2, 2.4]))
    with pytest.raises(ValueError, match="aligned"):
        M.tokenization_premium([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="reference"):
        M.unfairness_summary({"en": en}, "fr")
    with pytest.raises(ValueError, match="empty"):
        M.tokenization_premium([], [])


def test_gini_matches_pairwise_definition():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 50):
        x = rng.gamma(2.0, size=n)
        pair = np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean())
        assert M.gini(x) == pytest.approx(pair, rel=1e-12, abs=1e-15)
    assert M.gini([2, 2, 2]) == 0.0


def test_bootstrap_is_seeded_and_matches_an_index_bootstrap():
    rng = np.random.default_rng(0)
    ref = rng.integers(5, 30, size=300).astype(float)
    lang = ref * rng.uniform(1.2, 2.2, size=300)
    a = M.premium_bootstrap(lang, ref, n_boot=2000, seed=7)
    assert a == M.premium_bootstrap(lang, ref, n_boot=2000, seed=7)
    assert a != M.premium_bootstrap(lang, ref, n_boot=2000, seed=8)
    point = M.tokenization_premium(lang, ref)
    assert a[0] < point < a[1]
    # independent implementation: resample sentence indices (a different RNG stream, same distribution)
    g = np.random.default_rng(123)
    idx = g.integers(0, 300, size=(4000, 300))
    v = lang[idx].sum(1) / ref[idx].sum(1)
    lo, hi = np.quantile(v, [0.025, 0.975])
    width = hi - lo
    assert abs(a[0] - lo) < 0.15 * width and abs(a[1] - hi) < 0.15 * width
    s = M.unfairness_summary({"en": ref, "de": lang}, "en", n_boot=2000, seed=7)
    assert s["premium_ci"]["de"] == pytest.approx(a)  # the same resamples
    assert s["max_min_ratio_ci"][0] <= s["max_min_ratio"] <= s["max_min_ratio_ci"][1]


# ---------------------------------------------------------------------------- words, fertility, PCW (TOK-2)


def _units_reference(text: str) -> list[tuple[int, int, bool]]:
    """Per-character loop over the documented rule (regex classes, Python only): char spans + is_char."""
    import regex

    nos = regex.compile(f"[{M._NOSPACE_CLASS}]")
    out: list[list] = []
    prev = None  # "space" | "nos" | "other"
    for i, ch in enumerate(text):
        if regex.match(r"\s", ch):
            prev = "space"
            continue
        kind = "nos" if nos.match(ch) else "other"
        is_mark = unicodedata.category(ch).startswith("M")
        if out and prev != "space" and (is_mark or (kind == "other" and prev == "other")):
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1, kind == "nos"])
        prev = kind
    return [tuple(x) for x in out]


ALPHABET = st.sampled_from(
    list("ab Z9.,!-")
    + [
        " ",
        "\n",
        "\t",
        "\u00a0",
        "é",
        "e\u0301",
        "中",
        "文",
        "日本",
        "ひら",
        "カタ",
        "ー",
        "、",
        "。",
        "ภา",
        "ษ",
        "\u0e31",
        "한국",
        "😀",
        "𠀀",
        "Ωλ",
        "١٢",
        "नम",
        "\u0301",
        "\u3000",
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(ALPHABET, max_size=25).map("".join))
def test_word_spans_match_a_per_character_reference(text):
    spans, is_char = M.word_spans(text)
    ref = _units_reference(text)
    cum = np.r_[0, np.cumsum([len(c.encode()) for c in text])].astype(int)
    assert [(cum[a], cum[b], c) for a, b, c in ref] == [
        (int(s), int(e), bool(c)) for (s, e), c in zip(spans, is_char, strict=True)
    ]


def test_word_spans_hand_counted():
    spans, is_char = M.word_spans("The cat's  hat, 今日は晴れ。 ok")
    assert len(spans) == 3 + 6 + 1  # The, cat's, hat, | 今 日 は 晴 れ 。 | ok
    assert is_char.tolist() == [False] * 3 + [True] * 6 + [False]
    spans, is_char = M.word_spans("ภาษาไทย")  # Thai: every character unit; SARA AA is its own unit
    assert len(spans) == 7 and is_char.all()
    assert M.word_spans("   ")[0].shape == (0, 2)


def test_tokens_per_word_fertility_pcw_hand_counted():
    # "unbelievable stuff ." as tokens: "un" "believ" "able" " stuff" " ."
    data = b"unbelievable stuff ."
    offs = np.array([[0, 2], [2, 8], [8, 12], [12, 18], [18, 20]])
    spans, _ = M.word_spans(data.decode())
    counts = M.tokens_per_word(offs, spans)
    assert counts.tolist() == [3, 1, 1]
    assert M.fertility(counts) == 5 / 3
    assert M.continued_word_ratio(counts) == 1 / 3
    assert M.fertility([5, 7], [4, 2]) == 2.0
    # a token of spaces only belongs to no word; a special token (empty span) neither
    offs2 = np.array([[0, 12], [12, 13], [13, 18], [18, 18]])
    assert M.tokens_per_word(offs2, np.array([[0, 12], [13, 18]])).tolist() == [1, 1]
    with pytest.raises(ValueError, match="word"):
        M.fertility([], [])


def test_fertility_through_a_real_tokenizer_matches_brute_force(smol, minilm):
    texts = [
        "The weather is nice today, so we go.",
        "Das Wetter ist heute schön.",
        "今日は天気がいいです。",
        "Сегодня хорошая погода",
        "naïve 😀 emoji  spaces",
        "x",
    ]
    for view in (smol, minilm):
        enc = M.encode_corpus(view, texts, progress=False)
        m = M.corpus_metrics(enc)
        tot_words = tot_tok = cont = 0
        for t, e in zip(texts, view.encode_batch(texts), strict=True):
            spans, _ = M.word_spans(t)
            for ws, we in spans.tolist():
                k = sum(1 for s, b in e.offsets if b > s and s < we and b > ws)  # brute-force overlap
                tot_tok += k
                tot_words += 1
                cont += k >= 2
        assert m["words"] == tot_words
        assert m["fertility"] == pytest.approx(tot_tok / tot_words, rel=1e-12)
        assert m["pcw"] == pytest.approx(cont / tot_words, rel=1e-12)
        assert m["tokens"] == sum(len(e.ids) for e in view.encode_batch(texts))
        assert 0 < m["char_unit_share"] < 1


def test_encode_corpus_offsets_equal_the_view(smol, minilm):
    texts = [
        "Hello world",
        "naïve 😀 中文",
        "<|im_start|> is text",
        "tabs\tand\n\nnewlines",
        "  lead",
        "1234567",
    ]
    for view in (smol, minilm):
        enc = M.encode_corpus(view, texts, batch_size=4, progress=False)
        ref = view.encode_batch(texts)
        for i, e in enumerate(ref):
            a, b = enc.text_index[i], enc.text_index[i + 1]
            assert enc.ids[a:b].tolist() == list(e.ids)
            assert enc.offsets[a:b].tolist() == [list(o) for o in e.offsets]
        sub = enc.select(1, 3)
        assert sub.texts == texts[1:3] and sub.lengths.tolist() == enc.lengths[1:3].tolist()


def test_encode_corpus_bad_input(smol):
    with pytest.raises(ValueError, match="empty"):
        M.encode_corpus(smol, [], progress=False)
    with pytest.raises(ValueError, match="surrogate"):
        M.encode_corpus(smol, ["ok", "bad \ud800 text"], progress=False)
    with pytest.raises(TypeError, match="str"):
        M.encode_corpus(smol, ["ok", b"bytes"], progress=False)


# ---------------------------------------------------------------------------------- compression & vocab


def test_compression_nsl_vocab_unk_byte_rates():
    assert M.normalized_sequence_length([8, 12], [10, 15]) == 0.8
    assert M.unused_vocab_share([3, 0, 1, 0, 0], 5) == 3 / 5
    assert M.unused_vocab_share([3, 0, 1, 0, 0], 5, exclude=[4]) == 2 / 4
    with pytest.raises(ValueError, match="true"):
        M.unused_vocab_share([1] * 6, 5)
    assert M.unk_rate([1, 0, 0, 2], [0]) == 0.5 and M.unk_rate([1, 2], []) == 0.0
    assert M.byte_fallback_rate([3, 3, 1], [False, False, False, True]) == 2 / 3
    # "a", first two bytes of "中", last byte of "中", "b" -> 2 of 4 tokens are partial
    data = "a中b".encode()
    assert M.partial_char_rate([[0, 1], [1, 3], [3, 4], [4, 5]], data) == 0.5
    assert M.partial_char_rate([[0, 1], [1, 4], [4, 5], [5, 5]], data) == 0.0


def test_partial_char_rate_equals_replacement_char_count(smol):
    # independent definition (tokscope's): a token whose bytes alone decode with U+FFFD
    texts = ["今日は天気がいいです", "नमस्ते दुनिया", "😀👍🏽 ok"]
    enc = M.encode_corpus(smol, texts, progress=False)
    m = M.corpus_metrics(enc)
    fffd = sum("\ufffd" in smol.token_bytes(i).decode("utf-8", "replace") for i in enc.ids.tolist())
    assert m["partial_char_rate"] == pytest.approx(fffd / enc.ids.size, rel=1e-12)
    assert m["partial_char_rate"] > 0


def test_bytes_and_chars_per_token(smol):
    texts = ["Hello world", "über"]
    m = M.measure(smol, texts, progress=False)
    n = sum(len(e.ids) for e in smol.encode_batch(texts))
    assert m["bytes_per_token"] == pytest.approx((11 + 5) / n) and m["chars_per_token"] == pytest.approx(
        15 / n
    )
    c = M.compression(smol, texts, smol, progress=False)
    assert c["nsl"] == 1.0 and c["tokens"] == n


# -------------------------------------------------------------------------------- stream statistics (TOK-7)


def test_zipf_entropy_innovation_compression():
    z = M.zipf_fit([1000 * k**-1.3 for k in range(1, 200)])
    assert z["exponent"] == pytest.approx(1.3, abs=1e-9) and z["r2"] == pytest.approx(1.0, abs=1e-12)
    assert M.unigram_entropy([5] * 8) == pytest.approx(3.0)
    r = M.token_innovation([1, 1, 2, 1, 3, 3, 4, 4], n_points=4)
    assert r["positions"] == [2, 4, 6, 8] and r["types"] == [1, 2, 3, 4] and r["rate"] == 0.5
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 50000, size=20000)
    for codec in ("zlib", "lzma", "bz2"):
        assert M.compression_ratio([7] * 20000, codec) < 0.01
        assert M.compression_ratio(rand, codec, vocab_size=50000) > 0.9  # ~16 bits of entropy in 16-bit ids
    # fixed width: 2 bytes per id up to |V| = 65,536
    import zlib

    assert (
        M.compression_ratio([1, 2, 3], "zlib", vocab_size=10)
        == len(zlib.compress(np.array([1, 2, 3], "<u2").tobytes(), 6)) / 6
    )
    with pytest.raises(ValueError, match="codec"):
        M.compression_ratio([1], "gzip")


# ------------------------------------------------------------------------------------------- numbers


def test_digit_chunks_and_styles():
    # tokens: "a " "123" "456" "7" " " "12" "," "345" -> runs 1234567 and 12 / 345
    data = b"a 1234567 12,345"
    offs = [[0, 2], [2, 5], [5, 8], [8, 9], [9, 10], [10, 12], [12, 13], [13, 16]]
    assert M.digit_chunks(offs, data) == [[3, 3, 1], [2], [3]]
    assert M.number_split_style([[3, 3, 1], [3, 2], [2]])["style"] == "ltr_3"
    assert M.number_split_style([[1, 3, 3], [2, 3]])["style"] == "rtl_3"
    assert M.number_split_style([[1, 1, 1, 1]])["style"] == "single_digit"
    assert M.number_split_style([[2, 3, 1]])["style"] == "learned"
    assert M.number_split_style([])["style"] == "none"
    h = M.number_split_style([[3, 3, 1]])["digits_per_token"]
    assert h == {1: 1 / 3, 3: 2 / 3}


def test_number_style_of_real_tokenizers(smol, minilm):
    nums = [" ".join(str(10**k + 7 * k) for k in range(1, 9))]
    assert M.measure(smol, nums, progress=False)["number_style"]["style"] == "single_digit"  # SmolLM2: digits
    assert (
        M.measure(minilm, nums, progress=False)["number_style"]["max_digits_per_token"] > 1
    )  # WordPiece merges


# ------------------------------------------------------------------------------------------- MorphScore


def test_morph_score_hand_counted():
    gold = [[4], [4], [4], [3]]
    toks = [[4], [2], [], [1, 3]]  # hit, miss, one-token (skipped), hit
    r = M.morph_score(toks, gold)
    assert r == {"score": 2 / 3, "n_words": 3, "n_skipped": 1, "n_boundaries": 3, "hits": 2}
    r = M.morph_score(toks, gold, include_single_token=True)
    assert r["score"] == 2 / 4
    # recall mode pools boundaries: 3 gold boundaries, 2 hit
    r = M.morph_score([[2, 5], [3]], [[2, 4], [3]], mode="recall")
    assert r["score"] == 2 / 3 and r["n_boundaries"] == 3
    with pytest.raises(ValueError, match="recall"):
        M.morph_score([[2]], [[2, 4]], mode="single")
    assert M.morph_boundaries(["un", "glück", "lich"]) == [2, 8]  # "ü" is two bytes


def test_morph_score_tokenizer_uses_byte_offsets(smol):
    gold = [("walking", ["walk", "ing"]), ("überall", ["über", "all"]), ("the", ["t", "he"])]
    res = M.morph_score_tokenizer(smol, gold, mode="single")
    hits = skipped = 0
    for w, ms in gold:  # independent: token end positions from the token bytes themselves
        ids = smol.encode(" " + w).ids
        ends, p = [], -1
        for i in ids:
            p += len(smol.token_bytes(i))
            ends.append(p)
        if len(ids) == 1:
            skipped += 1
            continue
        hits += M.morph_boundaries(ms)[0] in ends[:-1]
    assert res["n_skipped"] == skipped and res["hits"] == hits
    with pytest.raises(ValueError, match="spell"):
        M.morph_score_tokenizer(smol, [("walking", ["walk", "in"])])


# ------------------------------------------------------------------------------------------- TOK-6


def test_vocab_param_ratio_tiny_models(shared_tiny):
    for arch in ("llama", "gpt2"):  # untied and tied embeddings
        ad = shared_tiny(arch)
        m = ad.model
        emb = m.get_input_embeddings().weight
        out = m.get_output_embeddings()
        tied = out is None or out.weight.data_ptr() == emb.data_ptr()
        total = sum(p.numel() for p in m.parameters())  # parameters() already de-duplicates tied weights
        expect = emb.numel() * (1 if tied else 2) / total
        assert M.vocab_param_ratio(ad) == pytest.approx(expect, rel=1e-12)
        assert M.vocab_param_ratio(m) == M.vocab_param_ratio(ad)
    with pytest.raises(TypeError, match="HF model"):
        M.vocab_param_ratio(object())


def test_sentencepiece_byte_fallback_and_dummy_prefix():
    from tokensmith.tokenization.tokenizers import load_tokenizer
    from tokensmith.tokenization.view import TokenizerView

    try:
        view = TokenizerView(load_tokenizer("mistral-sp"))  # SentencePiece BPE, byte fallback, dummy prefix
    except ImportError as e:
        pytest.skip(str(e))
    texts = ["Hello world", "naïve 😀 中文 𠀀", "  lead", "ᚠᛇᚻ runes"]
    enc = M.encode_corpus(view, texts, progress=False)
    ref = view.encode_batch(texts)  # the dummy-prefix texts take the view's own path: identical offsets
    assert enc.offsets.tolist() == [list(o) for r in ref for o in r.offsets]
    m = M.corpus_metrics(enc)
    n_byte = sum(view.special_class(i) == "byte" for i in enc.ids.tolist())
    assert n_byte > 0 and m["byte_fallback_rate"] == n_byte / enc.ids.size
