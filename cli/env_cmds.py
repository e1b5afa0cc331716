"""`csr env` (what a bug report needs) and `csr config show` (the settings a
command would run with), as `transformers env`, `accelerate env` and
`accelerate config` do."""

from __future__ import annotations

import os
import platform
import tomllib
from importlib import metadata

import tomli_w
import typer

import csr
from csr.cli.context import CliState, state
from csr.cli.output import Console, echo_json, json_option
from csr.cli.vocabulary import Preset, SelectBy, value
from csr.engine.errors import CsrError
from csr.storage import STORE_PACKAGES, Store, display_url

console = Console()
config_app = typer.Typer(help="The settings csr runs with.", no_args_is_help=True, rich_markup_mode=None)

# The packages a bug report needs: the models' and the store's (STORE_PACKAGES), then the CLI's.
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "open_clip_torch", *STORE_PACKAGES, "typer")


def store_source(st: CliState) -> str:
    """Where the store URL came from, in the order csr looks."""
    if st.db:
        return "--db"
    if os.environ.get("CSR_DATABASE_URL"):
        return "CSR_DATABASE_URL"
    path = st.settings.path
    if path.exists() and "url" in tomllib.loads(path.read_text()).get("store", {}):
        return str(path)
    return "default"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "default_device": "cuda" if cuda else "cpu",
    }


def _store(st: CliState) -> dict:
    url = st.url
    found = {"url": display_url(url), "from": store_source(st), "schema": None, "csr_schema": Store.head_revision()}
    try:
        found["schema"] = Store.revision(url) or "not a csr store"
    except Exception as exc:  # a report of the environment, not a use of the store: say why and go on
        found["schema"] = f"unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return found


def env(ctx: typer.Context, as_json: bool = json_option("The report")) -> None:
    """Versions, devices, the store and the settings file: paste it into a bug report."""
    st = state(ctx)
    report = {
        "csr": csr.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "devices": _devices(),
        "store": _store(st),
        "config_file": {"path": str(st.settings.path), "exists": st.settings.path.exists()},
    }
    if as_json:
        echo_json(report)
        return
    lines = [f"csr {report['csr']}", f"python {report['python']} on {report['platform']}"]
    lines += [f"{name} {version}" for name, version in report["packages"].items()]
    d = report["devices"]
    gpus = ", ".join(d["gpus"]) or "none"
    lines.append(f"devices: cuda {'yes' if d['cuda'] else 'no'} (CUDA {d['cuda_version'] or '-'}; GPUs: {gpus}), "
                 f"mps {'yes' if d['mps'] else 'no'}; commands default to {d['default_device']}")
    s = report["store"]
    lines.append(f"store: {s['url']} (from {s['from']}), schema {s['schema']}; csr needs {s['csr_schema']}")
    c = report["config_file"]
    lines.append(f"settings file: {c['path']}" + ("" if c["exists"] else " (not there: defaults)"))
    for line in lines:
        console.print(line, highlight=False, markup=False)


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    preset: Preset = typer.Option(None, "--preset", help="Show [generate] as `csr generate --preset` would run it."),
    lam: float = typer.Option(None, "--lambda", help="Show [generate] as `csr generate --lambda` would run it."),
    select_by: SelectBy = typer.Option(None, "--select-by", help="Show [generate] as `csr generate --select-by` would run it."),
    as_json: bool = json_option("The settings"),
) -> None:
    """The resolved settings: csr.toml with every default filled in and the flags given laid on top (TOML)."""
    from csr.engine.search.config import SearchConfig
    from csr.engine.settings_table import SettingsError
    from csr.engine.train.config import TrainConfig

    st = state(ctx)
    settings = st.settings
    generate = dict(settings.generate)
    for key, chosen in (("preset", value(preset)), ("lam", lam), ("select_by", value(select_by))):
        if chosen is not None:
            generate[key] = chosen
    try:
        search = SearchConfig.from_dict(generate).to_dict()
        train = TrainConfig.from_dict(settings.train).to_dict()
    except SettingsError as exc:
        raise CsrError(f"{settings.path}: {exc}") from exc
    resolved = {
        "store": {"url": display_url(st.url), "from": store_source(st)},
        "settings_file": {"path": str(settings.path), "exists": settings.path.exists()},
        "model": {"base": settings.model, "clip": settings.clip, "clip_pretrained": settings.clip_pretrained},
        "paths": {"models_dir": str(settings.models_path())},
        "generate": search,
        "train": train,
    }
    if as_json:
        echo_json(resolved)
        return
    # TOML has no null: an unset value is a key left out, as in csr.toml.
    plain = {name: {k: v for k, v in table.items() if v is not None} for name, table in resolved.items()}
    typer.echo(tomli_w.dumps(plain).rstrip())


def register(app: typer.Typer) -> None:
    app.command("env")(env)
    app.add_typer(config_app, name="config")
