"""Emoji data set (built from small local fixture tarballs) and the synthetic compositional set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stair_search.data.emoji_packages import load_emoji
from stair_search.eval.datasets.emoji import (
    COLUMNS,
    SPLITS,
    EmojiDataset,
    build_emoji_dataset,
    caption_for,
    split_of,
    split_queries,
)
from stair_search.eval.datasets.synthetic import COLOURS, OPPOSITE, make_compositional, write_compositional
from stair_search.eval.metrics import load_qrels
from tests.emoji_fixture import make_fixture_tarballs

N_FIXTURE = 40  # 5 real faces + 35 private-use "fixture" emoji, so that every split gets some concepts


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory) -> dict[str, Path]:
    return make_fixture_tarballs(tmp_path_factory.mktemp("tarballs"), n=N_FIXTURE)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tarballs) -> EmojiDataset:
    root = tmp_path_factory.mktemp("emoji")
    return build_emoji_dataset(root / "set", cache=root / "cache", tarballs=tarballs)


def test_records_cover_every_image_with_the_contract_columns(built, tarballs, tmp_path):
    expected = load_emoji(("google", "twitter"), cache=tmp_path / "cache", tarballs=tarballs)
    table = pq.read_table(built.root / "records.parquet")
    assert tuple(table.column_names) == COLUMNS
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [e.id for e in expected]
    assert built.summary["images"] == len(expected)
    assert "google/1f47d" not in {r["id"] for r in rows} and "twitter/1f47d" in {r["id"] for r in rows}

    grinning = next(r for r in rows if r["id"] == "google/1f600")
    assert (grinning["concept"], grinning["label"], grinning["tags"]) == ("1F600", "grinning face",
                                                                          ["face", "grin", "grinning"])
    assert grinning["caption"] == "grinning face, face, grin, grinning"
    assert grinning["group"] == "Smileys & Emotion"


def test_images_are_64px_rgb_pngs_at_absolute_paths(built):
    for record in built.records():
        path = Path(record["image_path"])
        assert path.is_absolute() and path.is_relative_to(built.root)
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    # Transparent corners of the source PNG become white, not black.
    with Image.open(built.records(styles=["google"])[0]["image_path"]) as image:
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_every_style_of_a_concept_is_in_one_split(built):
    splits_of_concept: dict[str, set[str]] = {}
    for record in built.records():
        splits_of_concept.setdefault(record["concept"], set()).add(record["split"])
        assert record["split"] == split_of(record["concept"], seed=0)
    assert all(len(splits) == 1 for splits in splits_of_concept.values())
    assert {s for splits in splits_of_concept.values() for s in splits} == set(SPLITS)
    train = {r["concept"] for r in built.records("train")}
    assert not train & {r["concept"] for r in built.records("test")}


def test_splits_follow_the_seed_and_the_fractions():
    concepts = [f"{i:05X}" for i in range(20_000)]
    counts = Counter(split_of(c, seed=0) for c in concepts)
    for split, fraction in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
        assert counts[split] / len(concepts) == pytest.approx(fraction, abs=0.015)
    assert [split_of(c, seed=0) for c in concepts[:50]] == [split_of(c, seed=0) for c in concepts[:50]]
    assert [split_of(c, seed=1) for c in concepts[:50]] != [split_of(c, seed=0) for c in concepts[:50]]
    assert {split_of(c, 0, (0.0, 0.0, 1.0)) for c in concepts[:50]} == {"test"}


def test_label_queries_are_known_item_per_style(built):
    for split in SPLITS:
        records = built.records(split)
        queries = built.queries(split, "label")
        assert sorted(queries.values()) == sorted({r["label"] for r in records})
        label_of = {r["id"]: r["label"] for r in records}
        for style in ("google", "twitter"):
            qrels = built.qrels(split, "label", style)
            for qid, judged in qrels.items():
                (doc,) = judged  # exactly one relevant image per style
                assert doc.startswith(f"{style}/") and label_of[doc] == queries[qid]
            assert len(qrels) == sum(r["style"] == style for r in records)
        both = built.qrels(split, "label", "all")
        assert sum(map(len, both.values())) == len(records)


def test_twitter_only_concept_has_no_google_judgement(built):
    alien = next(r for r in built.records() if r["concept"] == "1F47D")
    qid = next(q for q, text in built.queries(alien["split"], "label").items() if text == alien["label"])
    assert qid not in built.qrels(alien["split"], "label", "google")
    assert built.qrels(alien["split"], "label", "twitter")[qid] == {"twitter/1f47d": 1}


def test_tag_queries_judge_every_emoji_with_the_tag(built):
    for split in SPLITS:
        records = built.records(split)
        qrels = built.qrels(split, "tag", "all")
        for qid, tag in built.queries(split, "tag").items():
            carriers = {r["id"] for r in records if tag in r["tags"]}
            assert set(qrels[qid]) == carriers
            assert 3 <= len({r["concept"] for r in records if tag in r["tags"]}) <= 50
    # The 35 "fixture" emoji share one tag; the training split holds enough of them to make it a query.
    assert "fixture" in built.queries("train", "tag").values()


def _record(concept: str, label: str, tags: list[str], style: str = "google") -> dict:
    return {"id": f"{style}/{concept.lower()}", "style": style, "concept": concept, "split": "test",
            "label": label, "tags": tags}


def test_tag_query_rules_on_hand_made_records():
    records = [_record("A1", "cat", ["cat", "pet"]), _record("A2", "cat face", ["cat", "pet"]),
               _record("A3", "lion", ["cat", "pet", "rare"]), _record("A4", "dog", ["pet", "rare"]),
               _record("A4", "dog", ["pet", "rare"], style="twitter")]
    records += [_record(f"B{i}", f"thing {i}", ["common"]) for i in range(51)]
    query_sets = split_queries(records, "test", ["google", "twitter"])
    tags = query_sets["tag"]
    # pet: 4 concepts -> kept; cat: 3 concepts but the same text as the label query "cat" -> dropped;
    # rare: 2 concepts -> dropped; common: 51 concepts -> dropped.
    assert list(tags.queries.values()) == ["pet"]
    assert tags.dropped == {"fewer than 3 concepts": 1, "more than 50 concepts": 1, "same text as a label query": 1}
    (qid,) = tags.queries
    assert set(tags.qrels["all"][qid]) == {"google/a1", "google/a2", "google/a3", "google/a4", "twitter/a4"}
    assert set(tags.qrels["twitter"][qid]) == {"twitter/a4"}
    assert len(query_sets["label"].queries) == 4 + 51


def test_caption_format():
    assert caption_for("grinning face", ["face", "grin"]) == "grinning face, face, grin"
    assert caption_for("ghost", ["creature", "Ghost", "creature"]) == "ghost, creature"
    assert caption_for("robot face", []) == "robot face"


def test_dataset_api_and_errors(built, tmp_path):
    pairs = built.pairs("train", ["twitter"])
    assert pairs and all(Path(path).is_file() and caption for path, caption in pairs)
    assert len(pairs) == len(built.records("train", ["twitter"]))
    assert built.qrels_path("test", "tag", "google") == built.root / "qrels" / "test.tag.google.txt"
    split_file = built.write_split("test", ["google"])
    assert split_file.name == "test.google.parquet"
    assert pq.read_table(split_file).to_pylist() == built.records("test", ["google"])
    assert load_qrels(built.qrels_path("val", "label")) == built.qrels("val", "label", "all")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        built.records("dev")
    with pytest.raises(ValueError, match="not 'apple'"):
        built.qrels_path("test", "label", "apple")
    with pytest.raises(FileNotFoundError, match="stair-search dataset emoji"):
        EmojiDataset(tmp_path)
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="is not an emoji data set"):
        build_emoji_dataset(tmp_path, cache=tmp_path / "cache")


def test_rebuild_replaces_a_data_set_and_keeps_splits(built, tarballs, tmp_path):
    build_emoji_dataset(tmp_path / "set", cache=tmp_path / "cache", tarballs=tarballs)
    again = build_emoji_dataset(tmp_path / "set", cache=tmp_path / "cache", tarballs=tarballs, styles=["google"])
    first = {r["id"]: r["split"] for r in built.records(styles=["google"])}
    assert {r["id"]: r["split"] for r in again.records()} == first
    assert not (again.root / "qrels" / "test.label.twitter.txt").exists()


# ------------------------------------------------------------------------------------------------------------
# Synthetic compositional set


def _centroid(image: Image.Image, colour: str) -> np.ndarray:
    """Mean (x, y) of the pixels painted exactly in ``colour``."""
    pixels = np.asarray(image)
    ys, xs = np.nonzero(np.all(pixels == COLOURS[colour], axis=-1))
    assert len(xs) > 20, f"no {colour} shape drawn"
    return np.array([xs.mean(), ys.mean()])


def _where(caption: str) -> tuple[str, str, str]:
    """Subject colour, relation, object colour of a caption like 'a red circle left of an orange square'."""
    words = caption.split()
    relation = " ".join(words[3:5]) if words[4] == "of" else words[3]
    return words[1], relation, words[-2]


def _holds(image: Image.Image, caption: str) -> bool:
    """Whether the image shows the caption's subject colour on the named side of its object colour."""
    subject, relation, obj = _where(caption)
    dx, dy = _centroid(image, subject) - _centroid(image, obj)
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[relation]


def test_compositional_examples_are_true_and_their_negatives_false():
    examples = make_compositional(24, seed=3)
    assert Counter(e.kind for e in examples) == {"attribute": 12, "relation": 12}
    for e in examples:
        assert e.image.mode == "RGB" and e.image.size == (64, 64)
        assert _holds(e.image, e.caption) and _holds(e.negative_image, e.negative_caption)
        subject, relation, obj = _where(e.caption)
        if e.kind == "relation":
            assert e.negative_caption == e.caption.replace(relation, OPPOSITE[relation])
            assert not _holds(e.negative_image, e.caption)
        else:
            # The colours traded shapes: the caption's subject colour now sits where its object colour was.
            assert _where(e.negative_caption) == (obj, relation, subject)
            assert np.allclose(_centroid(e.negative_image, subject), _centroid(e.image, obj), atol=3)
        assert e.caption != e.negative_caption


def test_compositional_is_deterministic_for_a_seed():
    a, b, c = make_compositional(6, seed=5), make_compositional(6, seed=5), make_compositional(6, seed=6)
    assert [x.caption for x in a] == [x.caption for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [x.caption for x in a] != [x.caption for x in c]
    with pytest.raises(ValueError, match="size must be at least"):
        make_compositional(1, size=8)


def test_write_compositional(tmp_path):
    path = write_compositional(tmp_path / "comp", n=4, seed=0)
    rows = pq.read_table(path).to_pylist()
    assert [r["kind"] for r in rows] == ["attribute", "relation", "attribute", "relation"]
    assert [r["caption"] for r in rows] == [e.caption for e in make_compositional(4, seed=0)]
    for row in rows:
        for key in ("image_path", "negative_image_path"):
            with Image.open(row[key]) as image:
                assert image.size == (64, 64)
        assert _holds(Image.open(row["image_path"]).convert("RGB"), row["caption"])


def test_cli_builds_both_data_sets(tarballs, tmp_path):
    from typer.testing import CliRunner

    from stair_search.cli import app

    args = ["dataset", "emoji", "--out", str(tmp_path / "emoji"), "--cache", str(tmp_path / "cache"),
            "--styles", "twitter", *[f"--tarball={key}={path}" for key, path in tarballs.items()]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert EmojiDataset(tmp_path / "emoji").styles == ("twitter",)
    assert "label and" in result.output and "test:" in result.output

    result = CliRunner().invoke(app, ["dataset", "compositional", "--out", str(tmp_path / "comp"), "-n", "2"])
    assert result.exit_code == 0, result.output
    assert len(pq.read_table(tmp_path / "comp" / "compositional.parquet")) == 2

    result = CliRunner().invoke(app, ["dataset", "emoji", "--out", str(tmp_path / "x"), "--tarball", "google"])
    assert result.exit_code != 0 and "KEY=PATH" in result.output
