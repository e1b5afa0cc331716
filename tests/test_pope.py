"""POPE: question sampling under the three settings, answer parsing, metrics,
question files; and the bootstrap intervals the benchmarks report."""

import json

import numpy as np
import pytest
from PIL import Image

from csr.engine.evaluate import pope
from csr.engine.evaluate.intervals import bootstrap_interval, f1_from_counts, ratio

# A hand-made COCO-style annotation set. "e" has two objects: POPE asks only
# about images with three or more.
OBJECTS = {
    "a.jpg": {"person", "dog", "car", "bicycle"},
    "b.jpg": {"person", "dog", "frisbee"},
    "c.jpg": {"person", "car", "bus", "traffic light"},
    "d.jpg": {"cat", "couch", "tv"},
    "e.jpg": {"dog", "cat"},
}
POOL = set().union(*(OBJECTS[k] for k in "abcd" for k in [f"{k}.jpg"]))


def _pairs(questions):
    """(image, present object, absent object) in question order."""
    return [(yes.image, yes.object, no.object) for yes, no in zip(questions[::2], questions[1::2], strict=True)]


def test_images_need_three_objects_and_are_drawn_by_seed():
    assert pope.sample_images(OBJECTS, seed=0) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    two = pope.sample_images(OBJECTS, seed=0, n_images=2)
    assert len(two) == 2 and set(two) < {"a.jpg", "b.jpg", "c.jpg", "d.jpg"}
    assert two == pope.sample_images(OBJECTS, seed=0, n_images=2)
    draws = {tuple(pope.sample_images(OBJECTS, seed=s, n_images=2)) for s in range(10)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="3 or more"):
        pope.sample_images({"x": {"dog"}}, seed=0)


@pytest.mark.parametrize("setting", pope.SETTINGS)
def test_each_image_gets_three_present_and_three_absent_objects(setting):
    questions = pope.build_questions(OBJECTS, setting, seed=3)
    assert len(questions) == 4 * 6
    for image in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        mine = [q for q in questions if q.image == image]
        yes = [q.object for q in mine if q.label == "yes"]
        no = [q.object for q in mine if q.label == "no"]
        assert len(yes) == len(set(yes)) == 3 and set(yes) <= OBJECTS[image]
        assert len(no) == len(set(no)) == 3 and not set(no) & OBJECTS[image] and set(no) <= POOL
        assert [q.label for q in mine] == ["yes", "no"] * 3  # the reference interleaves them
    assert all(q.setting == setting for q in questions)


@pytest.mark.parametrize("setting", pope.SETTINGS)
def test_sampling_is_deterministic_per_seed(setting):
    assert pope.build_questions(OBJECTS, setting, seed=5) == pope.build_questions(OBJECTS, setting, seed=5)
    variants = {tuple(pope.build_questions(OBJECTS, setting, seed=s)) for s in range(8)}
    assert len(variants) > 1  # the present objects (and random negatives) follow the seed


# The same images with their objects listed (as COCO's annotations list them).
LISTED = {
    "a.jpg": ["bicycle", "car", "person", "dog"],
    "b.jpg": ["frisbee", "dog", "person"],
    "c.jpg": ["traffic light", "bus", "person", "car", "bus"],
    "d.jpg": ["tv", "cat", "couch"],
}


@pytest.mark.parametrize("setting", pope.SETTINGS)
def test_present_objects_are_the_first_three_listed_whatever_the_seed(setting):
    """The reference asks about image["objects"][:3]; csr's earlier rule drew 3 at random."""
    for seed in range(6):
        questions = pope.build_questions(LISTED, setting, seed)
        present = {image: [q.object for q in questions if q.image == image and q.label == "yes"] for image in LISTED}
        assert present == {"a.jpg": ["bicycle", "car", "person"], "b.jpg": ["frisbee", "dog", "person"],
                           "c.jpg": ["traffic light", "bus", "person"], "d.jpg": ["tv", "cat", "couch"]}
    # The earlier rule did not: some seed asks a.jpg about its dog.
    asked_dog = {seed for seed in range(12) if ("a.jpg", "dog") in
                 {(q.image, q.object) for q in pope.build_questions(OBJECTS, setting, seed) if q.label == "yes"}}
    assert asked_dog


def test_coco_pope_asks_about_objects_in_annotation_order(tmp_path):
    from csr.engine.evaluate.benchmarks import coco_pope_task

    names = ["person", "dog", "car", "bicycle", "frisbee", "bus", "cat", "tv", "couch"]
    listed = {1: ["car", "dog", "bicycle", "person"], 2: ["frisbee", "person", "dog"], 3: ["tv", "couch", "cat"]}
    annotations = [{"id": 10 * image + k, "image_id": image, "category_id": names.index(name) + 1}
                   for image, objs in listed.items() for k, name in enumerate(objs)]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png"} for i in listed],
        "annotations": annotations,
        "categories": [{"id": n + 1, "name": name} for n, name in enumerate(names)],
    }))
    images = tmp_path / "images"
    images.mkdir()
    for i in listed:
        Image.new("RGB", (4, 4), (i, 0, 0)).save(images / f"{i}.png")
    task = coco_pope_task(instances, images, settings=["popular"])
    present = [(q.image, q.object) for q in task.questions if q.label == "yes"]
    assert present == [("1", "car"), ("1", "dog"), ("1", "bicycle"), ("2", "frisbee"), ("2", "person"),
                       ("2", "dog"), ("3", "tv"), ("3", "couch"), ("3", "cat")]


def test_popular_asks_about_the_most_frequent_absent_objects():
    # Frequency over a-d: person 3, car 2, dog 2, then 1 each (ties by name):
    # bicycle, bus, cat, couch, frisbee, traffic light, tv.
    questions = pope.build_questions(OBJECTS, "popular", seed=1)
    absent = {image: {no for i, _, no in _pairs(questions) if i == image} for image in OBJECTS}
    assert absent["d.jpg"] == {"person", "car", "dog"}
    assert absent["a.jpg"] == {"bus", "cat", "couch"}
    assert absent["b.jpg"] == {"car", "bicycle", "bus"}
    assert absent["c.jpg"] == {"dog", "bicycle", "cat"}
    # and in frequency order, whatever order the present objects came in
    assert [no for i, _, no in _pairs(questions) if i == "d.jpg"] == ["person", "car", "dog"]


def test_adversarial_asks_about_what_co_occurs_with_each_present_object():
    checked = 0
    for seed in range(12):  # several orders of b's present objects
        asked = [(present, absent) for image, present, absent
                 in _pairs(pope.build_questions(OBJECTS, "adversarial", seed)) if image == "b.jpg"]
        pairs = dict(asked)
        if asked[0][0] == "frisbee":
            continue  # its random draw could take car or bicycle first
        checked += 1
        # person co-occurs with car (2) and dog (2) most; dog is in b, so car.
        assert pairs["person"] == "car"
        # dog co-occurs with person (2), then bicycle, car, frisbee (1 each, by name): bicycle.
        assert pairs["dog"] == "bicycle"
        # frisbee co-occurs only with b's own objects: a random absent object.
        assert pairs["frisbee"] in POOL - OBJECTS["b.jpg"] - {"car", "bicycle"}
    assert checked >= 3


def test_question_text_follows_the_reference_template():
    assert pope.question_text("dog") == "Is there a dog in the image?"
    assert pope.question_text("orange") == "Is there an orange in the image?"
    q = pope.build_questions({"x": {"apple", "dog", "cat"}, "y": {"bus", "car", "tv", "oven"}}, "random", 0)
    assert "Is there an apple in the image?" in {x.text for x in q}


def test_too_few_absent_objects_is_a_clear_error():
    with pytest.raises(ValueError, match="absent objects"):
        pope.build_questions({"x": {"a", "b", "c"}, "y": {"a", "b", "c", "d"}}, "random", 0)


@pytest.mark.parametrize(("answer", "parsed", "neither"), [
    ("Yes", "yes", False), ("yes", "yes", False), ("Yes, there is a dog in the image.", "yes", False),
    ("No", "no", False), ("No.", "no", False), ("no, there is none", "no", False),
    ("There is not a dog.", "no", False),
    ("Yes. But no, not really.", "yes", False),  # only the first sentence counts
    ("No. Yes!", "no", False),
    # The reference calls everything without a negative word "yes" (csr's earlier rule: unparsed, "no").
    ("There is a dog in the image.", "yes", True), ("", "yes", True), ("Nothing", "yes", True),
    ("yesterday", "yes", True), ("Not really", "yes", True),
    # It splits on single spaces and strips nothing but commas: "No!" is not the word "No"
    # (csr's earlier rule stripped the "!" and read "no").
    ("No!", "yes", True), ("No, not at all!", "no", False), ("No\nthere is none", "yes", True),
])
def test_answers_are_parsed_like_the_reference(answer, parsed, neither):
    assert pope.parse_answer(answer) == parsed == reference_evaluate_py(answer)
    assert pope.says_neither(answer) is neither


def reference_evaluate_py(text: str) -> str:
    """The answer loop of github.com/RUCAIBox/POPE evaluate.py, as written there."""
    if text.find('.') != -1:
        text = text.split('.')[0]
    text = text.replace(',', '')
    words = text.split(' ')
    if 'No' in words or 'not' in words or 'no' in words:
        return 'no'
    return 'yes'


def test_metrics_equal_a_hand_computation():
    labels = ["yes", "no", "yes", "no", "yes", "no", "yes", "no"]
    answers = ["yes", "yes", "no", "no", "yes", "no", "yes", "yes"]
    s = pope.score(labels, answers, unparsed=2)
    assert (s.tp, s.fp, s.tn, s.fn, s.unparsed, s.n) == (3, 2, 2, 1, 2, 8)
    assert s.accuracy == pytest.approx(5 / 8)
    assert s.precision == pytest.approx(3 / 5)
    assert s.recall == pytest.approx(3 / 4)
    assert s.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert s.yes_ratio == pytest.approx(5 / 8)
    never_yes = pope.score(["yes", "no"], ["no", "no"])
    assert (never_yes.precision, never_yes.f1, never_yes.yes_ratio) == (0.0, 0.0, 0.0)


def test_answers_without_yes_or_no_count_as_yes_and_are_reported():
    from csr.engine.evaluate.benchmarks import PopeTask, pope_metrics

    questions = [pope.Question("random", "i0", "Is there a dog in the image?", "yes", "dog"),
                 pope.Question("random", "i0", "Is there a cat in the image?", "no", "cat"),
                 pope.Question("random", "i1", "Is there a bus in the image?", "no", "bus")]
    task = PopeTask(dataset="hand", questions=questions, images={})
    answers = ["There is a dog.", "No!", "No"]
    metrics, items = pope_metrics(task, answers, [pope.parse_answer(a) for a in answers])
    m = metrics["random"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unparsed"]) == (1, 1, 1, 0, 2)
    assert [i["parsed"] for i in items] == ["yes", "yes", "no"]
    assert task.settings["answer_rule"] == "POPE evaluate.py"


def test_question_files_in_the_published_layout(tmp_path):
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a car in the image?",
         "label": "no"},
    ]) + "\n\n")
    questions = pope.read_question_file(path)
    assert [(q.setting, q.label) for q in questions] == [("adversarial", "yes"), ("adversarial", "no")]
    assert questions[0].text == "Is there a snowboard in the image?"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        pope.read_question_file(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: label"):
        pope.read_question_file(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not a POPE question"):
        pope.read_question_file(broken)


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    hallucinates = (rng.random(400) < 0.3).astype(float)
    counts = np.stack([hallucinates, np.ones(400)], axis=1)
    low, high = bootstrap_interval(counts, ratio(0, 1), seed=4)
    assert (low, high) == bootstrap_interval(counts, ratio(0, 1), seed=4)
    assert (low, high) != bootstrap_interval(counts, ratio(0, 1), seed=5)
    mean = hallucinates.mean()
    assert low < mean < high
    # The normal approximation of a proportion's 95 % interval: +-1.96 sqrt(p(1-p)/n).
    half = 1.96 * np.sqrt(mean * (1 - mean) / 400)
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)


def test_f1_statistic_equals_the_metric():
    # per image: tp, fp, fn
    counts = np.array([[3, 0, 0], [2, 1, 1], [1, 2, 2]], dtype=float)
    assert f1_from_counts(0, 1, 2)(counts.sum(axis=0, keepdims=True))[0] == pytest.approx(2 * 6 / (12 + 3 + 3))
    same = np.repeat(counts[:1], 5, axis=0)
    assert bootstrap_interval(same, f1_from_counts(0, 1, 2)) == (1.0, 1.0)
