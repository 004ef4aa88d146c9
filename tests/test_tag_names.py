"""Names, not slugs (issue 17, point 3): how character, copyright and artist tags read in prompts."""
import pytest

from tagcaption.tag_names import display_name, spelling, title_case


@pytest.mark.parametrize("tag, other_names, expected", [
    ("hatsune_miku", [], "Hatsune Miku"),
    ("hatsune_miku", ["初音ミク", "Hatsune_Miku"], "Hatsune Miku"),
    ("kaga_(kantai_collection)", [], "Kaga (Kantai Collection)"),
    ("kaga_(kantai_collection)", ["加賀", "Kaga"], "Kaga (Kantai Collection)"),
    ("wlop", ["WLOP", "王凌"], "WLOP"),
    ("wlop", [], "Wlop"),
    ("the_idolm@ster", ["THE_iDOLM@STER", "アイドルマスター"], "THE iDOLM@STER"),
    ("kei_(artist)", [], "Kei"),
    ("fate_(series)", [], "Fate"),
    ("shingeki_no_kyojin", [], "Shingeki no Kyojin"),
    ("the_legend_of_zelda", [], "The Legend of Zelda"),
    ("fate/grand_order", [], "Fate/Grand Order"),
    ("final_fantasy_vii", [], "Final Fantasy VII"),
    ("k-on!", [], "K-On!"),
    ("re:zero_kara_hajimeru_isekai_seikatsu", ["Re:Zero"], "Re:Zero Kara Hajimeru Isekai Seikatsu"),
    ("mix_(artist)", ["mix"], "Mix"),
    ("yamada_(some_name)", ["Yamada (Some Name)"], "Yamada (Some Name)"),
])
def test_a_tag_as_a_name(tag, other_names, expected):
    assert display_name(tag, spelling(tag, other_names)) == expected


def test_an_other_name_is_a_spelling_only_when_it_writes_the_same_name():
    assert spelling("wlop", ["Wang Ling", "王凌"]) is None
    assert spelling("hatsune_miku", ["hatsune miku"]) is None  # no capitals to learn from
    assert title_case("a_certain_magical_index") == "A Certain Magical Index"
