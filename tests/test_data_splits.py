import json

import pytest

from commer.data.errors import DataError
from commer.data.lamp import load_lamp7
from commer.data.splits import (
    MAX_EXAMPLE_CHARS,
    SPLIT_FILE,
    SPLITS,
    SplitInfo,
    filter_by_length,
    recorded_split,
    split_users,
)
from commer.text import Example

pytest_plugins = ["data_fixtures"]


def test_length_filter_keeps_2900_drops_2901():
    base = Example("u", ["a" * 1000, "b" * 1000], "c" * 400, "d" * 500)
    over = Example("u", ["a" * 1000, "b" * 1000], "c" * 400, "d" * 501)
    kept, dropped = filter_by_length([base, over])
    assert MAX_EXAMPLE_CHARS == 2900
    assert kept == [base]
    assert dropped == 1


def test_split_is_disjoint_covering_and_sized():
    users = [f"user{i}" for i in range(100)]
    info = split_users(users, (0.8, 0.1, 0.1), seed=3)
    sets = [set(info.users[name]) for name in SPLITS]
    assert [len(s) for s in sets] == [80, 10, 10]
    assert set.union(*sets) == set(users)
    assert sum(len(s) for s in sets) == len(users)


def test_split_is_stable_across_runs_and_input_order():
    users = [f"user{i}" for i in range(20)]
    a = split_users(users, seed=0)
    b = split_users(reversed(users + users), seed=0)
    assert a == b
    # A snapshot: the split must not change between runs, machines or Python versions.
    assert a.users["test"] == ["user15", "user3"]
    assert a.users["validation"] == ["user12", "user19"]
    assert split_users(users, seed=1).users != a.users


def test_seven_personas_give_one_test_persona():
    info = split_users([f"p{i}" for i in range(7)], (0.8, 0.1, 0.1))
    assert {k: len(v) for k, v in info.users.items()} == {"train": 5, "validation": 1, "test": 1}


def test_bad_fractions_and_too_few_users():
    with pytest.raises(ValueError, match="summing to 1"):
        split_users(["a", "b"], (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="too few"):
        split_users(["a", "b"], (0.8, 0.1, 0.1))


def test_split_info_json_and_apply():
    info = split_users([f"u{i}" for i in range(10)], seed=0)
    record = json.loads(json.dumps(info.to_dict()))
    assert record["counts"] == {"train": 8, "validation": 1, "test": 1}
    assert record["users"]["test"] == info.users["test"]
    assert "users" not in info.to_dict(with_users=False)
    examples = [Example(f"u{i}") for i in range(10)]
    parts = info.apply(examples)
    assert [e.user_id for e in parts["test"]] == info.users["test"]
    assert info.split_of(info.users["validation"][0]) == "validation"
    assert SplitInfo.from_dict(record) == info


def test_a_checkpoint_finds_the_split_its_run_recorded(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    assert recorded_split(run / "best") is None
    info = split_users([f"u{i}" for i in range(10)], seed=3)
    (run / SPLIT_FILE).write_text(json.dumps(info.to_dict()))  # as training writes it, beside best/ and last/
    assert recorded_split(run / "best") == info == recorded_split(run)
    (run / SPLIT_FILE).write_text('{"seed": 3}')
    with pytest.raises(DataError, match="split.json is damaged"):
        recorded_split(run / "best")


def test_lamp7_users_split_disjointly(data_dir):
    examples = load_lamp7(data_dir, n_docs=0).examples
    info = split_users(e.user_id for e in examples)
    parts = info.apply(examples)
    users = {name: {e.user_id for e in part} for name, part in parts.items()}
    assert not users["train"] & users["test"]
    assert not users["train"] & users["validation"]
    assert not users["validation"] & users["test"]
    assert sum(map(len, parts.values())) == 1200
