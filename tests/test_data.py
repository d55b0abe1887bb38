"""CoNLL reader, tag schemes, vocabularies and batching."""
import random
from array import array

import pytest
import torch

from fastner.data import (
    DataFormatError, Sentence, Vocab, bucket_batches, convert_tags, detect_scheme, encode_sentences,
    make_batch, normalize_digits, read_conll, tags_to_spans, write_conll,
)
from fastner.data.conll import split_columns
from fastner.data.schemes import strict_spans


def write(tmp_path, text, name="data.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reader_columns_docstart_and_blank_lines(tmp_path):
    path = write(tmp_path, "-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\n\n"
                           "Peter NNP I-NP I-PER\n-DOCSTART- -X- O O\nBlackburn NNP I-NP I-PER\n")
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects"], ["Peter"], ["Blackburn"]]
    assert sentences[0].tags == ["I-ORG", "O"]
    pos = read_conll(path, word_column=0, tag_column=1)
    assert pos[0].tags == ["NNP", "VBZ"]
    tokens_only = read_conll(path, tag_column=None)
    assert tokens_only[0].tags == [] and tokens_only[0].tokens == ["EU", "rejects"]
    assert len(read_conll(path, max_sentences=2)) == 2


def test_columns_are_separated_by_spaces_and_tabs_only(tmp_path):
    """As conlleval reads them: a no-break space (or another unicode space) inside a token was
    taken for a column separator, and the line read as one more column (an error, or with
    --tag-column counted from the start a wrong tag)."""
    path = write(tmp_path, "10\u00a0000 CD I-NP O\nMr.\u2009Smith\tNNP  I-NP\t I-PER \n\u3000 X O O\n\f\n"
                           "\x1cEU NNP I-NP I-ORG\n")
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["10\u00a0000", "Mr.\u2009Smith", "\u3000"], ["\x1cEU"]]
    assert [s.tags for s in sentences] == [["O", "I-PER", "O"], ["I-ORG"]]
    assert split_columns("a\u00a0b \t c\r\n") == ["a\u00a0b", "c"]
    assert split_columns(" \t\r\n") == []


def test_reader_errors_name_file_and_line(tmp_path):
    path = write(tmp_path, "EU NNP I-ORG\nrejects O\n")
    with pytest.raises(DataFormatError, match=r"data\.txt:2: expected 3 columns"):
        read_conll(path)
    single = write(tmp_path, "EU\nrejects\n", "single.txt")
    with pytest.raises(DataFormatError, match=r"single\.txt:1: expected a token and a tag"):
        read_conll(single)
    assert read_conll(single, tag_column=None)[0].tokens == ["EU", "rejects"]
    with pytest.raises(DataFormatError, match="tag_column=5"):
        read_conll(path, tag_column=5)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_conll(tmp_path / "missing.txt")


def test_write_then_read_round_trip(tmp_path):
    sentences = [Sentence(["a", "b"], ["B-X", "O"]), Sentence(["c"], ["S-Y"])]
    write_conll(tmp_path / "out.txt", sentences)
    assert read_conll(tmp_path / "out.txt") == sentences


IOB1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG", "O", "I-MISC"]
IOB2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG", "O", "B-MISC"]
BIOES = ["B-PER", "E-PER", "S-PER", "O", "S-LOC", "B-ORG", "E-ORG", "O", "S-MISC"]


def test_scheme_conversions_by_hand():
    spans = [(0, 2, "PER"), (2, 3, "PER"), (4, 5, "LOC"), (5, 7, "ORG"), (8, 9, "MISC")]
    for tags in (IOB1, IOB2, BIOES):
        assert tags_to_spans(tags) == spans
    assert convert_tags(IOB1, "IOB2") == IOB2
    assert convert_tags(IOB2, "BIOES") == BIOES
    assert convert_tags(BIOES, "IOB1") == IOB1
    assert convert_tags(["U-X", "B-Y", "L-Y"], "BIOUL") == ["S-X", "B-Y", "E-Y"]
    assert detect_scheme([IOB1]) == "IOB1" and detect_scheme([IOB2]) == "IOB2" and detect_scheme([BIOES]) == "BIOES"


def test_lenient_decoding_of_ill_formed_sequences():
    # I- opening a chunk, E- without B-, a type change inside a chunk
    assert tags_to_spans(["O", "I-X", "E-X", "E-X"]) == [(1, 3, "X"), (3, 4, "X")]
    assert tags_to_spans(["B-X", "I-Y"]) == [(0, 1, "X"), (1, 2, "Y")]
    assert strict_spans(["O", "I-X", "E-X"], "BIOES") == []
    with pytest.raises(ValueError, match="malformed tag"):
        tags_to_spans(["B"])
    with pytest.raises(ValueError, match="scheme"):
        convert_tags(["O"], "IOE2")


def test_conll_round_trips_through_every_scheme(conll_dir):
    sentences = read_conll(conll_dir / "eng.train", max_sentences=2000)
    assert detect_scheme(s.tags for s in sentences) == "IOB1"
    for s in sentences:
        for scheme in ("IOB2", "BIOES"):
            assert convert_tags(convert_tags(s.tags, scheme), "IOB1") == s.tags


def test_vocab_lookup_and_json_round_trip():
    vocab = Vocab.from_counts({"the": 3, "Paris": 1, "paris": 2})
    assert vocab.itos[:2] == ["<pad>", "<unk>"] and vocab.itos[2] == "the"
    assert vocab.lookup("PARIS") == vocab["paris"]  # lowercase fallback
    assert vocab.lookup("nowhere") == vocab.unk_id
    again = Vocab.from_json(vocab.to_json())
    assert again.itos == vocab.itos and again.stoi == vocab.stoi
    with pytest.raises(ValueError, match="specials"):
        Vocab.from_json({"specials": ["<pad>"], "itos": ["x"]})
    tags = Vocab(["O", "B-X"], specials=())
    with pytest.raises(KeyError):
        tags.lookup("I-Y")


def test_normalize_digits():
    assert normalize_digits("1996-08-22") == "0000-00-00"
    assert normalize_digits("abc") == "abc"


def test_batches_pad_and_mask():
    sentences = [Sentence(["a", "bb"], ["O", "S-X"]), Sentence(["ccc"], ["O"])]
    words = Vocab(["a", "bb", "ccc"])
    chars = Vocab(list("abc"))
    tags = Vocab(["O", "S-X"], specials=())
    encoded = encode_sentences(sentences, words, chars, tags)
    batch = make_batch(encoded, [0, 1], words.pad_id, chars.pad_id)
    assert batch.words.tolist() == [[words["a"], words["bb"]], [words["ccc"], 0]]
    assert batch.chars.shape == (2, 2, 3)
    assert batch.chars[1, 1].tolist() == [0, 0, 0]
    assert batch.mask.tolist() == [[True, True], [True, False]]
    assert batch.lengths.tolist() == [2, 1]
    assert batch.tags.tolist() == [[0, 1], [0, 0]]
    with pytest.raises(ValueError, match="tag 'B-Y'"):
        encode_sentences([Sentence(["a"], ["B-Y"])], words, chars, tags)
    empty = encode_sentences([Sentence([])], words, chars)
    with pytest.raises(ValueError, match="empty sentences cannot be batched"):
        make_batch(encoded + empty, [0, 2])
    with pytest.raises(ValueError, match="at least one sentence"):
        make_batch(encoded, [])


def test_batch_chars_are_padded_per_word_and_per_sentence():
    # the char ids are built as one flat array: every word padded to the longest word, every
    # sentence to the longest sentence, in the order `index` asks for, with the given pad id
    sentences = [Sentence(["ab", "c", "abcab"]), Sentence(["ca"])]
    words = Vocab(["ab", "c", "abcab", "ca"])
    chars = Vocab(list("abc"))
    encoded = encode_sentences(sentences, words, chars)
    batch = make_batch(encoded, [1, 0], words.pad_id, char_pad=7)
    a, b, c = chars["a"], chars["b"], chars["c"]
    assert batch.chars.dtype == torch.int64 and batch.chars.shape == (2, 3, 5)
    assert batch.chars.tolist() == [
        [[c, a, 7, 7, 7], [7] * 5, [7] * 5],
        [[a, b, 7, 7, 7], [c, 7, 7, 7, 7], [a, b, c, a, b]],
    ]
    again = make_batch(encoded, [0], words.pad_id, char_pad=7)  # a later batch shares no memory
    again.chars.fill_(0)
    assert batch.chars[1, 2].tolist() == [a, b, c, a, b]


def _random_text(rng: random.Random, length: int) -> str:
    # ASCII, both cases, accents, a dotted capital I (its lowercase form is two characters),
    # CJK and a character past the BMP
    alphabet = "abcABC019-.,'" + "éÉüÜß" + "İ" + "中文" + "\U0001F600"
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_id_codes_are_the_lookup_of_each_character():
    rng = random.Random(5)
    chars = Vocab(list("abcé019-") + ["i̇"])  # "i̇" = "İ".lower(): two characters, one entry
    for _ in range(300):
        text = _random_text(rng, rng.randint(0, 30))
        assert [ord(code) for code in chars.id_codes(text)] == [chars.lookup(c) for c in text]
    assert [ord(code) for code in chars.id_codes("İAÉ")] == [chars["i̇"], chars["a"], chars["é"]]
    assert [ord(code) for code in chars.id_codes("z")] == [chars.unk_id]  # remembered as unknown
    chars.add("z")  # the remembered table is dropped: a new entry's character gets its own id
    assert [ord(code) for code in chars.id_codes("z")] == [chars["z"]]
    # the table stops growing at its cap; characters past it still get their ids
    from fastner.data.vocab import _CodeTable
    many = "".join(chr(0x4E00 + i) for i in range(_CodeTable.MAX_ENTRIES + 50)) + "ab"
    assert [ord(code) for code in chars.id_codes(many)] == [chars.lookup(c) for c in many]
    assert len(chars._code_table) == _CodeTable.MAX_ENTRIES
    # without an unknown entry an unseen character is an error, not its own code point
    closed = Vocab(list("ab"), specials=("<pad>",))
    assert [ord(code) for code in closed.id_codes("ab")] == [closed["a"], closed["b"]]
    with pytest.raises(ValueError, match="'x' is not in a vocabulary without an unknown entry"):
        closed.id_codes("abx")


def test_batch_chars_equal_the_lookup_of_each_character():
    # random sentences (words past MAX_WORD_CHARS, empty words, characters outside the
    # vocabulary and outside the BMP) against the per-character lookup, padded by hand; and a
    # vocabulary of 60,000 entries, whose ids run through the surrogate range 0xD800-0xDFFF
    from fastner.data.batching import MAX_WORD_CHARS
    rng = random.Random(6)
    small = Vocab(list("abcABCé019"))
    large = Vocab([chr(0x4E00 + i) for i in range(60_000)] + list("abcABCé019"))
    assert large["a"] > 0xDFFF and large[chr(0x4E00 + 0xD800)] == 0xD802
    for chars in (small, large):
        sentences = []
        for _ in range(12):
            tokens = [_random_text(rng, rng.choice([0, 1, 3, 8, MAX_WORD_CHARS + 5])) for _ in range(rng.randint(1, 9))]
            if chars is large:
                tokens.append("".join(chr(0x4E00 + i) for i in range(0xD7FE, 0xD806)))
            sentences.append(Sentence(tokens))
        words = Vocab()
        encoded = encode_sentences(sentences, words, chars)
        index = list(range(len(sentences)))
        rng.shuffle(index)
        batch = make_batch(encoded, index, words.pad_id, char_pad=-3)
        T = max(len(sentences[i].tokens) for i in index)
        C = max(1, max(min(len(t), MAX_WORD_CHARS) for s in sentences for t in s.tokens))
        expected = [[[chars.lookup(c) for c in t[:MAX_WORD_CHARS]] for t in sentences[i].tokens] for i in index]
        expected = [[ids + [-3] * (C - len(ids)) for ids in row] + [[-3] * C] * (T - len(row)) for row in expected]
        assert batch.chars.dtype == torch.int64
        assert batch.chars.tolist() == expected


def test_bucket_batches_cover_everything_and_are_seeded():
    lengths = [((i * 37) % 50) + 1 for i in range(103)]
    batches = bucket_batches(lengths, 10, shuffle=True, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 10 for b in batches)
    # bucketed: within a batch, lengths are close
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) <= 6
    assert batches == bucket_batches(lengths, 10, shuffle=True, rng=random.Random(1))
    assert batches != bucket_batches(lengths, 10, shuffle=True, rng=random.Random(2))
    with pytest.raises(ValueError, match="batch_size"):
        bucket_batches(lengths, 0, shuffle=False)


def test_encoding_with_digit_normalisation_and_unknown_words():
    words = Vocab(["0000", "paris"])
    chars = Vocab(list("0123456789"))
    encoded = encode_sentences([Sentence(["1996", "Paris", "Lyon"])], words, chars, digits_to_zero=True)[0]
    assert encoded.words == [words["0000"], words["paris"], words.unk_id]
    # chars keep the digits (int32 ids, native byte order)
    assert array("i", encoded.chars[0]).tolist() == [chars["1"], chars["9"], chars["9"], chars["6"]]
    assert encoded.tags is None


def test_concatenated_files_keep_their_docstart(tmp_path):
    # `cat a.conll b.conll` where b was saved with a byte-order mark: b's '-DOCSTART-' line was
    # read as a token '\ufeff-DOCSTART-' of a sentence
    from fastner.data.conll import read_conll

    first = "-DOCSTART- -X- O O\n\nAnna NNP B-NP B-PER\n\n"
    second = "\ufeff-DOCSTART- -X- O O\n\nOslo NNP B-NP B-LOC\n"
    path = tmp_path / "both.conll"
    path.write_bytes((first + second).encode("utf-8"))
    assert [s.tokens for s in read_conll(str(path))] == [["Anna"], ["Oslo"]]


def test_token_encoder_remembers_tokens_and_answers_as_a_fresh_lookup(monkeypatch):
    # A tagger's TokenEncoder (fastner.inference.Analyser keeps one across calls) must give every
    # token the ids a fresh lookup gives: on first sight, from its memory, past its cap (tokens
    # then computed each time), and after the vocabularies grow (Vocab.add empties the memory).
    from array import array as int_array

    from fastner.data.batching import TokenEncoder, encode_with
    rng = random.Random(11)
    words = Vocab(["paris", "0000", "Acme"])
    chars = Vocab(list("abcdefghijklmnopqrstuvwxyzPA0"))
    pretrained = {"lyon": 0, "berlin": 1}
    pool = ["Paris", "paris", "Lyon", "LYON", "Acme", "acme", "1996", "Berlin", "zz", "é", ""] + \
           [_random_text(rng, rng.randint(1, 45)) for _ in range(30)]
    monkeypatch.setattr(TokenEncoder, "MAX_ENTRIES", 12)
    encoder = TokenEncoder(words, chars, True, pretrained)

    def fresh(sentences):
        return encode_sentences(sentences, words, chars, digits_to_zero=True, pretrained=pretrained)

    for round_ in range(4):
        sentences = [Sentence([rng.choice(pool) for _ in range(rng.randint(1, 12))]) for _ in range(20)]
        got, want = encode_with(encoder, sentences), fresh(sentences)
        assert [(e.words, e.chars) for e in got] == [(e.words, e.chars) for e in want], round_
        assert len(encoder._known) <= TokenEncoder.MAX_ENTRIES
    # "zz" is unknown, then the vocabularies grow: the remembered answer must not outlive them
    before = encode_with(encoder, [Sentence(["zz", "Ωmega"])])[0]
    assert before.words[0] == words.unk_id
    words.add("zz")
    chars.add("Ω")
    after = encode_with(encoder, [Sentence(["zz", "Ωmega"])])[0]
    assert after.words[0] == words["zz"]
    assert int_array("i", after.chars[1]).tolist()[0] == chars["Ω"]
    assert (after.words, after.chars) == (lambda e: (e.words, e.chars))(fresh([Sentence(["zz", "Ωmega"])])[0])
