import json
from collections import Counter

import pytest

from commer.data.errors import DataError
from commer.data.lamp import lamp_examples, load_lamp
from commer.data.news import NEWS_FILE, build_news_lamp, write_news_lamp

pytest_plugins = ["data_fixtures"]


@pytest.fixture(scope="module")
def records(data_dir):
    lines = (data_dir / NEWS_FILE).read_text().splitlines()
    return {f"news-{k}": json.loads(line) for k, line in enumerate(lines, start=1)}


@pytest.fixture(scope="module")
def news(data_dir):
    return build_news_lamp(data_dir)


def test_counts_match_the_file(news, records):
    assert news.records == len(records) == 11015
    assert len({q["user_id"] for q in news.questions}) == 97
    authors = Counter(r["authors"] for r in records.values())
    assert len([a for a, n in authors.items() if n >= 10]) == 97
    accounted = len(news.questions) + sum(news.skipped.values())
    assert accounted == 11015
    assert news.skipped["no_earlier_profile"] > 0


def test_no_profile_item_is_from_the_target_date_or_later(news, records):
    for q in news.questions:
        target = records[q["id"]]
        assert q["profile"]
        assert all(item["date"] < target["date"] for item in q["profile"])
        assert all(records[item["id"]]["authors"] == q["user_id"] for item in q["profile"])


def test_profile_is_all_earlier_records_of_the_author(news, records):
    by_author = Counter()
    for q in news.questions[:300]:
        target = records[q["id"]]
        earlier = {k for k, r in records.items() if r["authors"] == q["user_id"] and r["date"] < target["date"]}
        assert {item["id"] for item in q["profile"]} == earlier
        by_author[q["user_id"]] += 1
    assert len(by_author) > 1


def test_questions_read_as_lamp4_examples(news, records):
    loaded = lamp_examples(news.questions[:100], news.golds, "LaMP_4", n_docs=4)
    for example, q in zip(loaded.examples, news.questions[:100], strict=True):
        target = records[q["id"]]
        assert example.user_id == target["authors"]
        assert example.instruction == "Generate a headline for the following article: " + target["short_description"]
        assert example.answer == target["headline"]
        assert 1 <= len(example.documents) <= 4
        allowed = {f"Text: {i['text']} Title: {i['title']}" for i in q["profile"]}
        assert set(example.documents) <= allowed


def make_news_dir(tmp_path, rows):
    path = tmp_path / NEWS_FILE
    path.parent.mkdir(parents=True)
    keys = ("authors", "date", "headline", "short_description")
    path.write_text("".join(json.dumps(dict(zip(keys, row, strict=True)) | {"link": ""}) + "\n" for row in rows))
    return tmp_path


def test_skips_are_counted_and_same_day_records_excluded(tmp_path):
    data = make_news_dir(
        tmp_path,
        [
            ("Ann", "2020-01-01", "First", "rain falls"),
            ("Ann", "2020-01-01", "Second", "rain again"),
            ("Ann", "2020-01-02", "Third", "more rain"),
            ("", "2020-01-03", "Anon", "no author"),
            ("Ann", "2020-01-04", "Empty", ""),
            ("Bob", "2020-01-01", "Solo", "one record"),
        ],
    )
    news = build_news_lamp(data, min_records=3)
    assert news.skipped == {
        "empty_author": 1,
        "empty_description": 1,
        "author_below_min_records": 1,
        "no_earlier_profile": 2,
    }
    (q,) = news.questions
    assert [i["title"] for i in q["profile"]] == ["First", "Second"]

    written = write_news_lamp(news, tmp_path / "lamp4")
    from_files = load_lamp(written[0], n_docs=1)
    in_memory = lamp_examples(news.questions, news.golds, "LaMP_4", n_docs=1)
    assert from_files.examples == in_memory.examples
    assert from_files.examples[0].documents == ["Text: rain falls Title: First"]


def test_malformed_line_and_missing_file_are_named(tmp_path):
    with pytest.raises(DataError, match="huffpost_news.jsonl"):
        build_news_lamp(tmp_path)
    data = make_news_dir(tmp_path, [("Ann", "2020-01-01", "T", "d")])
    with open(data / NEWS_FILE, "a") as f:
        f.write('{"authors": "Ann", broken\n')
    with pytest.raises(DataError, match=r"huffpost_news\.jsonl:2:\d+: malformed JSON"):
        build_news_lamp(data)
