"""Mean merge and the O(1) ProfileState."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commer.merge import ProfileState, dense_scores, merge_batch, stack_profiles, top_k_indices, top_k_profile

K, D = 3, 5


def test_mean_merge_is_order_invariant():
    g = torch.Generator().manual_seed(0)
    comps = torch.randn(6, K, D, generator=g)
    owner = torch.tensor([0, 1, 0, 2, 0, 1])
    prefix, mask = merge_batch(comps, owner, 4)
    perm = torch.randperm(6, generator=g)
    prefix_p, mask_p = merge_batch(comps[perm], owner[perm], 4)
    torch.testing.assert_close(prefix, prefix_p, atol=1e-6, rtol=0)
    assert torch.equal(mask, mask_p)
    torch.testing.assert_close(prefix[0], comps[[0, 2, 4]].mean(0))
    assert mask.all(1).tolist() == [True, True, True, False]  # user 3 owns nothing


def test_concat_merge_keeps_each_users_documents_in_order():
    comps = torch.arange(4 * K * D, dtype=torch.float32).reshape(4, K, D)
    owner = torch.tensor([1, 0, 1, 1])
    prefix, mask = merge_batch(comps, owner, 2, "concat")
    assert prefix.shape == (2, 3 * K, D)
    torch.testing.assert_close(prefix[1], comps[[0, 2, 3]].reshape(3 * K, D))
    torch.testing.assert_close(prefix[0, :K], comps[1])
    assert mask.sum(1).tolist() == [K, 3 * K]


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="'median'"):
        merge_batch(torch.zeros(1, K, D), torch.zeros(1, dtype=torch.long), 1, "median")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), min_size=1, max_size=40), st.integers(0, 2**16))
def test_profile_state_equals_recomputed_mean(ops, seed):
    """After any sequence of adds and removes, the O(1) state equals the mean of the documents still in it."""
    pool = torch.randn(8, K, D, generator=torch.Generator().manual_seed(seed)) * 10
    state, present = ProfileState(K, D), []
    for is_add, i in ops:
        if is_add or i not in present:
            state.add(pool[i])
            present.append(i)
        else:
            state.remove(pool[i])
            present.remove(i)
    assert state.count == len(present)
    if present:
        expected = pool.double()[present].mean(0)
        torch.testing.assert_close(state.mean(torch.float64), expected, atol=1e-6, rtol=0)
    else:
        assert state.mean() is None
    restored = ProfileState.from_bytes(state.to_bytes())
    assert restored.count == state.count and torch.equal(restored.sum, state.sum)


def test_profile_state_errors():
    state = ProfileState(K, D)
    with pytest.raises(ValueError, match="empty profile"):
        state.remove(torch.zeros(K, D))
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        state.add(torch.zeros(2, D))
    with pytest.raises(ValueError, match="not a serialized ProfileState"):
        ProfileState.from_bytes(b"nonsense" * 10)


def test_stack_profiles_masks_empty_users():
    full = ProfileState.from_compressions(torch.ones(2, K, D))
    prefix, mask = stack_profiles([full, ProfileState(K, D), None], K, D, torch.float32, "cpu")
    assert prefix.shape == (3, K, D) and mask.all(1).tolist() == [True, False, False]
    torch.testing.assert_close(prefix[0], torch.ones(K, D))


def test_top_k_of_all_documents_is_the_running_mean_exactly():
    compressions = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    running = ProfileState(3, 4)
    for c in compressions:
        running.add(c)
    for k in (5, 6, 100):
        merged = top_k_profile(compressions, torch.randn(5), k)
        assert merged.count == 5 and torch.equal(merged.sum, running.sum)


def test_top_k_keeps_the_best_scored_documents():
    compressions = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 2, 3).clone()  # document i is all i
    merged = top_k_profile(compressions, torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)  # ties: the earlier document
    assert merged.count == 2 and torch.equal(merged.mean(), torch.full((2, 3), 2.0))  # documents 1 and 3
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        top_k_profile(compressions, torch.zeros(4), 0)


def test_a_top_k_that_does_not_stand_out_by_min_margin_falls_back_to_the_mean():
    scores = torch.tensor([1.0, 4.0, 3.0, 0.0])  # best 4; top-1 stands out by (4 - 3) / 4, top-2 by (3 - 1) / 4
    everything = torch.arange(4)
    assert top_k_indices(scores, 1, 0.25).tolist() == [1]
    assert torch.equal(top_k_indices(scores, 1, 0.26), everything)
    assert top_k_indices(scores, 2, 0.5).tolist() == [1, 2]
    assert torch.equal(top_k_indices(scores, 2, 0.51), everything)
    assert top_k_indices(scores, 1, 0.0).tolist() == top_k_indices(scores, 1).tolist() == [1]
    assert torch.equal(top_k_indices(torch.zeros(4), 1, 0.1), everything)  # no score above 0: nothing stands out
    compressions = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    merged = top_k_profile(compressions, scores, 1, 0.9)
    assert merged.count == 4 and torch.equal(merged.sum, ProfileState.from_compressions(compressions).sum)
    with pytest.raises(ValueError, match="min_margin must be in"):
        top_k_indices(scores, 1, 1.5)


def test_dense_scores_rank_the_request_s_own_compression_first():
    compressions = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(1))
    scores = dense_scores(compressions[4], compressions)
    assert int(scores.argmax()) == 4 and scores.shape == (6,)
