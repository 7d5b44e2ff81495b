import json

import pytest

from nam_layout import MAX_DEPTH, Layout, LayoutError, PatternError, get_family


def test_tiling_without_cuts() -> None:
    layout = Layout.tile("AEM", 7)
    assert layout.kinds == "AEMAEMA"
    assert [layout.kinds[i] for i in range(7)] == ["AEM"[i % 3] for i in range(7)]
    assert layout.segments == ((0, 7),)
    assert not layout.has_cuts


def test_cuts_concatenate_to_depth() -> None:
    layout = Layout.tile("AEM|EA|R", 6)
    assert layout.kinds == "AEMEAR"
    assert layout.segments == ((0, 3), (3, 5), (5, 6))
    assert layout.segment_kinds() == ("AEM", "EA", "R")
    assert layout.cut_pattern() == "AEM|EA|R"


def test_cut_segments_must_total_depth() -> None:
    with pytest.raises(LayoutError, match=r"total 3\+2 = 5 layers, but depth is 6"):
        Layout.tile("AEM|EA", 6)


@pytest.mark.parametrize("depth", [0, -3, MAX_DEPTH + 1, 10**11])
def test_depth_outside_the_bound(depth: int) -> None:
    """Refused before anything is allocated: 10**11 layers would be a 100 GB string."""
    with pytest.raises(LayoutError, match=f"depth must be between 1 and 1,000,000 layers, got {depth:,}"):
        Layout.tile("AEME", depth)


def test_the_deepest_layout_allowed() -> None:
    assert Layout.tile("AEME", MAX_DEPTH).counts["A"] == MAX_DEPTH // 4


@pytest.mark.parametrize("depth", [2.0, "52", True, None])
def test_depth_must_be_int(depth: object) -> None:
    with pytest.raises(LayoutError, match="depth must be a whole number"):
        Layout.tile("AEME", depth)  # type: ignore[arg-type]


def test_pattern_errors_surface_before_depth_errors() -> None:
    with pytest.raises(PatternError):
        Layout.tile("aeme", 0)


def test_nam56r_facts() -> None:
    layout = Layout.tile("AEMEAEMEAEMR", 52)
    assert dict(layout.counts) == {"A": 13, "M": 13, "E": 22, "R": 4, "-": 0, "L": 0}
    assert sum(layout.counts.values()) == 52
    assert layout.positions("R") == (12, 24, 36, 48)
    assert layout.positions("A") == tuple(range(1, 50, 4))
    assert layout.indices("R") == (11, 23, 35, 47)
    assert layout == get_family("NAM56R").layout()


def test_indices_unknown_letter() -> None:
    with pytest.raises(KeyError, match="'X' is not a letter of this layout"):
        Layout.tile("AE", 2).indices("X")


def test_equality_and_hash_are_by_layers_and_segments() -> None:
    a, b = Layout.tile("AE", 4), Layout.tile("AEAE", 4)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Layout.tile("AE|AE", 4) != a  # same letters, other segments
    assert Layout.tile("EA", 4) != a


def test_immutable() -> None:
    layout = Layout.tile("AE", 4)
    with pytest.raises(AttributeError):
        layout.kinds = "EEEE"  # type: ignore[misc]
    with pytest.raises(TypeError):
        layout.counts["A"] = 0  # type: ignore[index]


def test_json_is_stable_and_round_trips() -> None:
    layout = Layout.tile("AEM|EAR", 6)
    text = layout.to_json()
    assert text == Layout.tile("AEM|EAR", 6).to_json()
    data = json.loads(text)
    assert data["schema"] == 1 and data["kinds"] == "AEMEAR" and data["segments"] == [[0, 3], [3, 6]]
    assert data["counts"] == {"-": 0, "A": 2, "E": 2, "M": 1, "R": 1, "L": 0}
    again = Layout.from_json(text)
    assert again == layout and again.pattern == layout.pattern


def test_json_rejects_tampering_and_garbage() -> None:
    data = json.loads(Layout.tile("AEME", 8).to_json())
    data["kinds"] = "AEMEAEMM"
    with pytest.raises(LayoutError, match="inconsistent"):
        Layout.from_json(json.dumps(data))
    with pytest.raises(LayoutError, match="not a layout JSON document"):
        Layout.from_json("{}")
    data["schema"] = 99
    with pytest.raises(LayoutError, match="schema 99 is not supported"):
        Layout.from_json(json.dumps(data))
