from stair_search.vocabulary import Vocabulary, spell, unspell


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


def test_piece_words_name_the_query_word_each_searched_piece_stands_for():
    vocab = Vocabulary.load()
    for word in ("hamster", "poodle", "teapot"):  # split by the vocabulary, first piece a whole word
        ids = vocab.token_ids(word)
        assert len(ids) > 1 and vocab.whole_words[ids[0]]
    assert vocab.piece_words("a hamster and a Poodle, teapot; dog") == {
        vocab.tokens[vocab.token_ids(w)[0]]: w for w in ("hamster", "poodle", "teapot")}
    assert vocab.piece_words("ham and hamster") == {}  # the piece typed as a word stands for itself
    assert vocab.piece_words("hamster hammock") == {"ham": "hamster / hammock"}
    assert vocab.piece_words("dog cat") == {}
