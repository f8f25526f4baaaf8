"""sdtune clean: the packaged rules on tag and caption examples, a user's rules file, and rule-file errors."""

from __future__ import annotations

import json

import pytest

from sdtune.cli import main
from sdtune.data.clean import RulesError, clean_caption, clean_images, clean_tags, load_rules, parse_rules

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rules():
    return load_rules()


@pytest.mark.parametrize("tags, expected", [
    # underscores to spaces, emoticons kept
    ("long_hair, ^_^, >_<, looking_at_viewer", "long hair, ^_^, >_<, looking at viewer"),
    # DeepDanbooru rating tags removed
    ("1girl, smile, rating:safe", "1girl, smile"),
    ("1girl, rating:questionable, rating:explicit", "1girl"),
    # a bare tag dropped when a more specific one ends with it
    ("1girl, shirt, white shirt", "1girl, white shirt"),
    ("skirt, pleated skirt, red skirt, hair ornament, star hair ornament",
     "pleated skirt, red skirt, star hair ornament"),
    # ... but only as a whole word: "tshirt" does not make "shirt" redundant
    ("tshirt, shirt", "tshirt, shirt"),
    # one person: hair and eye tags stay, even two of them
    ("1girl, blonde hair, black hair, blue eyes, red eyes", "1girl, blonde hair, black hair, blue eyes, red eyes"),
    # several people: conflicting person-specific tags removed, single ones kept, hair length exempt from colour
    ("2girls, blonde_hair, black_hair, long_hair, blue_eyes, red_eyes, ponytail, smile",
     "2girls, long hair, ponytail, smile"),
    ("multiple boys, short hair, long hair, brown eyes", "multiple boys, brown eyes"),
    ("6+girls, twintails, ponytail, long sleeves, sleeveless, bob cut, hime cut", "6+girls"),
    ("2girls, long hair, blonde hair, blue eyes", "2girls, long hair, blonde hair, blue eyes"),
    # whitespace and empty tags tidied
    ("  a ,, b,c  ", "a, b, c"),
    ("", ""),
])
def test_tags(rules, tags, expected):
    assert clean_tags(tags, rules) == expected


@pytest.mark.parametrize("caption, expected", [
    ("an anime girl with a ladybug", "a girl with a ladybug"),  # whole words: ladybug survives "lady"
    ("a lady holding a ladle", "a girl holding a ladle"),
    ("a young woman and two women", "a girl and two girls"),
    ("a cartoon anime drawing of a person", "a drawing of a girl"),
    ("anime anime anime girl girl girl", "girl"),
    ("a female cartoon character in a field", "a girl in a field"),
    ("people on a beach", "girls on a beach"),
    ("a womanly figure", "a womanly figure"),
    ("a dog", "a dog"),
])
def test_captions(rules, caption, expected):
    assert clean_caption(caption, rules) == expected


def test_seed_substring_bug_is_not_reproduced(rules):
    # the seed's str.replace turns "ladybug" into "girlbug" and "personal" into "girlal"
    assert clean_caption("a ladybug on a personal computer", rules) == "a ladybug on a personal computer"


def test_clean_images_keeps_other_keys_and_counts(rules):
    images = {"a": {"caption": "a woman", "tags": "shirt, white_shirt", "train_resolution": [512, 512]},
              "b": {"caption": "a dog"}}
    out, summary = clean_images(images, rules)
    assert out == {"a": {"caption": "a girl", "tags": "white shirt", "train_resolution": [512, 512]},
                   "b": {"caption": "a dog"}}
    assert images["a"]["caption"] == "a woman"  # the input is not modified
    assert (summary.captions_changed, summary.tags_changed, summary.without_tags) == (1, 1, ["b"])


def test_clean_command_end_to_end(tmp_path):
    src = tmp_path / "meta.json"
    src.write_text(json.dumps({"img": {"caption": "an anime woman", "tags": "1girl, rating:safe, blue_eyes"}}))
    out = tmp_path / "clean.json"
    assert main(["clean", str(src), str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc == {"img": {"caption": "a girl", "tags": "1girl, blue eyes"}}  # sd-scripts' layout


def test_user_rules_file_replaces_the_defaults(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('version = 1\n[tags]\nremove = ["watermark"]\n[caption]\nreplace = [["cat", "kitty"]]\n')
    src = tmp_path / "meta.json"
    src.write_text(json.dumps({"img": {"caption": "a cat and a woman", "tags": "watermark, long_hair"}}))
    assert main(["clean", str(src), str(src), "--rules", str(rules)]) == 0
    # only the user's rules apply: no underscore replacement, no "woman" -> "girl"
    assert json.loads(src.read_text())["img"] == {"caption": "a kitty and a woman", "tags": "long_hair"}


@pytest.mark.parametrize("text, message", [
    ("version = 1\n[tags]\nremoove = []\n", "unknown key"),
    ("version = 2\n", "version 2"),
    ("[tags.multiple_people]\nmarkers = ['(']\n", "invalid regular expression"),
    ("[[tags.multiple_people.groups]]\nname = 'x'\n", "no 'match'"),
    ("[caption]\nreplace = [['girl', 'girl girl']]\n", "contains the words it replaces"),
    ("[caption]\nreplace = [['a']]\n", "pair of strings"),
    ("not toml = = 1\n", "not valid TOML"),
])
def test_bad_rules_name_the_file_and_problem(tmp_path, text, message, capsys):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError, match=message) as info:
        load_rules(path)
    assert str(path) in str(info.value)
    src = tmp_path / "meta.json"
    src.write_text("{}")
    assert main(["clean", str(src), str(tmp_path / "o.json"), "--rules", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_empty_deletion_removes_one_space(tmp_path):
    rules = parse_rules('[caption]\nreplace = [["very", ""]]\n')
    assert clean_caption("a very very big dog, very", rules) == "a big dog,"


# ---------------------------------------------------------------------------------------------- against sd-scripts
# sd-scripts' finetune/clean_captions_and_tags.py, written out here as the reference (its underscore step and its
# caption replacements; only rules whose outcome does not depend on substring vs whole-word matching are used).
def seed_underscores(tags: str) -> str:
    return tags.replace("^_^", "^@@@^").replace("_", " ").replace("^@@@^", "^_^")


SEED_CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"), ("young ", ""), ("anime girl", "girl"), ("cartoon female", "girl"),
    ("cartoon lady", "girl"), ("cartoon character", "girl"), ("cartoon woman", "girl"), ("cartoon women", "girls"),
    ("cartoon girl", "girl"), ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"),
    ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"), ("female", "girl"), ("woman", "girl"),
    ("women", "girls"), ("people", "girls"), ("person", "girl"), ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"), ("a cartoon picture", "a picture"), ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"), ("girl girl", "girl"),
]


def seed_clean_caption(caption: str) -> str:
    for rf, rt in SEED_CAPTION_REPLACEMENTS:
        replaced = True
        while replaced:
            bef = caption
            caption = caption.replace(rf, rt)
            replaced = bef != caption
    return caption


@pytest.mark.parametrize("tag", ["hand_to_own_mouth", "looking_to_the_side", "x_x_x_pattern", "go_to_o_o",
                                 "arms_behind_back", "^_^", "long_hair"])
def test_underscores_as_sd_scripts_emoticons_only_as_whole_tags(tag):
    rules = load_rules()
    assert clean_tags(tag, rules) == seed_underscores(tag)
    for emoticon in ("o_o", "x_x", "T_T", "^_^"):
        assert clean_tags(f"smile, {emoticon}", rules) == f"smile, {emoticon}"


@pytest.mark.parametrize("caption", [
    "two females standing in a field", "a cartoon female with a sword", "anime girls on a beach",
    "a group of persons", "three anime females", "cartoon girls dancing", "anime characters in a room",
    "two women and a person",
])
def test_caption_plurals_as_sd_scripts(caption):
    assert clean_caption(caption, load_rules()) == seed_clean_caption(caption).strip()
