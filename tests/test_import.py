"""`csr prompts import` with real files: LLaVA JSON and JSONL, generated PNGs,
all-or-nothing on bad input, --skip-bad, idempotence; on both backends."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from csr.engine.errors import CsrError
from csr.engine.io.importing import import_prompts
from csr.storage.models import Image as ImageRow
from csr.storage.models import Prompt
from csr.storage.store import Store, create_store
from tests.cli_runner import invoke_csr
from tests.db_backends import backend_param, fingerprint, only_on, table_rows

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (120, 0, 120)]


def make_png(path: Path, index: int, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[index % len(COLOURS)]).save(path)
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def llava(record_id: str, image: str, question: str, answer: str = "It is a colour.") -> dict:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": "A follow-up question that is not the prompt."},
            {"from": "gpt", "value": "..."},
        ],
    }


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i, name in enumerate(["red.png", "green.png", "blue.png", "sub/yellow.png"]):
        make_png(root / name, i)
    make_png(tmp_path / "outside.png", 4)  # beside the images directory, not in it
    return root


@pytest.fixture
def store(head_store_url: str) -> str:
    engine, _ = create_store(head_store_url)
    engine.dispose()
    return head_store_url


@pytest.fixture
def seeded(store: str, images: Path, tmp_path: Path) -> str:
    """A store that already holds two prompts (imported in-process)."""
    first = write_json(tmp_path / "first.json", [llava("p1", "red.png", "<image>\nWhat colour?"),
                                                 llava("p2", "green.png", "Any shapes?\n<image>")])
    engine, _ = create_store(store)
    import_prompts(Store(engine), first, images)
    engine.dispose()
    return store


def prompts_in(url: str) -> dict[str, tuple[str, str, str]]:
    """external id -> (text, image rel_path, source)."""
    engine, _ = create_store(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Prompt.external_id, Prompt.text, ImageRow.rel_path, Prompt.source).join(
                    ImageRow, ImageRow.id == Prompt.image_id
                )
            )
            return {r.external_id: (r.text, r.rel_path, r.source) for r in rows}
    finally:
        engine.dispose()


def images_in(url: str) -> list:
    engine, _ = create_store(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(ImageRow).order_by(ImageRow.rel_path)).all()
    finally:
        engine.dispose()


def assert_one_line_error(done, *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("csr: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- formats -------------------------------------------------------------------------------


def test_llava_json_with_conversations_and_input(store, images, tmp_path):
    file = write_json(
        tmp_path / "llava_instruct.json",
        [
            llava("000000033471", "red.png", "<image>\nWhat are the colors of the bus in the image?"),
            llava("000000052846", "sub/yellow.png", "Where is the cat positioned?\n<image>"),
            {"id": "in-1", "image": "green.png", "input": "<image> Describe  the image.", "output": "ignored"},
            {"id": "conv-user", "image": "blue.png",
             "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "user", "value": "Count the <image> objects."}]},
        ],
    )
    done = invoke_csr("prompts", "import", file, "--images", images, db=store)
    assert done.returncode == 0, done.stderr
    assert "imported 4 prompt(s) (4 new image(s)); 0 already present; 0 skipped" in done.stdout
    assert prompts_in(store) == {
        "000000033471": ("What are the colors of the bus in the image?", "red.png", "llava_instruct.json"),
        "000000052846": ("Where is the cat positioned?", "sub/yellow.png", "llava_instruct.json"),
        "in-1": ("Describe  the image.", "green.png", "llava_instruct.json"),
        "conv-user": ("Count the objects.", "blue.png", "llava_instruct.json"),
    }
    rows = {row.rel_path: row for row in images_in(store)}
    red = images / "red.png"
    assert rows["red.png"].sha256 == hashlib.sha256(red.read_bytes()).hexdigest()
    assert rows["red.png"].size_bytes == red.stat().st_size
    assert (rows["red.png"].width, rows["red.png"].height) == (8, 6)
    assert rows["red.png"].root == str(images.resolve())


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_jsonl_with_prompt(store, images, tmp_path):
    file = write_jsonl(
        tmp_path / "extra.jsonl",
        [
            {"id": 101, "image": "red.png", "prompt": "Is the square red?"},
            "",  # blank lines are allowed
            {"id": "102", "image": "./sub/../blue.png", "prompt": "<image>What shape is it?"},
        ],
    )
    done = invoke_csr("prompts", "import", file, "--images", images, db=store)
    assert done.returncode == 0, done.stderr
    assert prompts_in(store) == {
        "101": ("Is the square red?", "red.png", "extra.jsonl"),
        "102": ("What shape is it?", "blue.png", "extra.jsonl"),
    }


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_image_prefix(store, tmp_path):
    root = tmp_path / "train2014"
    make_png(root / "COCO_train2014_000000000009.png", 0)
    make_png(root / "COCO_train2014_000000000025.png", 1)
    file = write_json(
        tmp_path / "p.json",
        [
            {"id": "9", "image": "000000000009.png", "input": "What food is this?"},
            {"id": "25", "image": "COCO_train2014_000000000025.png", "input": "Already prefixed."},
        ],
    )
    done = invoke_csr("prompts", "import", file, "--images", root, "--image-prefix", "COCO_train2014_", db=store)
    assert done.returncode == 0, done.stderr
    assert {k: v[1] for k, v in prompts_in(store).items()} == {
        "9": "COCO_train2014_000000000009.png",
        "25": "COCO_train2014_000000000025.png",
    }
    # without the prefix the same file names do not exist
    again = invoke_csr("prompts", "import", write_json(tmp_path / "q.json", [
        {"id": "9b", "image": "000000000009.png", "input": "x"}]), "--images", root, db=store)
    assert_one_line_error(again, "record 1", "image not found")


def test_images_are_recorded_by_content(store, images, tmp_path):
    """Several prompts per image (as in LLaVA data) and one picture under two names: one image row."""
    (images / "red-copy.png").write_bytes((images / "red.png").read_bytes())
    file = write_json(
        tmp_path / "p.json",
        [llava(f"q{i}", "red.png" if i % 2 else "red-copy.png", f"Question {i}?") for i in range(6)]
        + [llava("g", "green.png", "Green?")],
    )
    engine, _ = create_store(store)
    try:
        report = import_prompts(Store(engine), file, images)
    finally:
        engine.dispose()
    assert (report.added, report.new_images, report.already_present, report.skipped) == (7, 2, 0, [])
    assert len(prompts_in(store)) == 7
    assert len(images_in(store)) == 2


def test_reimport_adds_nothing(seeded, images, tmp_path):
    before = fingerprint(seeded)
    again = write_json(tmp_path / "first.json", [llava("p1", "red.png", "<image>\nWhat colour?"),
                                                 llava("p2", "green.png", "Any shapes?\n<image>")])
    done = invoke_csr("prompts", "import", again, "--images", images, db=seeded)
    assert done.returncode == 0, done.stderr
    assert "imported 0 prompt(s) (0 new image(s)); 2 already present; 0 skipped" in done.stdout
    assert fingerprint(seeded) == before
    # a file that repeats the old prompts and adds one adds exactly that one
    more = write_json(tmp_path / "more.json", [llava("p1", "red.png", "<image>\nWhat colour?"),
                                               llava("p3", "red.png", "New question?")])
    done = invoke_csr("prompts", "import", more, "--images", images, db=seeded)
    assert "imported 1 prompt(s) (0 new image(s)); 1 already present; 0 skipped" in done.stdout
    assert sorted(prompts_in(seeded)) == ["p1", "p2", "p3"]


# -- bad input: one line, the record's position, non-zero exit, the store unchanged ---------

BAD_CASES = {
    "missing image": (
        [llava("n1", "blue.png", "ok"), llava("n2", "nothere.png", "where?")],
        "record 2: image not found",
    ),
    "unreadable image": (
        [llava("n1", "blue.png", "ok"), llava("n2", "blue.png", "ok2"), llava("n3", "garbage.png", "what?")],
        "record 3: unreadable image",
    ),
    "truncated image": ([llava("n1", "truncated.png", "what?")], "record 1: unreadable image"),
    "image is a directory": ([llava("n1", "sub", "what?")], "record 1: cannot read image"),
    "missing id": ([{"image": "blue.png", "input": "no id"}], "record 1: missing or invalid 'id'"),
    "missing image field": ([{"id": "x", "input": "no image"}], "record 1: missing or invalid 'image'"),
    "no human turn": (
        [llava("n1", "blue.png", "ok"), {"id": "n2", "image": "blue.png", "conversations": [{"from": "gpt", "value": "?"}]}],
        "record 2: prompt text is missing",
    ),
    "not an object": ([llava("n1", "blue.png", "ok"), ["a", "list"]], "record 2: not a JSON object"),
    "duplicate id in the file": (
        [llava("n1", "blue.png", "first"), llava("n2", "red.png", "b"), llava("n1", "blue.png", "second")],
        "record 3: id 'n1' repeats record 1 with different content",
    ),
    "duplicate id in the store": (
        [llava("n1", "blue.png", "ok"), llava("p1", "red.png", "<image>\nWhat colour is it?")],
        "record 2: id 'p1' already exists in the store with different content",
    ),
    "same id, other image": (
        [llava("p2", "blue.png", "Any shapes?")],
        "record 1: id 'p2' already exists in the store with different content",
    ),
    "path escapes the images directory": (
        [llava("n1", "blue.png", "ok"), llava("n2", "../outside.png", "sneaky")],
        "record 2: image path '../outside.png' escapes the images directory",
    ),
    "absolute path": ([llava("n1", "/etc/hostname", "sneaky")], "record 1: image path '/etc/hostname' is absolute"),
    "symlink out of the images directory": (
        [llava("n1", "link.png", "sneaky")],
        "record 1: image path 'link.png' escapes the images directory",
    ),
}


def _bad_files(images: Path) -> None:
    (images / "garbage.png").write_bytes(b"\x00garbage, not a PNG" * 10)
    data = (images / "red.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "link.png").symlink_to(images.parent / "outside.png")


# Problems found in the file or the images directory are refused before the store is
# written, the same way on every backend; those found against the store's rows run on both.
ON_BOTH = {"missing image", "duplicate id in the store", "same id, other image", "path escapes the images directory"}


@pytest.mark.parametrize(
    ("backend", "case"),
    [backend_param(b, case, id=f"{b}-{case}") for case in BAD_CASES
     for b in (("sqlite", "postgresql") if case in ON_BOTH else ("sqlite",))],
)
def test_bad_json_record_is_refused_and_changes_nothing(backend, case, seeded, images, tmp_path):
    records, message = BAD_CASES[case]
    _bad_files(images)
    file = write_json(tmp_path / "bad.json", records)
    before = fingerprint(seeded)
    done = invoke_csr("prompts", "import", file, "--images", images, db=seeded)
    assert_one_line_error(done, message, "nothing imported", "--skip-bad")
    assert "Traceback" not in done.stderr
    assert fingerprint(seeded) == before


@pytest.mark.parametrize(
    ("backend", "lines", "message"),
    [
        backend_param(backend, [{"id": "j1", "image": "red.png", "prompt": "ok"},
                                '{"id": "j2", "image": "red.png", prompt: bad}'],
                      "record 2: not valid JSON", id=f"{backend}-bad JSON line")
        for backend in ("sqlite", "postgresql")
    ] + [
        backend_param("sqlite", [{"id": "j1", "image": "red.png", "prompt": "ok"}, "",
                                 {"image": "red.png", "prompt": "no id"}],
                      "record 3: missing or invalid 'id'", id="sqlite-missing id"),
        backend_param("sqlite", [{"id": "j1", "image": "red.png", "prompt": ""}], "record 1: empty prompt text",
                      id="sqlite-empty prompt"),
        backend_param("sqlite", [{"id": True, "image": "red.png", "prompt": "boolean id"}],
                      "record 1: missing or invalid 'id'", id="sqlite-boolean id"),
    ],
)
def test_bad_jsonl_line_is_refused_with_its_line_number(backend, lines, message, seeded, images, tmp_path):
    file = write_jsonl(tmp_path / "bad.jsonl", lines)
    before = fingerprint(seeded)
    done = invoke_csr("prompts", "import", file, "--images", images, db=seeded)
    assert_one_line_error(done, message)
    assert fingerprint(seeded) == before


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_several_problems_report_the_first_and_count_the_rest(seeded, images, tmp_path):
    file = write_json(tmp_path / "bad.json", [llava("a", "nothere.png", "?"), {"image": "x"}, llava("c", "red.png", "ok")])
    before = fingerprint(seeded)
    done = invoke_csr("prompts", "import", file, "--images", images, db=seeded)
    assert_one_line_error(done, "record 1: image not found", "(and 1 more problem(s))")
    assert fingerprint(seeded) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [("[{\"id\": \"a\",\n \"image\": ]", "not valid JSON"), (b"\xff\xfe\x00bad", "cannot read prompt file")],
    ids=["invalid JSON document", "not UTF-8"],
)
def test_unparseable_file_is_refused(content, message, sqlite_url, images, tmp_path):
    engine, _ = create_store(sqlite_url)
    engine.dispose()
    file = tmp_path / "broken.json"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    before = fingerprint(sqlite_url)
    done = invoke_csr("prompts", "import", file, "--images", images, db=sqlite_url)
    assert_one_line_error(done, message)
    assert fingerprint(sqlite_url) == before


def test_missing_file_or_images_directory(sqlite_url, images, tmp_path):
    engine, _ = create_store(sqlite_url)
    engine.dispose()
    before = fingerprint(sqlite_url)
    done = invoke_csr("prompts", "import", tmp_path / "nope.json", "--images", images, db=sqlite_url)
    assert_one_line_error(done, "prompt file not found")
    file = write_json(tmp_path / "p.json", [llava("a", "red.png", "?")])
    done = invoke_csr("prompts", "import", file, "--images", tmp_path / "no-images", db=sqlite_url)
    assert_one_line_error(done, "images directory not found")
    assert fingerprint(sqlite_url) == before


def test_skip_bad_imports_the_rest_and_lists_what_was_skipped(seeded, images, tmp_path):
    _bad_files(images)
    file = write_json(
        tmp_path / "mixed.json",
        [
            llava("g1", "blue.png", "Good one?"),
            llava("b2", "nothere.png", "Missing image?"),
            llava("g3", "sub/yellow.png", "Good two?"),
            llava("p1", "red.png", "Changed text for an existing id"),
            llava("b5", "garbage.png", "Garbage?"),
            {"image": "red.png", "input": "no id"},
            llava("p2", "green.png", "Any shapes?\n<image>"),  # already present, identical
        ],
    )
    done = invoke_csr("prompts", "import", file, "--images", images, "--skip-bad", db=seeded)
    assert done.returncode == 0, done.stderr
    assert "imported 2 prompt(s) (2 new image(s)); 1 already present; 4 skipped" in done.stdout
    skipped = done.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in skipped] == [
        "skipped record 2", "skipped record 4", "skipped record 5", "skipped record 6",
    ]
    assert "image not found" in skipped[0] and "unreadable image" in skipped[2]
    assert prompts_in(seeded) == {
        "p1": ("What colour?", "red.png", "first.json"),
        "p2": ("Any shapes?", "green.png", "first.json"),
        "g1": ("Good one?", "blue.png", "mixed.json"),
        "g3": ("Good two?", "sub/yellow.png", "mixed.json"),
    }


def test_skip_bad_with_every_record_bad_is_refused(seeded, images, tmp_path):
    """Before: exit 0 and "imported 0 prompt(s)". Now one line, exit 1, every row as it was."""
    _bad_files(images)
    file = write_json(tmp_path / "all-bad.json", [llava("b1", "nothere.png", "Missing?"), {"image": "red.png"},
                                                  llava("p1", "red.png", "Changed text for an existing id")])
    before, rows = fingerprint(seeded), table_rows(seeded)
    done = invoke_csr("prompts", "import", file, "--images", images, "--skip-bad", db=seeded)
    assert_one_line_error(done, "every record is bad (3 problem(s), the first: record 1: image not found",
                          "nothing imported")
    assert fingerprint(seeded) == before and table_rows(seeded) == rows
    # Records already in the store are not bad: nothing new to add is still a success.
    again = write_json(tmp_path / "again.json", [llava("p1", "red.png", "<image>\nWhat colour?"),
                                                 llava("b1", "nothere.png", "Missing?")])
    done = invoke_csr("prompts", "import", again, "--images", images, "--skip-bad", db=seeded)
    assert done.returncode == 0, done.stderr
    assert "imported 0 prompt(s) (0 new image(s)); 1 already present; 1 skipped" in done.stdout
    assert table_rows(seeded) == rows


def test_import_needs_an_existing_store(images, tmp_path):
    file = write_json(tmp_path / "p.json", [llava("a", "red.png", "?")])
    done = invoke_csr("prompts", "import", file, "--images", images, cwd=tmp_path)
    assert_one_line_error(done, "run `csr init`")
    assert not (tmp_path / "csr.db").exists()


def test_in_process_errors_are_user_errors(sqlite_url, images, tmp_path):
    engine, _ = create_store(sqlite_url)
    try:
        with pytest.raises(CsrError, match="prompt file not found"):
            import_prompts(Store(engine), tmp_path / "missing.json", images)
        report = import_prompts(
            Store(engine), write_json(tmp_path / "p.json", [llava("a", "nothere.png", "?"), llava("b", "red.png", "?")]),
            images, skip_bad=True,
        )
        assert report.added == 1 and [p.position for p in report.skipped] == [1]
        assert str(report.skipped[0]).startswith("record 1: image not found")
    finally:
        engine.dispose()


def test_a_concurrent_import_of_the_same_prompts_is_one_clear_error(seeded, images, tmp_path, monkeypatch):
    """Another import commits the same ids after this one looked them up: the unique
    constraint refuses the insert; the user gets an ImportRejected, and nothing is written."""
    from csr.storage.errors import ImportRejected

    # The lookup misses what the other import committed in between.
    monkeypatch.setattr(Store, "existing_prompts", lambda store, ids: {})
    file = write_json(tmp_path / "again.json", [llava("new", "blue.png", "New?"),
                                                llava("p1", "red.png", "<image>\nWhat colour?")])
    before = fingerprint(seeded)
    engine, _ = create_store(seeded)
    try:
        with pytest.raises(ImportRejected, match="at the same time; nothing imported"):
            import_prompts(Store(engine), file, images)
    finally:
        engine.dispose()
    assert fingerprint(seeded) == before
