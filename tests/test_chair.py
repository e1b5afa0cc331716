import json

import pytest

from csr.engine.chair import (
    Vocabulary,
    chair,
    load_coco_ground_truth,
    plurals,
    world_vocabulary,
)


@pytest.fixture
def coco_vocab() -> Vocabulary:
    return Vocabulary.from_synonyms(
        {
            "dog": ["puppy"],
            "hot dog": [],
            "person": ["man", "woman", "child"],
            "bus": [],
            "knife": [],
            "teddy bear": ["teddybear"],
        }
    )


def test_find_handles_synonyms_plurals_and_longest_match(coco_vocab):
    text = "Two Dogs eat a hot dog; people, buses, knives, a puppy and teddy bears."
    assert coco_vocab.find(text) == [
        "dog",
        "hot dog",
        "person",
        "bus",
        "knife",
        "dog",
        "teddy bear",
    ]


def test_find_does_not_match_inside_words(coco_vocab):
    # "dogma" and "busy" contain object words but mention no object.
    assert coco_vocab.find("Busy dogma of a manager.") == []


def test_plural_rules():
    assert plurals("bus") == ["buses"]
    assert plurals("sandwich") == ["sandwiches"]
    assert plurals("pony") == ["ponies"]
    assert plurals("person") == ["people", "persons"]
    assert "knives" in plurals("knife")
    assert plurals("circle") == ["circles"]


def test_explicit_synonym_beats_generated_plural():
    vocab = Vocabulary.from_synonyms({"glass": [], "eyeglasses": ["glasses"]})
    assert vocab.find("glasses and a glass") == ["eyeglasses", "glass"]


def test_conflicting_synonyms_are_refused():
    with pytest.raises(ValueError, match="synonym of both"):
        Vocabulary.from_synonyms({"dog": ["pup"], "cat": ["pup"]})


def test_chair_maths_on_hand_made_cases(coco_vocab):
    responses = [
        "A man with a dog.",  # both present
        "A dog and a bus. Another bus.",  # bus hallucinated twice
        "Nothing here.",  # no mention
        "Puppies near a hot dog.",  # dog present, hot dog hallucinated
    ]
    truths = [{"person", "dog"}, {"dog"}, {"knife"}, {"dog", "person"}]
    result = chair(responses, truths, coco_vocab)
    assert result.n_responses == 4
    assert result.n_mentions == 2 + 3 + 0 + 2
    assert result.n_hallucinated == 0 + 2 + 0 + 1
    assert result.chair_s == pytest.approx(2 / 4)
    assert result.chair_i == pytest.approx(3 / 7)
    # truth objects 2 + 1 + 1 + 2 = 6, mentioned: person, dog, dog, dog
    assert result.recall == pytest.approx(4 / 6)
    assert result.per_response[1].hallucinated == ["bus", "bus"]
    assert not result.per_response[2].hallucinates

    unique = chair(responses, truths, coco_vocab, unique=True)
    assert unique.n_mentions == 2 + 2 + 0 + 2
    assert unique.chair_i == pytest.approx(2 / 6)
    assert unique.chair_s == result.chair_s


def test_chair_rejects_mismatched_lengths(coco_vocab):
    with pytest.raises(ValueError):
        chair(["a dog"], [], coco_vocab)


def test_world_vocabulary_counts_colour_errors():
    vocab = world_vocabulary(["red circle", "blue circle", "red square"])
    result = chair(
        ["There is a blue circle. There are two red squares.", "There is a circle."],
        [{"red circle", "red square"}, {"red circle"}],
        vocab,
    )
    # "blue circle" is a hallucination although a circle is present; a bare
    # shape names no object of this world.
    assert result.per_response[0].mentioned == ["blue circle", "red square"]
    assert result.per_response[0].hallucinated == ["blue circle"]
    assert result.per_response[1].mentioned == []
    assert result.chair_s == pytest.approx(0.5)
    assert result.chair_i == pytest.approx(0.5)


def _write_coco(tmp_path):
    instances = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 18, "name": "dog"},
            {"id": 6, "name": "bus"},
            {"id": 90, "name": "toothbrush"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1},
            {"id": 11, "image_id": 1, "category_id": 1},
            {"id": 12, "image_id": 1, "category_id": 18},
            {"id": 13, "image_id": 2, "category_id": 6},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("# category, synonyms\nperson, man, woman, child\n\ndog, puppy\nbus\n")
    return path, synonyms


def test_load_coco_ground_truth(tmp_path):
    instances, synonyms = _write_coco(tmp_path)
    truth, vocab = load_coco_ground_truth(instances, synonyms)
    assert truth == {1: {"person", "dog"}, 2: {"bus"}, 3: set()}
    # toothbrush has no synonyms line and is still matched by its own name
    assert vocab.objects == {"person", "dog", "bus", "toothbrush"}
    result = chair(
        ["Two women walk their puppies.", "A bus and a toothbrush.", "A man."],
        [truth[1], truth[2], truth[3]],
        vocab,
    )
    assert [r.hallucinated for r in result.per_response] == [[], ["toothbrush"], ["person"]]
    assert result.chair_s == pytest.approx(2 / 3)
    assert result.chair_i == pytest.approx(2 / 5)


def test_load_coco_rejects_unknown_synonym_category(tmp_path):
    instances, synonyms = _write_coco(tmp_path)
    synonyms.write_text("dgo, puppy\n")
    with pytest.raises(ValueError, match="dgo"):
        load_coco_ground_truth(instances, synonyms)
