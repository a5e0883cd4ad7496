from __future__ import annotations

import pytest

from reckpt.errors import ParamMapError
from reckpt.remap import (
    ec_list_to_ec_dict_rule,
    index_keyed_optimizer_rule,
    input_tile_rule,
    overlap_block,
    parse_param_map,
    remap_input_tile_user_key,
    resolve_keys,
)


def test_parse_param_map_tabs_spaces_comments() -> None:
    text = "a.w\told.w\n  b.w   old.b  \n\n# comment\n"
    assert parse_param_map(text, "m.txt") == {"a.w": "old.w", "b.w": "old.b"}


@pytest.mark.parametrize(("text", "line"), [("a b\nc\n", 2), ("a b c\n", 1), ("a b\na c\n", 2)])
def test_parse_param_map_errors_name_file_and_line(text: str, line: int) -> None:
    with pytest.raises(ParamMapError, match=rf"^m\.txt:{line}: "):
        parse_param_map(text, "m.txt")


def test_resolve_identity_missing_unused_remap() -> None:
    r = resolve_keys(
        {"a": (2,), "b": (3,), "new": (1,)},
        {"a": (2,), "old_b": (3,), "stale": (5,)},
        param_map={"b": "old_b"},
    )
    assert r.loads == {"a": "a", "b": "old_b"}
    assert r.missing == ["new"] and r.unused == ["stale"]
    assert r.remapped == {"b": "old_b"} and not r.errors


@pytest.mark.parametrize(
    ("saved", "current", "resize", "reinit", "outcome"),
    [
        ((4, 3), (4, 3), False, False, "load"),
        ((4, 3), (6, 3), False, False, "error"),
        ((4, 3), (6, 3), True, False, "resized"),
        ((4, 3), (4, 5), True, False, "error"),
        ((4, 3), (4, 5), True, True, "reinit"),
        ((4,), (8,), False, True, "reinit"),
        (None, (4,), False, False, "error"),
    ],
)
def test_resolve_shapes(saved, current, resize, reinit, outcome) -> None:
    r = resolve_keys({"k": current}, {"k": saved}, allow_row_resize=resize, reinit_on_mismatch=reinit)
    got = "error" if r.errors else "resized" if r.resized else "reinit" if r.reinitialized else "load"
    assert got == outcome
    assert ("k" in r.loads) == (outcome in ("load", "resized"))


def test_rules_only_for_missing_keys_first_hit_wins() -> None:
    def to_x(key, saved):  # type: ignore[no-untyped-def]
        return "x"

    def to_y(key, saved):  # type: ignore[no-untyped-def]
        return "y"

    r = resolve_keys({"a": (1,), "b": (1,)}, {"a": (1,), "x": (1,), "y": (1,)}, rules=[to_x, to_y])
    assert r.loads == {"a": "a", "b": "x"}


def test_ec_list_rule_segments_not_substrings() -> None:
    saved = {
        "m.grp.ec_list.0.embeddings.t.weight": (10, 16),
        "m.grp.mc_ec_list.1.embeddings.u.weight": (10, 8),
        "m.grp.ec_list.2.embeddings.v.weight": (10, 160),
    }
    rule = ec_list_to_ec_dict_rule(saved)
    assert rule("m.grp.ec_dict.16.embeddings.t.weight", saved) == "m.grp.ec_list.0.embeddings.t.weight"
    assert rule("m.grp.mc_ec_dict.8.embeddings.u.weight", saved) == "m.grp.mc_ec_list.1.embeddings.u.weight"
    assert rule("m.grp.ec_dict.160.embeddings.v.weight", saved) == "m.grp.ec_list.2.embeddings.v.weight"
    assert rule("m.grp.ec_dict.1600.embeddings.v.weight", saved) is None
    assert rule("m.other.ec_dict.16.embeddings.t.weight", saved) is None


def test_input_tile_twins() -> None:
    assert remap_input_tile_user_key("g.ebc_user.embedding_bags.t.weight") == "g.ebc.embedding_bags.t.weight"
    assert remap_input_tile_user_key("g.mc_ec_dict_user.x") == "g.mc_ec_dict.x"
    assert remap_input_tile_user_key("g.dense.w") == "g.dense.w"
    assert remap_input_tile_user_key("a.ec_dict_user.b.ec_dict_user.c") == "a.ec_dict.b.ec_dict.c"
    assert remap_input_tile_user_key("g.ec_dict_user.x", valid_keys={"nope"}) == "g.ec_dict_user.x"


def test_index_keyed_rule_prefers_longest_name() -> None:
    rule = index_keyed_optimizer_rule({"a.weight": 0, "a.weight_b": 1})
    assert rule("state.a.weight_b.exp_avg", ()) == "state.1.exp_avg"
    assert rule("state.a.weight.exp_avg", ()) == "state.0.exp_avg"
    assert rule("param_groups.0.lr", ()) is None


def test_dash_in_param_map_keeps_initial_value() -> None:
    mapping = parse_param_map("layer.weight -\n", "m.txt")
    r = resolve_keys(
        {"layer.weight": (4, 5), "b": (1,)}, {"layer.weight": (4, 3), "b": (1,)}, param_map=mapping
    )
    assert r.reinitialized == ["layer.weight"] and r.loads == {"b": "b"} and not r.errors


@pytest.mark.parametrize(
    ("saved", "current", "strict", "resize", "outcome", "block"),
    [
        ((4, 3), (6, 5), False, False, "resized", (4, 3)),  # the default: any dimension
        ((6, 5), (4, 3), False, False, "resized", (4, 3)),
        ((4, 3), (2, 5), False, False, "resized", (2, 3)),
        ((4,), (8,), False, False, "resized", (4,)),
        ((4, 3), (12,), False, False, "error", None),  # another number of dimensions
        ((), (1,), False, False, "error", None),
        (None, (4,), False, False, "error", None),  # a non-tensor item
        ((4, 3), (6, 3), True, False, "error", None),  # strict
        ((4, 3), (6, 3), True, True, "resized", (4, 3)),  # strict, rows allowed
        ((4, 3), (6, 5), True, True, "error", None),
    ],
)
def test_overlap_outcomes(saved, current, strict, resize, outcome, block) -> None:
    r = resolve_keys({"k": current}, {"k": saved}, load_overlap=not strict, allow_row_resize=resize)
    got = "error" if r.errors else "resized" if r.resized else "load"
    assert got == outcome
    (m,) = r.shape_mismatched
    assert (m.saved, m.current, m.block) == (saved, current, block)


def test_overlap_block() -> None:
    assert overlap_block((2, 4), (3, 6)) == (2, 4)
    assert overlap_block((5,), (3,)) == (3,)
    assert overlap_block((2, 4), (8,)) is None and overlap_block(None, (1,)) is None


def test_input_tile_twin_of_a_legacy_ec_list_key_composes() -> None:
    """INPUT_TILE=3 renames ``ec_dict_user`` -> ``ec_dict``; the ec_list rule finishes the job."""
    saved = {"group.ec_list.0.weight": (2, 4), "group.ebc.embedding_bags.t.weight": (3, 4)}
    rules = [input_tile_rule, ec_list_to_ec_dict_rule(saved)]
    r = resolve_keys(
        {
            "group.ec_dict_user.4.weight": (2, 4),
            "group.ebc_user.embedding_bags.t.weight": (3, 4),
            "group.ec_dict_user.8.weight": (2, 8),  # no table of that dimension
        },
        saved,
        rules=rules,
    )
    assert r.loads == {
        "group.ec_dict_user.4.weight": "group.ec_list.0.weight",
        "group.ebc_user.embedding_bags.t.weight": "group.ebc.embedding_bags.t.weight",
    }
    assert r.missing == ["group.ec_dict_user.8.weight"]
    # Without the tile rule, the twin key stays missing.
    assert resolve_keys({"group.ec_dict_user.4.weight": (2, 4)}, saved, rules=rules[1:]).missing


def test_input_tile_rule_prefers_a_present_twin() -> None:
    assert (
        input_tile_rule("g.ebc_user.embedding_bags.t.w", {"g.ebc.embedding_bags.t.w"})
        == "g.ebc.embedding_bags.t.w"
    )
    assert input_tile_rule("g.ec_dict_user.4.w", ()) == "g.ec_dict.4.w"  # handed on to later rules
    assert input_tile_rule("g.dense.w", ()) is None
    assert remap_input_tile_user_key("g.ebc_user.embedding_bags.t.w", {"g.ebc.embedding_bags.t.w"}) == (
        "g.ebc.embedding_bags.t.w"
    )
