"""The quickstart's verdict says only what its numbers support."""

import pytest

from commer.quickstart import _verdict, quickstart


def _ppl(own, other, none):
    return {"own documents": own, "another user's documents": other, "no documents": none}


def test_verdict_follows_the_numbers():
    assert _verdict(_ppl(40.0, 44.0, 44.0))[0].startswith("Documents help")
    assert "carries something personal" in _verdict(_ppl(40.0, 44.0, 44.0))[1]
    assert _verdict(_ppl(44.2, 44.2, 43.7))[0].startswith("Documents HURT")
    assert _verdict(_ppl(44.0, 44.1, 44.2))[0].startswith("Documents make no clear difference")
    assert "no personal signal" in _verdict(_ppl(44.0, 44.1, 44.2))[1]


def test_an_unknown_task_is_named_before_any_work():
    with pytest.raises(ValueError, match="'lamp7' or 'recall', got 'news'"):
        quickstart(task="news", backbone_spec="no-such-backbone")
