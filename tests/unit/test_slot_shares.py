"""Weighted max-min fair shares (store/types.py): the division every slot lease uses."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batchd.store.types import SlotDemand, SlotGrant, SlotLease, fair_shares, grant, slot_leases


def test_fair_shares_examples() -> None:
    assert fair_shares(10, {"a": 10, "b": 10}) == {"a": 5, "b": 5}
    assert fair_shares(10, {"a": 2, "b": 10}) == {"a": 2, "b": 8}
    assert fair_shares(10, {"a": 10, "b": 10}, lambda k: 4.0 if k == "a" else 1.0) == {
        "a": 8,
        "b": 2,
    }
    assert fair_shares(3, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 1, "c": 1}
    assert fair_shares(10, {"a": 0, "b": 3}) == {"a": 0, "b": 3}


@given(
    limit=st.integers(0, 200),
    wants=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 300), max_size=6),
    weights=st.dictionaries(st.sampled_from("abcdef"), st.floats(0.1, 10), max_size=6),
)
def test_fair_shares_properties(
    limit: int, wants: dict[str, int], weights: dict[str, float]
) -> None:
    shares = fair_shares(limit, wants, lambda k: weights.get(k, 1.0))
    assert sum(shares.values()) == min(limit, sum(wants.values()))  # work-conserving
    assert all(0 <= shares[k] <= wants[k] for k in wants)
    # max-min within rounding: a key below its want, given one slot more, is not below the
    # weighted level of any other key that gives one up
    for k, share in shares.items():
        if share < wants[k]:
            for j, other in shares.items():
                wk, wj = weights.get(k, 1.0), weights.get(j, 1.0)
                assert (share + 1) / wk >= (other - 1) / wj - 1e-9


def test_grant_splits_a_project_share_between_its_processes() -> None:
    others = {"b": (12, 0, {"big": 12}), "c": (12, 0, {"small": 12})}
    mine = grant("a", SlotDemand(12, 12, 0, {"big": 12}), others)
    assert mine.target == 3  # big's 6 split between a and b; small keeps its 6


def test_slot_leases_are_the_rows_every_store_keeps() -> None:
    """One lease row per deployment granted: the want capped at the limit, the granted
    slots, the want by project (capped too; one unnamed project when none is named)."""
    demands = {
        "m": SlotDemand(10, 25, 3, {"p": 20, "q": 5, "idle": 0}),
        "n": SlotDemand(4, 2, 0),
        "o": SlotDemand(4, 0, 0),
    }
    grants = {"m": SlotGrant(7, 8), "n": SlotGrant(2, 2), "o": SlotGrant(0, 0)}
    assert slot_leases(demands, grants) == [
        SlotLease("m", 10, 7, {"p": 10, "q": 5}),
        SlotLease("n", 2, 2, {"": 2}),
        SlotLease("o", 0, 0, {}),
    ]
    assert slot_leases(demands, {"n": grants["n"]}) == [SlotLease("n", 2, 2, {"": 2})]
