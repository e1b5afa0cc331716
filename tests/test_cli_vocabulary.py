"""The conventions of the tools csr's users know (git, alembic, TRL, accelerate,
huggingface-cli), checked on every command as `--help` renders it and as the
console script runs it: one option vocabulary, help without Python types,
`-h`, `--version`, `csr env`, `csr config show`, `--json` on every command with
a result, one error style (exit 2 for usage errors), width-independent output
when piped, `db current/history/upgrade`, and no old spellings (csr has no
released users to keep them for)."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path

import pytest
import typer
from PIL import Image

import csr
from csr.cli.app import app
from csr.cli.vocabulary import DType, dtype_name
from tests.cli_runner import invoke_csr

# Commands that load a model: each takes --device with the one default rule.
RUNS_A_MODEL = {"generate", "train", "iterate", "demo", "eval chair", "eval pope"}
# Concept -> the one option name; the other spellings must not be visible anywhere.
RETIRED = {"--from", "--to", "--name", "--iterations", "--versions-json", "--version", "--versions",
           "--images-count"}
CHOICES = {"--preset", "--select-by", "--format", "--dtype", "--report-to"}
# Every command with a result has --json, except sql, whose --format json is its result.
NO_JSON = {"sql"}
# What typer writes for a value when left to itself: a Python type in angle brackets.
PYTHON_TYPE = re.compile(r"<(?:str|int|float|bool|path|list|dict|tuple|Path)\b[^>]*>")


def _commands() -> list[tuple[str, object]]:
    found = []

    def walk(prefix: str, command) -> None:
        if hasattr(command, "commands"):  # a group
            for name, sub in command.commands.items():
                if not sub.hidden:
                    walk(f"{prefix} {name}".strip(), sub)
        else:
            found.append((prefix, command))

    walk("", typer.main.get_command(app))
    return found


COMMANDS = _commands()
GROUPS = ["", "db", "prompts", "eval", "config"]


def _options(command) -> list:
    return [p for p in command.params if getattr(p, "opts", None) and p.opts[0].startswith("--") and not p.hidden]


def _kind(option):
    return option.type_descriptor.annotation


def _help(*words: str) -> str:
    done = invoke_csr(*words, "--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


def one_line_error(done, code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csr: error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_command_follows_the_vocabulary(name, command):
    assert command.help, f"{name} has no help"
    rendered = _help(*name.split())
    assert "<bool>" not in rendered, f"{name} shows a flag as <bool>"
    assert not PYTHON_TYPE.search(rendered), f"{name} help shows a Python type: {PYTHON_TYPE.search(rendered)[0]}"
    usage = rendered.splitlines()[0]
    assert "[]" not in usage and "{" not in usage, f"{name}: usage line {usage!r}"
    assert invoke_csr(*name.split(), "-h").stdout == rendered, f"{name}: -h is not --help"
    for option in _options(command):
        flag = option.opts[0]
        assert option.help, f"{name} {flag} has no help text"
        assert flag not in RETIRED, f"{name} shows the retired spelling {flag}"
        if flag == "--json":
            assert option.is_flag, f"{name} --json must be a flag (machine-readable stdout)"
        if flag == "--out":
            assert _kind(option) is Path, f"{name} --out must be a path"
            assert any(kind in option.help.lower() for kind in ("path", "file", "directory")), (name, option.help)
        if flag in CHOICES:
            assert isinstance(_kind(option), type) and issubclass(_kind(option), enum.Enum), (
                f"{name} {flag} must show its choices"
            )
            assert "[" + "|".join(m.value for m in _kind(option)) + "]" in rendered, f"{name} {flag} choices"
        if _kind(option) is bool:
            assert option.is_flag, f"{name} {flag} must be a flag"
        if "iter" in flag and name != "demo":
            assert flag == "--iter", f"{name}: the iteration is --iter, not {flag}"
        if option.required:
            entry = rendered[rendered.index(f"  {flag} "):]
            entry = entry[: entry.find("\n  -", 1)]
            assert "[required]" in " ".join(entry.split()), f"{name} {flag} is required but not marked so"
    flags = {o.opts[0] for o in _options(command)}
    if name in RUNS_A_MODEL:
        assert "--device" in flags, f"{name} runs a model but has no --device"
        device = next(o for o in _options(command) if o.opts[0] == "--device")
        assert device.default is None and "cuda when a GPU is present" in device.help
    if name in {"curate", "train", "export", "iterate"}:
        assert "--pair-set" in flags
    if name in {"lineage", "eval chair", "eval pope", "eval record"}:
        assert "--model-version" in flags
    if name in {"eval chair", "eval pope"}:
        assert {"--model-versions", "--limit"} <= flags
    if name not in NO_JSON:
        assert "--json" in flags, f"{name} produces a result but has no --json"


@pytest.mark.parametrize("group", GROUPS)
def test_groups_take_h_and_show_no_python_types(group):
    rendered = _help(*group.split())
    assert not PYTHON_TYPE.search(rendered)
    assert invoke_csr(*group.split(), "-h").stdout == rendered


def test_iterate_takes_every_option_of_its_steps():
    commands = dict(COMMANDS)
    flags = {name: {o.opts[0] for o in _options(commands[name])} for name in ("generate", "curate", "train", "iterate")}
    steps = flags["generate"] | flags["train"] | (flags["curate"] - {"--default"})
    assert steps <= flags["iterate"], f"iterate lacks {sorted(steps - flags['iterate'])}"


def test_one_subset_option_name():
    commands = dict(COMMANDS)
    for name in ("generate", "eval chair", "eval pope", "iterate"):
        assert "--limit" in {o.opts[0] for o in _options(commands[name])}, name


def test_version_and_short_help():
    for flag in ("--version", "-V"):
        done = invoke_csr(flag)
        assert done.returncode == 0 and done.stdout.strip() == f"csr {csr.__version__}"
    root = invoke_csr("-h")
    assert root.returncode == 0 and "--install-completion" in root.stdout and "env" in root.stdout


def test_shell_completion_is_on(tmp_path):
    done = invoke_csr(cwd=tmp_path, env={"_CSR_COMPLETE": "complete_bash", "COMP_WORDS": "csr db cu", "COMP_CWORD": "2"})
    assert done.returncode == 0 and done.stdout.split() == ["current"], done


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    misplaced = one_line_error(invoke_csr("status", "--db", str(tmp_path / "x.db"), cwd=tmp_path), 2)
    assert "--db is a global option" in misplaced and "csr --db ... status" in misplaced
    config = one_line_error(invoke_csr("eval", "chair", "--config", "c.toml", cwd=tmp_path), 2)
    assert "--config is a global option" in config and "csr --config ... eval chair" in config
    unknown = one_line_error(invoke_csr("generate", "--iter", "1", "--bogus", cwd=tmp_path), 2)
    assert "No such option: --bogus" in unknown and "csr generate --help" in unknown
    missing = one_line_error(invoke_csr("curate", cwd=tmp_path), 2)
    assert "--iter" in missing
    bad_choice = one_line_error(invoke_csr("generate", "--iter", "1", "--dtype", "fp8", cwd=tmp_path), 2)
    assert "fp8" in bad_choice
    # an error the store or the data causes stays exit 1, in the same style
    no_store = one_line_error(invoke_csr("status", cwd=tmp_path), 1)
    assert "csr init" in no_store
    assert not (tmp_path / "csr.db").exists()


def test_dtype_takes_short_and_long_names(tmp_path):
    assert [dtype_name(DType(n)) for n in ("fp16", "float16", "bf16", "bfloat16", "fp32", "float32")] == [
        "float16", "float16", "bfloat16", "bfloat16", "float32", "float32"]
    for name in ("fp16", "bf16", "float16"):
        done = invoke_csr("generate", "--iter", "1", "--dtype", name, cwd=tmp_path)
        assert "csr init" in one_line_error(done, 1), "the dtype parsed; the missing store is what stops it"


def _store(tmp_path: Path, *init_args: str) -> Path:
    done = invoke_csr("init", "--model", "org/model", *init_args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "csr.db"


def test_env_reports_versions_devices_store_and_settings_file(tmp_path):
    _store(tmp_path)
    report = json.loads(invoke_csr("env", "--json", cwd=tmp_path).stdout)
    assert report["csr"] == csr.__version__
    assert {"torch", "transformers", "trl", "sqlalchemy"} <= set(report["packages"])
    assert report["devices"]["default_device"] in {"cpu", "cuda"}
    assert report["store"]["schema"] == report["store"]["csr_schema"]
    assert report["store"]["from"].endswith("csr.toml")
    assert report["config_file"] == {"path": str((tmp_path / "csr.toml").resolve()), "exists": True}
    text = invoke_csr("env", cwd=tmp_path / ".." / tmp_path.name)
    assert text.returncode == 0 and "store: sqlite:///" in text.stdout and "settings file:" in text.stdout
    # without a store env still reports, and says why the store is unavailable
    bare = tmp_path / "bare"
    bare.mkdir()
    alone = invoke_csr("env", cwd=bare)
    assert alone.returncode == 0 and "unavailable" in alone.stdout and "(from default)" in alone.stdout


def test_config_show_prints_the_resolved_settings(tmp_path):
    (tmp_path / "csr.toml").write_text('[train]\nlearning_rate = 1e-3\n\n[generate]\nnum_beams = 3\n')
    shown = json.loads(invoke_csr("config", "show", "--json", cwd=tmp_path).stdout)
    assert shown["train"]["learning_rate"] == pytest.approx(1e-3)
    assert shown["train"]["beta"] == 0.1, "defaults filled in"
    assert shown["generate"]["num_beams"] == 3 and shown["generate"]["preset"] == "paper"
    assert shown["store"]["from"] == "default"
    flagged = json.loads(invoke_csr("config", "show", "--lambda", "0.5", "--json", cwd=tmp_path).stdout)
    assert flagged["generate"]["lam"] == 0.5
    env = json.loads(invoke_csr("config", "show", "--json", cwd=tmp_path,
                                env={"CSR_DATABASE_URL": str(tmp_path / "elsewhere.db")}).stdout)
    assert env["store"] == {"url": f"sqlite:///{tmp_path / 'elsewhere.db'}", "from": "CSR_DATABASE_URL"}
    toml = invoke_csr("config", "show", cwd=tmp_path)
    assert toml.returncode == 0 and "[train]" in toml.stdout and "learning_rate = 0.001" in toml.stdout
    bad = (tmp_path / "bad")
    bad.mkdir()
    (bad / "csr.toml").write_text("[train]\nlr = 1\n")
    assert "lr" in one_line_error(invoke_csr("config", "show", cwd=bad), 1)


def test_init_edits_csr_toml_in_place(tmp_path):
    original = ("# my study\n[train]\nlearning_rate = 1e-3  # tuned by hand\n\n"
                "[generate]\n# fewer beams on my laptop\nnum_beams = 3\n")
    (tmp_path / "csr.toml").write_text(original)
    _store(tmp_path)
    text = (tmp_path / "csr.toml").read_text()
    for kept in ("# my study", "learning_rate = 1e-3  # tuned by hand", "# fewer beams on my laptop", "num_beams = 3"):
        assert kept in text, text
    assert 'base = "org/model"' in text and 'url = "sqlite:///csr.db"' in text


def test_init_leaves_an_environment_store_out_of_csr_toml(tmp_path):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    done = invoke_csr("init", "--model", "org/model", cwd=tmp_path, env={"CSR_DATABASE_URL": url})
    assert done.returncode == 0, done.stderr
    assert "[store]" not in (tmp_path / "csr.toml").read_text()
    assert not (tmp_path / "csr.db").exists()
    status = invoke_csr("status", cwd=tmp_path, env={"CSR_DATABASE_URL": url})
    assert status.stdout.splitlines()[0] == f"store: {url} (from CSR_DATABASE_URL)"


def test_status_names_its_store_and_is_not_cut_when_piped(tmp_path):
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    model = deep / "base-model"
    model.mkdir(parents=True)
    done = invoke_csr("init", "--model", str(model), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for columns in ("40", "200"):
        status = invoke_csr("status", cwd=tmp_path, env={"COLUMNS": columns})
        assert status.returncode == 0, status.stderr
        assert status.stdout.splitlines()[0] == f"store: sqlite:///{tmp_path / 'csr.db'} (from {tmp_path / 'csr.toml'})"
        assert str(model) in status.stdout, "a path longer than the terminal is printed whole"
    summary = json.loads(invoke_csr("status", "--json", cwd=tmp_path).stdout)
    assert summary["store"] == f"sqlite:///{tmp_path / 'csr.db'}"


def test_db_current_history_upgrade(tmp_path):
    _store(tmp_path)
    history = json.loads(invoke_csr("db", "history", "--json", cwd=tmp_path).stdout)
    current = json.loads(invoke_csr("db", "current", "--json", cwd=tmp_path).stdout)
    assert history[0]["down_revision"] is None and history[-1]["revision"] == current["head"]
    assert current["current"] == current["head"] and current["up_to_date"]
    upgraded = json.loads(invoke_csr("db", "upgrade", "--json", cwd=tmp_path).stdout)
    assert upgraded["upgraded"] is False and upgraded["after"] == current["head"]
    text = invoke_csr("db", "history", cwd=tmp_path).stdout.splitlines()
    assert text[0].startswith("<base> -> ") and len(text) == len(history)


def test_json_results_on_stdout(tmp_path):
    store = _store(tmp_path, "--json")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "1", "image": "a.png", "prompt": "Describe."}) + "\n")
    first = invoke_csr("prompts", "import", prompts, "--images", images, "--json", cwd=tmp_path)
    again = invoke_csr("prompts", "import", prompts, "--images", images, "--json", cwd=tmp_path)
    assert json.loads(first.stdout)["added"] == 1 and json.loads(again.stdout)["already_present"] == 1
    assert store.exists()


def test_hints_name_the_real_iteration(tmp_path):
    _store(tmp_path)
    done = invoke_csr("export", "--iter", "3", cwd=tmp_path)
    assert "csr curate --iter 3" in one_line_error(done, 1)


def _coco(tmp_path: Path, n: int) -> tuple[Path, Path]:
    images = tmp_path / "val"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "dog"}]}
    for i in range(1, n + 1):
        Image.new("RGB", (8, 8)).save(images / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png"})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1]})
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path / "instances.json", images


def test_eval_says_when_it_has_fewer_images_than_asked(tmp_path):
    annotations, images = _coco(tmp_path, 3)
    done = invoke_csr("eval", "chair", "--model-version", "0", "--annotations", annotations, "--images", images,
                      "--limit", "50", cwd=tmp_path)
    assert "3 image(s), fewer than the 50 asked for" in done.stdout, (done.stdout, done.stderr)
    exact = invoke_csr("eval", "chair", "--model-version", "0", "--annotations", annotations, "--images", images,
                       "--limit", "2", cwd=tmp_path)
    assert "fewer than" not in exact.stdout


def test_iteration_ranges_and_retired_spellings(tmp_path):
    db = str(tmp_path / "none.db")
    bad = invoke_csr("iterate", "--iter", "3-1", db=db)
    assert "must count up" in one_line_error(bad, 1)
    # the old spellings are gone: each is a usage error, refused before anything is opened
    for args in (["iterate", "--from", "1", "--to", "2"], ["lineage", "7"], ["lineage", "--version", "7"],
                 ["eval", "record", "--version", "0", "--benchmark", "x", "--metric", "a=1"], ["db", "revision"],
                 ["eval", "chair", "--versions", "0", "--images-count", "5", "--annotations", "x.json", "--images", "."],
                 ["curate", "--iter", "1", "--name", "x"], ["demo", "--iterations", "2"]):
        assert "deprecated" not in one_line_error(invoke_csr(*args, db=db), 2), args
    assert not (tmp_path / "none.db").exists()


def test_import_reports_its_progress(tmp_path):
    from csr.engine.io.importing import import_prompts
    from csr.storage.store import Store

    store = _store(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": "Describe."}))
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    steps: list[tuple[str, int, int]] = []
    with Store.open(f"sqlite:///{store}") as opened:
        import_prompts(opened, tmp_path / "p.jsonl", images, on_step=lambda *step: steps.append(step))
    assert steps[0] == ("records", 3, 3)
    assert [s for s in steps if s[0] == "images"] == [("images", n, 3) for n in (1, 2, 3)]
    assert steps[-2:] == [("written", 0, 3), ("written", 3, 3)]
