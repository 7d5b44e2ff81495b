import pytest

from nam_layout import Layout, LayoutError, get_family, plan_stages, to_megatron


def test_nam52_translates_letter_for_letter() -> None:
    out = to_megatron(get_family("NAM52").layout())
    assert out == "*EME" * 13 and len(out) == 52


def test_r_fails_closed_unless_mapped() -> None:
    layout = get_family("NAM56R").layout()
    with pytest.raises(LayoutError, match="R \\(M2RNN recurrent\\) has no megatron-core block"):
        to_megatron(layout)
    out = to_megatron(layout, map_letters={"R": "M"})
    assert out == "*EME*EME*EMM" * 4 + "*EME"
    assert to_megatron(layout, map_letters={"R": "-"}).count("-") == 4


def test_mla_variant_is_megatrons_mla_symbol() -> None:
    out = to_megatron(get_family("NAM56R-MLA").layout(), map_letters={"R": "M"})
    assert out == "+EME+EME+EMM" * 4 + "+EME"


def test_bad_mapping_target() -> None:
    with pytest.raises(LayoutError, match="cannot map 'R' to 'Q'"):
        to_megatron(Layout.tile("AR", 2), map_letters={"R": "Q"})


def test_plan_cuts_follow_megatron_segment_order() -> None:
    layout = get_family("NAM52").layout()
    plan = plan_stages(layout, stages=2, virtual=2)
    out = to_megatron(layout, plan)
    segments = out.split("|")
    assert len(segments) == 4
    assert "".join(segments) == "*EME" * 13
    # megatron picks segment vp * P + rank: our chunk k is its segment k
    for k, (a, b) in enumerate(plan.chunks):
        assert len(segments[k]) == b - a


def test_layout_cuts_are_kept() -> None:
    assert to_megatron(Layout.tile("AE|M-", 4)) == "*E|M-"


def test_even_split_needs_divisible_depth() -> None:
    layout = Layout.tile("AEME", 10)
    assert to_megatron(layout, pipeline_size=2) == "*EME*EME*E"
    with pytest.raises(LayoutError, match=r"10 % 4 = 2"):
        to_megatron(layout, pipeline_size=4)


def test_plan_for_another_layout_refused() -> None:
    plan = plan_stages(Layout.tile("AE", 4), 2)
    with pytest.raises(LayoutError, match="another layout"):
        to_megatron(Layout.tile("AM", 4), plan)


def test_mapping_a_letter_the_layout_lacks_is_refused() -> None:
    with pytest.raises(
        LayoutError, match=r"cannot map 'e': not a layer letter of this layout \(its letters: A M E R - L\)"
    ):
        to_megatron(Layout.tile("AEME", 4), map_letters={"e": "M"})
