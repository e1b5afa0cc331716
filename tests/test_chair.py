import json

import pytest

from csr.engine.evaluate.chair import (
    Vocabulary,
    chair,
    coco_vocabulary,
    load_coco_ground_truth,
    plurals,
    read_synonyms,
    world_vocabulary,
)
from tests.test_evaluations import _coco, _invoke, tiny_store  # noqa: F401


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
    loaded = load_coco_ground_truth(instances, synonyms)
    truth, vocab = loaded.objects, loaded.vocabulary
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


# -- standard CHAIR: the shipped COCO table and the reference code's rules ----


def test_shipped_table_has_the_80_coco_categories():
    table = read_synonyms()
    assert len(table) == 80
    assert table["dining table"] == ["table", "desk"]
    assert "motor bike" in table["motorcycle"]  # the reference's " motor bike" typo is repaired
    assert coco_vocabulary().objects == frozenset(table)


# Five hand-made captions. Per caption: the COCO objects it mentions (one per
# mention) and the truth; hallucinated mentions marked with *.
CAPTIONS = [
    # man -> person, dogs -> dog, dining table, hot dogs -> hot dog*
    ("A man and two dogs sit at a dining table with hot dogs.", {"person", "dog", "dining table"}),
    # baby elephant -> elephant (not a person); people -> person; train track names no train
    ("A baby elephant stands next to people on a train track.", {"elephant", "person"}),
    # motorbikes -> motorcycle, bus, fire hydrant*
    ("Two motorbikes and a bus are parked near a fire hydrant.", {"motorcycle", "bus"}),
    # toilet, cell phone*, sink; "seat" beside a toilet is no chair
    ("The seat of the toilet is up; a cell phone lies on the sink.", {"toilet", "sink"}),
    # teddy bears -> teddy bear (not a bear), couches -> couch
    ("Teddy bears sit on the couches.", {"teddy bear", "couch"}),
]


def test_standard_chair_on_hand_made_captions():
    vocab = coco_vocabulary()
    result = chair([c for c, _ in CAPTIONS], [t for _, t in CAPTIONS], vocab)
    assert [r.mentioned for r in result.per_response] == [
        ["person", "dog", "dining table", "hot dog"],
        ["elephant", "person"],
        ["motorcycle", "bus", "fire hydrant"],
        ["toilet", "cell phone", "sink"],
        ["teddy bear", "couch"],
    ]
    assert [r.hallucinated for r in result.per_response] == [["hot dog"], [], ["fire hydrant"], ["cell phone"], []]
    assert result.chair_s == pytest.approx(3 / 5)
    assert result.chair_i == pytest.approx(3 / 14)
    assert result.recall == pytest.approx(11 / 11)


def test_reference_special_cases():
    vocab = coco_vocabulary()
    assert vocab.find("a baby") == ["person"]
    assert vocab.find("adult giraffes and a baby animal") == ["giraffe"]
    assert vocab.find("a passenger train and a passenger jet") == ["train", "airplane"]
    assert vocab.find("a man in a bow tie") == ["person", "tie"]
    assert vocab.find("a seat and a stool") == ["chair", "chair"]
    assert vocab.find("a toilet seat") == ["toilet"]
    assert vocab.find("home plate") == []


def test_coco_truth_adds_objects_of_reference_captions(tmp_path):
    instances, _ = _write_coco(tmp_path)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"annotations": [
        {"image_id": 2, "caption": "A bus full of people."},
        {"image_id": 3, "caption": "A puppy with a toothbrush."},
        {"image_id": 99, "caption": "Not an image of this set: a dog."},
    ]}))
    loaded = load_coco_ground_truth(instances, captions_json=captions)
    # The shipped table supplies the synonyms (puppy -> dog, people -> person).
    assert loaded.objects == {1: {"person", "dog"}, 2: {"bus", "person"}, 3: {"dog", "toothbrush"}}
    assert loaded.vocabulary.objects == {"person", "dog", "bus", "toothbrush"}


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"images": [{"id": 1}], "categories": []}', "missing 'annotations'"),
    ('{"images": [], "annotations": [], "categories": []}', "lists no images"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 5, "image_id": 7, "category_id": 1}],'
     ' "categories": [{"id": 1, "name": "dog"}]}', "unknown image 7"),
])
def test_malformed_annotations_are_named(tmp_path, content, says):
    path = tmp_path / "instances.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=says):
        load_coco_ground_truth(path)


def test_chair_counts_caption_objects_as_present_only_when_captions_are_given(tmp_path):
    """The reference (chair.py get_annotations) combines segmentation and caption ground
    truth: a bus the captions name but no annotation marks is no hallucination with them."""
    from PIL import Image

    from csr.engine.evaluate.benchmarks import chair_metrics, coco_chair_task

    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}, {"id": 18, "name": "dog"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 18},
                        {"id": 12, "image_id": 2, "category_id": 1}],
    }))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("1.png", "2.png"):
        Image.new("RGB", (4, 4)).save(images / name)
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": 2, "caption": "A bus full of people."}]}))
    responses = ["A person with a dog.", "A bus and a person."]

    alone = coco_chair_task(instances, images, n_images=None)
    with_captions = coco_chair_task(instances, images, captions=captions, n_images=None)
    assert alone.extra_settings["captions"] is None
    assert with_captions.extra_settings["captions"] == "captions_val2014.json"
    without, _ = chair_metrics(alone, responses)
    combined, items = chair_metrics(with_captions, responses)
    assert without["chair_s"] == pytest.approx(1 / 2) and combined["chair_s"] == 0.0
    assert [i["hallucinated"] for i in items] == [[], []]


def test_eval_chair_says_which_ground_truth_it_used(tiny_store, tmp_path):  # noqa: F811 (fixture)
    instances, images = _coco(tmp_path)
    args = ("eval", "chair", "--model-version", "0", "--annotations", instances, "--images", images,
            "--max-new-tokens", "4")
    done = _invoke(tiny_store, *args)
    assert done.exit_code == 0, done.output
    assert "ground truth: instance annotations only (no --captions)" in done.output
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "A dog and a cup."}]}))
    done = _invoke(tiny_store, *args, "--captions", captions)
    assert done.exit_code == 0, done.output
    assert "ground truth: instance annotations and the captions of captions_val2014.json" in done.output
    assert "(already stored)" not in done.output  # another ground truth is another evaluation
