"""Tiers as configuration, the restart choice and the node layout: pure logic, no I/O."""

from __future__ import annotations

import pytest

from reckpt.errors import ConfigError
from reckpt.tiers.config import Tier, TierSet
from reckpt.tiers.control import Request
from reckpt.tiers.nodes import layout_from_keys
from reckpt.tiers.promote import is_shared_file, shared_token
from reckpt.tiers.select import Copy, Fill, Plan, plan


def _tiers() -> TierSet:
    return TierSet(
        [
            Tier("memory", "/dev/shm/run", 50, keep=1),
            Tier("local", "/nvme/run", 500, keep=2),
            Tier("durable", "s3://bucket/run", 2000, keep=10, keep_best=True),
        ]
    )


# -- Tier and TierSet --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Memory"}, "tier name"),
        ({"name": ""}, "tier name"),
        ({"url": ""}, "url must be"),
        ({"url": "memory://x/run"}, "/dev/shm"),
        ({"every_steps": 0}, "every_steps"),
        ({"every_steps": True}, "every_steps"),
        ({"keep": -1}, "keep"),
    ],
)
def test_tier_refuses_bad_values(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "memory", "url": "/dev/shm/run", "every_steps": 10, **kwargs}
    with pytest.raises(ConfigError, match=message):
        Tier(**args)  # type: ignore[arg-type]


def test_scope_follows_the_url_unless_told() -> None:
    assert not Tier("m", "/dev/shm/run", 1).is_shared
    assert not Tier("m", "file:///dev/shm/run", 1).is_shared
    assert Tier("d", "s3://b/run", 1).is_shared
    assert Tier("d", "/nfs/run", 1, shared=True).is_shared
    assert Tier("m", "file:///dev/shm/run/", 1).local_path() == "/dev/shm/run"
    with pytest.raises(ConfigError, match="not a local path"):
        Tier("d", "s3://b/run", 1).local_path()


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([], "at least one"),
        ([Tier("a", "/x", 1), Tier("a", "/y", 2)], "repeated: \\['a'\\]"),
        ([Tier("a", "/x", 1), Tier("b", "/x", 2)], "own url"),
        ([Tier("a", "s3://b/x", 1), Tier("b", "/y", 2)], "node-local folder"),
        ([Tier("a", "/nfs/x", 1, shared=True), Tier("b", "/y", 2)], "node-local folder"),
    ],
)
def test_tierset_refuses_bad_lists(tiers: list[Tier], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TierSet(tiers)


def test_a_single_remote_tier_needs_no_persister_folder() -> None:
    assert TierSet([Tier("durable", "s3://b/run", 100)]).fastest.name == "durable"


@pytest.mark.parametrize(
    ("step", "promote_all", "save", "promote"),
    [
        (50, False, "memory", []),
        (500, False, "memory", ["local"]),
        (2000, False, "memory", ["local", "durable"]),
        (70, False, "memory", []),  # no tier due: an explicit save goes to the fastest alone
        (70, True, "memory", ["local", "durable"]),  # the final save goes everywhere
        (0, False, "memory", ["local", "durable"]),
    ],
)
def test_route_saves_to_the_fastest_due_tier(
    step: int, promote_all: bool, save: str, promote: list[str]
) -> None:
    route = _tiers().route(step, promote_all)
    assert route.save.name == save
    assert [t.name for t in route.promote] == promote


def test_route_with_cadences_that_do_not_nest() -> None:
    tiers = TierSet([Tier("memory", "/dev/shm/run", 30), Tier("durable", "s3://b/run", 50)])
    assert tiers.trigger_steps == 10
    assert tiers.route(50).save.name == "durable" and tiers.route(50).promote == ()
    assert tiers.route(150).save.name == "memory" and [t.name for t in tiers.route(150).promote] == [
        "durable"
    ]
    assert tiers.due(40) == ()


def test_tierset_lookup_and_json_roundtrip() -> None:
    tiers = _tiers()
    assert tiers.index("local") == 1 and tiers["durable"].keep_best
    assert tiers.control_dir == "/dev/shm/run/.reckpt-tiers"
    with pytest.raises(ConfigError, match="no tier named 'disk'"):
        tiers["disk"]
    again = TierSet.from_json(tiers.to_json())
    assert again.tiers == tiers.tiers


def test_request_roundtrip() -> None:
    r = Request(500, "memory", ("local", "durable"), 12.5, 2, pid=41)
    assert Request.from_json(r.to_json()) == r
    assert r.name == "promote-000000000500.json"


# -- restart plan ------------------------------------------------------------------------------------

SHARED = [False, False, True]  # memory, local disk, S3


def _lacks(*files: str) -> frozenset[str]:
    return frozenset(files)


def test_one_node_resumes_the_newest_step_from_its_fastest_complete_copy() -> None:
    a = {150: [Copy(0, "m150")], 100: [Copy(1, "m100"), Copy(2, "m100")]}
    assert plan([a, a], [[0, 1]], SHARED) == Plan(150, "m150", (0, 0))
    assert plan([{100: [Copy(2, "m100")]}], [[0]], SHARED) == Plan(100, "m100", (2,))


def test_nodes_fill_their_parts_from_each_other() -> None:
    a = {12: [Copy(0, "m12", _lacks("c", "d"))]}
    b = {12: [Copy(0, "m12", _lacks("a", "b"))]}
    p = plan([a, a, b, b], [[0, 1], [2, 3]], SHARED)
    assert p is not None and (p.step, p.tiers) == (12, (0, 0, 0, 0))
    assert p.fills == (
        Fill(0, 0, (("c", 1, 0), ("d", 1, 0))),
        Fill(1, 0, (("a", 0, 0), ("b", 0, 0))),
    )


def test_a_file_no_node_holds_comes_from_the_shared_tier_or_rules_the_step_out() -> None:
    a = {12: [Copy(0, "m12", _lacks("b"))], 8: [Copy(1, "m8", _lacks("b")), Copy(2, "m8")]}
    gone = {8: [Copy(2, "m8")]}  # a replaced machine sees S3 only
    p = plan([a, gone], [[0], [1]], SHARED)
    assert p == Plan(8, "m8", (1, 2), (Fill(0, 1, (("b", -1, 2),)),))
    assert plan([a, {}], [[0], [1]], SHARED) is None


def test_a_complete_copy_beats_a_slower_part_and_a_faster_part_beats_it() -> None:
    fast_part = {5: [Copy(0, "m", _lacks("x")), Copy(2, "m")]}
    other = {5: [Copy(0, "m", _lacks("y")), Copy(2, "m")]}
    assert plan([fast_part, other], [[0], [1]], SHARED).tiers == (0, 0)  # type: ignore[union-attr]
    slow_part = {5: [Copy(1, "m", _lacks("x")), Copy(0, "m")]}
    assert plan([slow_part], [[0]], SHARED) == Plan(5, "m", (0,))


def test_only_one_checkpoint_of_a_step_counts_and_the_fastest_wins() -> None:
    old_new = [
        {150: [Copy(0, "old")], 100: [Copy(2, "m100")]},
        {150: [Copy(0, "new")], 100: [Copy(2, "m100")]},
    ]
    assert plan(old_new, [[0], [1]], SHARED) == Plan(100, "m100", (2, 2))
    both = {5: [Copy(0, "new"), Copy(2, "old")]}
    assert plan([both], [[0]], SHARED) == Plan(5, "new", (0,))


def test_nothing_to_plan() -> None:
    assert plan([], [], SHARED) is None
    assert plan([{}, {}], [[0], [1]], SHARED) is None
    assert plan([{1: [Copy(0, "m")]}, {2: [Copy(0, "n")]}], [[0], [1]], SHARED) is None


# -- nodes and shared files ---------------------------------------------------------------------------


def test_layout_numbers_nodes_by_their_lowest_rank() -> None:
    layout = layout_from_keys(["b", "a", "b", "a"], 3)
    assert layout.ranks == ((0, 2), (1, 3)) and layout.node == 1 and not layout.leader
    assert layout_from_keys(["x"], 0).nodes == 1 and layout_from_keys(["x"], 0).leader


@pytest.mark.parametrize(
    ("rel", "shared"),
    [
        ("plan", True),
        ("meta", True),
        ("dataloader_state.json", True),
        ("optimizer/.metadata", True),
        ("model/__0_0.distcp", False),
        ("dynamicemb/user/user_emb_keys.rank_0.world_size_2", False),
        ("notes/plan", False),
    ],
)
def test_shared_files_are_those_rank_0_writes_for_all(rel: str, shared: bool) -> None:
    assert is_shared_file(rel) is shared


def test_shared_token_names_one_checkpoint() -> None:
    a = shared_token("s3://b/run/model.ckpt-5", b"manifest-a")
    assert a == shared_token("s3://b/run/model.ckpt-5", b"manifest-a")
    assert a != shared_token("s3://b/run/model.ckpt-5", b"manifest-b")
    assert a != shared_token("s3://b/run/model.ckpt-6", b"manifest-a")
    assert all(c in "0123456789abcdef" for c in a)
