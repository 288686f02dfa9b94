import json

import pytest
from typer.testing import CliRunner

from commer.data.cli import data_app
from commer.data.errors import DataError
from commer.data.lamp import TASK_PREFIXES, bm25_top, find_lamp_files, lamp_examples, load_lamp, load_lamp7

pytest_plugins = ["data_fixtures"]

PREFIX7 = TASK_PREFIXES["LaMP_7"]


def write_lamp(directory, questions, golds, stem="train", task="LaMP_7"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}_questions.json").write_text(json.dumps(questions))
    (directory / f"{stem}_outputs.json").write_text(
        json.dumps({"task": task, "golds": [{"id": i, "output": o} for i, o in golds.items()]})
    )


def question(qid, tweet, profile):
    return {
        "id": qid,
        "input": PREFIX7 + tweet,
        "profile": [{"id": f"{qid}_{k}", "text": t} for k, t in enumerate(profile)],
    }


@pytest.fixture(scope="module")
def lamp7(data_dir):
    return load_lamp7(data_dir, n_docs=2)


def test_lamp7_counts_match_the_files(lamp7, data_dir):
    assert len(lamp7.examples) == 1200
    assert len({e.user_id for e in lamp7.examples}) == 1200
    assert sum(lamp7.profile_sizes.values()) == 21406
    assert (min(lamp7.profile_sizes.values()), max(lamp7.profile_sizes.values())) == (9, 226)
    assert lamp7.skipped == {"empty_profile": 0}
    golds = json.loads((data_dir / "lamp7" / "LaMP_7_outputs.json").read_text())["golds"]
    assert {e.user_id: e.answer for e in lamp7.examples} == {g["id"]: g["output"] for g in golds}


def test_lamp7_examples_hold_top_bm25_profile_tweets(lamp7, data_dir):
    questions = {q["id"]: q for q in json.loads((data_dir / "lamp7" / "LaMP_7_questions.json").read_text())}
    for example in lamp7.examples[:50]:
        q = questions[example.user_id]
        tweets = [p["text"] for p in q["profile"]]
        assert example.instruction == q["input"]
        assert example.instruction.startswith(PREFIX7)
        assert example.documents == [tweets[i] for i in bm25_top(q["input"].removeprefix(PREFIX7), tweets, 2)]


def test_bm25_ranks_a_hand_made_profile():
    profile = ["the weather is nice today", "pizza with extra cheese tonight", "I ate cheese", "cats"]
    assert bm25_top("I love pizza with cheese", profile, 2) == [1, 2]
    assert bm25_top("quantum chromodynamics", profile, 2) == [0, 1]  # no overlap: profile order
    assert bm25_top("pizza", profile, 0) == []
    assert bm25_top("pizza", ["a", "the of"], 5) == [0, 1]  # nothing indexable: no crash


def test_lamp4_documents_and_user_id_field():
    questions = [
        {
            "id": "q1",
            "user_id": "author",
            "input": TASK_PREFIXES["LaMP_4"] + "Storm hits coast",
            "profile": [
                {"id": "a", "text": "Sunny days", "title": "Heat"},
                {"id": "b", "text": "A storm", "title": "Coast"},
            ],
        }
    ]
    loaded = lamp_examples(questions, {"q1": "Storm!"}, "LaMP-4", n_docs=1)
    (example,) = loaded.examples
    assert example.user_id == "author"
    assert example.documents == ["Text: A storm Title: Coast"]
    assert example.answer == "Storm!"


def test_full_download_layout_needs_a_split(tmp_path):
    write_lamp(tmp_path, [question("1", "hi there", ["hello there"])], {"1": "hey"}, stem="train")
    write_lamp(tmp_path, [question("2", "bye now", ["see you"])], {"2": "ciao"}, stem="dev")
    with pytest.raises(DataError, match="several question files"):
        find_lamp_files(tmp_path)
    assert [e.answer for e in load_lamp(tmp_path, split="dev").examples] == ["ciao"]
    assert [e.answer for e in load_lamp(tmp_path / "train_questions.json").examples] == ["hey"]


def test_missing_files_name_the_expected_path(tmp_path):
    with pytest.raises(DataError, match="no file matching"):
        load_lamp(tmp_path)
    (tmp_path / "x_questions.json").write_text("[]")
    with pytest.raises(DataError, match="x_outputs.json"):
        load_lamp(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_lamp7(tmp_path / "nowhere")


def test_malformed_json_names_file_and_line(tmp_path):
    write_lamp(tmp_path, [], {})
    (tmp_path / "train_questions.json").write_text('[\n  {"id": "1",\n  "input": oops}\n]')
    with pytest.raises(DataError, match=r"train_questions\.json:3:\d+: malformed JSON"):
        load_lamp(tmp_path)


def test_ids_without_gold_outputs_are_named(tmp_path):
    questions = [question(str(i), "x y", ["x z"]) for i in range(3)]
    write_lamp(tmp_path, questions, {"0": "a"})
    with pytest.raises(DataError, match="2 question id.*no gold output: 1, 2"):
        load_lamp(tmp_path)


def test_bad_profile_item_names_the_question(tmp_path):
    write_lamp(tmp_path, [{"id": "7", "input": "x", "profile": [{"id": "a"}]}], {"7": "y"})
    with pytest.raises(DataError, match=r"question \[0\] \(id 7\): profile item \[0\] lacks text field"):
        load_lamp(tmp_path)


def test_empty_profiles_are_skipped_and_counted(tmp_path):
    write_lamp(tmp_path, [question("1", "a b", []), question("2", "c d", ["c e"])], {"1": "x", "2": "y"})
    loaded = load_lamp(tmp_path)
    assert [e.user_id for e in loaded.examples] == ["2"]
    assert loaded.skipped == {"empty_profile": 1}


def test_stats_command_prints_counts(data_dir):
    result = CliRunner().invoke(data_app, ["stats", "lamp7", "--data-dir", str(data_dir), "--n-docs", "1"])
    assert result.exit_code == 0, result.output
    assert "users                              1200" in result.output
    assert "train=960  validation=120  test=120" in result.output
    assert "tokens per answer" in result.output


def test_stats_command_reports_data_errors(tmp_path):
    result = CliRunner().invoke(data_app, ["stats", "lamp7", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "lamp7" in result.output
