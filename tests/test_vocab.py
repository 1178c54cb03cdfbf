from stair_search.models.vocab import Vocabulary, spell, unspell


def test_every_token_spelling_round_trips_without_whitespace():
    vocab = Vocabulary.load()
    assert len(vocab) == 30522
    for token in vocab.tokens:
        term = spell(token)
        assert unspell(term) == token
        assert not any(ch.isspace() for ch in term)
        assert term.isascii()


def test_spelling_keeps_word_pieces_readable_and_escapes_specials():
    assert spell("##ing") == "##ing"
    assert spell("dog") == "dog"
    assert spell("[UNK]") == "%5BUNK%5D"
    assert spell("%") == "%25"


def test_special_and_unused_tokens_cannot_be_emitted():
    vocab = Vocabulary.load()
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused7]"):
        assert not vocab.emittable[vocab.index[token]]
    assert vocab.emittable[vocab.index["dog"]] and vocab.emittable[vocab.index["##ing"]]


def test_token_ids_are_word_pieces_of_the_text():
    vocab = Vocabulary.load()
    tokens = [vocab.tokens[i] for i in vocab.token_ids("Running dogs")]
    assert tokens == ["running", "dogs"]
    assert vocab.tokens[vocab.token_ids("snowboarding")[-1]].startswith("##")


def test_embedding_matrix_matches_vocabulary():
    vocab = Vocabulary.load()
    matrix = vocab.embedding_matrix()
    assert matrix.shape == (30522, 384)
    assert len(vocab.sha256) == 64
