"""README, docs/, config.example.json and the scripts agree with the code, in both directions.

The settings table is in docs/settings.md, the endpoints table in README.md; each is found by its
page and heading, so a table that moves must move here too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from starlette.routing import Route

from mlx_engine_server.cli.config import Settings, load_settings
from mlx_engine_server.cli.main import cli
from mlx_engine_server.engine import EngineOptions
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.http.app import create_app
from mlx_engine_server.models.loader import LoadedModel

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
SETTINGS_PAGE = DOCS / "settings.md"
CONFIG_EXAMPLE = REPO_ROOT / "config.example.json"

# Options every click command has; the README's settings table is about settings.
CLICK_BUILTIN_OPTIONS = {"--help", "--version"}
# The one row of the table that is no setting: it names the file the settings come from.
CONFIG_FLAG = "--config"


@dataclass(frozen=True)
class SettingsRow:
    flag: str  # "--max-queue", or "MODEL_PATH" for the argument
    env: str
    default: str
    field: str | None  # the Settings field, None for --config


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def doc_pages() -> list[Path]:
    """README.md and every page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def section(page: Path, title: str) -> str:
    """The text under a heading of any level, up to the next heading of the same or a higher one."""
    text = page.read_text(encoding="utf-8")
    heading = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    assert heading, f"{page.name} has no '{title}' heading"
    level = len(heading.group(1))
    rest = text[heading.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def settings_section() -> str:
    return section(SETTINGS_PAGE, "Settings")


def table_rows(section: str) -> list[list[str]]:
    """Cells of a markdown table's body rows, without their backticks."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append(cells)
    return rows[1:]  # the first is the header


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


def option_names() -> dict[str, str]:
    """Each flag's setting: `--max-queue` -> max_queue, the repeatable `--api-key` -> api_keys."""
    return {
        opt: param.name
        for param in cli.params
        if isinstance(param, click.Option) and param.name
        for opt in param.opts
    }


def readme_settings_rows() -> list[SettingsRow]:
    rows = []
    names = option_names()
    for cells in table_rows(settings_section()):
        flag, env = unquote(cells[0]), unquote(cells[1])
        if flag == CONFIG_FLAG:
            field = None
        elif flag.startswith("--"):
            field = names.get(flag, flag.removeprefix("--").replace("-", "_"))
        else:
            field = flag.lower()
        rows.append(SettingsRow(flag, env, cells[2], field))
    assert len(rows) > 10, "the settings table of docs/settings.md was not found or not parsed"
    return rows


def readme_endpoints() -> set[tuple[str, str]]:
    endpoints = set()
    for cells in table_rows(section(README, "Endpoints")):
        method, path = unquote(cells[0]).split(" ", 1)
        endpoints.add((method, normalize_path(path)))
    assert endpoints, "the README endpoints table was not found or not parsed"
    return endpoints


def normalize_path(path: str) -> str:
    """`/v1/models/{id}` and `/v1/models/{model_id:path}` are the same route."""
    return re.sub(r"\{[^}]*\}", "{}", path)


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MLX_SERVER_"):
            monkeypatch.delenv(name)


# --- settings: README table <-> click command <-> Settings --------------------------------


def cli_option_flags() -> set[str]:
    flags: set[str] = set()
    for param in cli.params:
        if isinstance(param, click.Option):
            flags.update(opt for opt in param.opts if opt.startswith("--"))
    return flags - CLICK_BUILTIN_OPTIONS


def test_every_readme_flag_is_a_cli_option() -> None:
    readme_flags = {row.flag for row in readme_settings_rows() if row.flag.startswith("--")}
    missing = readme_flags - cli_option_flags()
    assert not missing, f"README lists flags the command lacks: {sorted(missing)}"


def test_every_cli_option_is_in_the_readme_table() -> None:
    readme_flags = {row.flag for row in readme_settings_rows()}
    undocumented = cli_option_flags() - readme_flags
    assert not undocumented, f"options missing from README's table: {sorted(undocumented)}"


def test_model_path_argument_is_documented() -> None:
    arguments = [param for param in cli.params if isinstance(param, click.Argument)]
    assert [arg.human_readable_name for arg in arguments] == ["MODEL_PATH"]
    assert "MODEL_PATH" in {row.flag for row in readme_settings_rows()}


def test_help_shows_every_readme_flag() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for row in readme_settings_rows():
        assert row.flag in result.output, row.flag


def test_negative_forms_exist_for_the_boolean_flags() -> None:
    """README: the boolean flags have `--no-...` forms."""
    negatives = {
        opt
        for param in cli.params
        if isinstance(param, click.Option)
        for opt in param.secondary_opts
    }
    assert negatives == {
        "--no-strict-model-name",
        "--no-trust-remote-code",
        "--no-allow-request-overflow-policy",
        "--no-log-prompts",
        "--no-exit-on-stdin-close",
        "--no-quiet",
        "--no-allow-remote-media",
    }
    assert "`--no-...` forms" in settings_section()


def test_every_readme_env_var_is_a_settings_field() -> None:
    for row in readme_settings_rows():
        if row.field is None:
            continue
        assert row.field in Settings.model_fields, row
        assert row.env == f"MLX_SERVER_{row.field.upper()}", row


def test_every_settings_field_is_in_the_readme_table() -> None:
    documented = {row.field for row in readme_settings_rows()}
    undocumented = set(Settings.model_fields) - documented
    assert not undocumented, f"settings missing from README: {sorted(undocumented)}"


def test_one_name_per_setting_across_flag_env_and_option() -> None:
    """`--max-queue` <-> MLX_SERVER_MAX_QUEUE <-> "max_queue" <-> click's parameter name.

    A repeatable flag names one value of a plural setting: `--api-key` <-> "api_keys".
    """
    options = {
        opt: param for param in cli.params if isinstance(param, click.Option) for opt in param.opts
    }
    for row in readme_settings_rows():
        if row.field is None or not row.flag.startswith("--"):
            continue
        option = options[row.flag]
        spelled = "--" + row.field.replace("_", "-")
        assert row.flag == spelled or (option.multiple and row.flag + "s" == spelled), row
        assert option.name == row.field


def test_config_flag_and_env_var_match_readme() -> None:
    (row,) = [row for row in readme_settings_rows() if row.flag == CONFIG_FLAG]
    (option,) = [p for p in cli.params if isinstance(p, click.Option) and CONFIG_FLAG in p.opts]
    assert option.envvar == row.env


LITERAL_DEFAULT = re.compile(r"^`([^`]*)`")  # "`1073741824` (1 GiB)" is checked too


def test_readme_defaults_are_the_settings_defaults() -> None:
    defaults = Settings()
    checked = 0
    for row in readme_settings_rows():
        match = LITERAL_DEFAULT.match(row.default)
        if row.field is None or match is None:
            continue
        as_documented = Settings.model_validate({row.field: match.group(1)})
        assert getattr(as_documented, row.field) == getattr(defaults, row.field), row
        checked += 1
    assert checked >= 8


# --- config.example.json -----------------------------------------------------------------


def test_config_example_validates() -> None:
    settings = load_settings({}, CONFIG_EXAMPLE)
    assert isinstance(settings, Settings)


def test_config_example_lists_every_setting() -> None:
    keys = set(json.loads(CONFIG_EXAMPLE.read_text(encoding="utf-8")))
    assert keys == set(Settings.model_fields)


def test_config_example_shows_the_defaults() -> None:
    assert load_settings({}, CONFIG_EXAMPLE) == load_settings({})


# --- endpoints: README table <-> routes ---------------------------------------------------


def never_loaded() -> LoadedModel:
    raise AssertionError("reading routes must not load a model")


def app_routes() -> set[tuple[str, str]]:
    app = create_app(local_client(never_loaded, EngineOptions()))
    routes = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        for method in route.methods or ():
            if method != "HEAD":
                routes.add((method, normalize_path(route.path)))
    return routes


def test_every_readme_endpoint_is_a_route() -> None:
    missing = readme_endpoints() - app_routes()
    assert not missing, f"README lists endpoints the app lacks: {sorted(missing)}"


def test_every_route_is_in_the_readme() -> None:
    undocumented = app_routes() - readme_endpoints()
    assert not undocumented, f"routes missing from README: {sorted(undocumented)}"


# --- the two commands ---------------------------------------------------------------------


@pytest.mark.parametrize("script", ["run_server.sh", "run_tests.sh"])
def test_readme_commands_exist_and_are_executable(script: str) -> None:
    path = REPO_ROOT / script
    assert path.is_file()
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text(encoding="utf-8").startswith("#!")
    commands = re.findall(r"```bash\n(.*?)```", readme_text(), re.S)
    assert any(f"./{script}" in block.splitlines() for block in commands), script


def test_ci_runs_the_readme_test_command() -> None:
    ci = REPO_ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    lines = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()]
    assert "./run_tests.sh" in lines


def test_readme_example_client_exists() -> None:
    assert "examples/client.py" in readme_text()
    assert (REPO_ROOT / "examples" / "client.py").is_file()


REPO_PATH = re.compile(r"`((?:benchmarks|docs|examples|scripts|src|tests)/[^`\s]*)`")


def test_every_repository_path_in_the_docs_exists() -> None:
    """Backquoted paths from the repository root, in README.md and docs/*.md."""
    paths = [path for page in doc_pages() for path in REPO_PATH.findall(page.read_text("utf-8"))]
    assert len(paths) >= 20, "the docs' repository paths were not found"
    missing = sorted({path for path in paths if not (REPO_ROOT / path).exists()})
    assert not missing, f"the docs name paths that do not exist: {missing}"


# --- links: every relative link in README.md and docs/ reaches a file and its anchor ----------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, `-1` for repeats."""
    anchors: set[str] = set()
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for title in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def broken_link(page: Path, target: str) -> str | None:
    path_part, _, anchor = target.partition("#")
    linked = (page.parent / path_part).resolve() if path_part else page
    if not linked.exists():
        return f"{page.name}: {target} (no such file)"
    if anchor and (linked.suffix != ".md" or anchor not in heading_anchors(linked)):
        return f"{page.name}: {target} (no such heading)"
    return None


def test_every_relative_link_reaches_its_file_and_heading() -> None:
    links = [(page, target) for page in doc_pages() for target in relative_links(page)]
    assert len(links) >= 30, "the docs' links were not found"
    broken = [problem for page, target in links if (problem := broken_link(page, target))]
    assert not broken, broken


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n## Two words\n", encoding="utf-8")
    assert broken_link(page, "#two-words") is None
    assert broken_link(page, "page.md#a-page") is None
    assert broken_link(page, "#three-words") is not None
    assert broken_link(page, "other.md") is not None


def test_every_docs_page_is_in_the_table_of_contents() -> None:
    index = DOCS / "README.md"
    listed = {target.partition("#")[0] for target in relative_links(index)}
    pages = {page.name for page in DOCS.glob("*.md")} - {index.name}
    assert pages <= listed, f"pages missing from docs/README.md: {sorted(pages - listed)}"
