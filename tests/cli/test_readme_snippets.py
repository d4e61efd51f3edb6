"""The snippets of README.md and docs/*.md that talk to the server run as printed, against a live
test server.

Which snippets run (the rule): every fenced ```bash, ```python or ```js block, and every inline
`curl ...` command, that contains README_URL, the address `./run_server.sh` serves on. The others
are not meant to run against it: setup commands, `mlx.launch` lines, fragments such as the image
request that reuses an earlier snippet's `client`. `test_every_snippet_that_calls_the_server_is_run`
keeps that rule honest: a client or curl call aimed anywhere else fails it.

Only the address changes: README_URL becomes the test server's. Python snippets run with this
interpreter (the .venv's, where the setup installs the SDKs); shell ones with `bash -o pipefail`,
curl reading a `.curlrc` that adds `--fail-with-body`, so an HTTP error status fails the snippet
as the SDKs' exceptions do; JavaScript ones with `node`, the `openai` npm package taken from npm's
global folder (`.ci/run` installs it; without node or the package they skip, saying so). The model
is the tiny random-weight one: its answers are gibberish, so each snippet must exit 0 and print
something, nothing more.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import LiveServer
from .test_cli import REPO_ROOT, clean_env

README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_URL = "http://127.0.0.1:8000"
SNIPPET_TIMEOUT_S = 120

FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE_CURL = re.compile(r"`(curl [^`\n]+)`")
# What makes a snippet talk to a server: an SDK client, or curl.
CALLS_A_SERVER = re.compile(r"\b(?:OpenAI|Anthropic)\(|^\s*curl\s|\|\s*curl\s", re.M)


@dataclass(frozen=True)
class Snippet:
    language: str  # "bash", "python" or "js"
    code: str
    line: int  # where it starts in its page
    page: str = "README.md"  # relative to the repository root

    @property
    def name(self) -> str:
        return f"{self.page}-{self.language}-line-{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in {"bash", "python", "js"} and README_URL in self.code


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def page_snippets(page: Path) -> list[Snippet]:
    """Every fenced block, then every inline curl command outside them."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(REPO_ROOT).as_posix()
    snippets = [
        Snippet(match.group(1), match.group(2), line_of(text, match.start()), name)
        for match in FENCED_BLOCK.finditer(text)
    ]
    outside = FENCED_BLOCK.sub(lambda match: "\n" * match.group(0).count("\n"), text)
    snippets += [
        Snippet("bash", match.group(1), line_of(outside, match.start()), name)
        for match in INLINE_CURL.finditer(outside)
    ]
    return snippets


def readme_snippets() -> list[Snippet]:
    return [snippet for page in PAGES for snippet in page_snippets(page)]


RUNNABLE = [snippet for snippet in readme_snippets() if snippet.runs]


def global_node_modules() -> Path | None:
    """npm's global folder when node runs and the `openai` package is installed there."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    done = subprocess.run(
        ["npm", "root", "-g"], capture_output=True, text=True, timeout=60, check=False
    )
    folder = Path(done.stdout.strip())
    return folder if done.returncode == 0 and (folder / "openai").is_dir() else None


def snippet_command(snippet: Snippet, code: str, home: Path) -> list[str]:
    if snippet.language == "python":
        return [sys.executable, "-c", code]
    if snippet.language == "js":
        modules = global_node_modules()
        if modules is None:
            pytest.skip("node or the openai npm package (npm install -g openai) is missing")
        (home / "node_modules").symlink_to(modules)  # ES modules resolve from the file's folder
        (home / "snippet.mjs").write_text(code, encoding="utf-8")
        return ["node", str(home / "snippet.mjs")]
    return ["bash", "-euo", "pipefail", "-c", code]


def run_snippet(snippet: Snippet, base_url: str, home: Path) -> subprocess.CompletedProcess[str]:
    code = snippet.code.replace(README_URL, base_url)
    command = snippet_command(snippet, code, home)
    (home / ".curlrc").write_text("fail-with-body\nshow-error\n", encoding="utf-8")
    return subprocess.run(
        command,
        cwd=home,
        env=clean_env(CURL_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[snippet.name for snippet in RUNNABLE])
def test_readme_snippet_runs_as_printed(
    snippet: Snippet, tiny_server: LiveServer, tmp_path: Path
) -> None:
    done = run_snippet(snippet, tiny_server.base_url, tmp_path)
    report = (
        f"{snippet.page} line {snippet.line}:\n{snippet.code}\nstdout: {done.stdout}\n{done.stderr}"
    )
    assert done.returncode == 0, report
    assert done.stdout.strip(), report


ASKS_FOR_PARIS = [snippet for snippet in RUNNABLE if "capital of France" in snippet.code]


@pytest.mark.smollm
@pytest.mark.parametrize(
    "snippet", ASKS_FOR_PARIS, ids=[snippet.name for snippet in ASKS_FOR_PARIS]
)
def test_readme_snippet_answers_paris_with_the_real_model(
    snippet: Snippet, smollm_server: LiveServer, tmp_path: Path
) -> None:
    """Greedy and short, as printed: the bundled SmolLM2 answers rather than rambles."""
    done = run_snippet(snippet, smollm_server.base_url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout, f"{snippet.page} line {snippet.line}: {done.stdout}"


def test_the_rule_finds_the_snippets_it_should() -> None:
    """The chat curls and the status curl, the openai chat, Anthropic and Responses snippets, the
    JavaScript one; the first four in README.md itself."""
    found = {(snippet.language, snippet.code.split("\n", 1)[0]) for snippet in RUNNABLE}
    in_readme = [snippet for snippet in RUNNABLE if snippet.page == "README.md"]
    assert {snippet.language for snippet in in_readme} == {"bash", "python", "js"}
    assert any('"stream": true' in snippet.code for snippet in in_readme)
    assert ("js", 'import OpenAI from "openai";') in found
    assert ("python", "from openai import OpenAI") in found
    assert ("python", "from anthropic import Anthropic") in found
    assert sum(snippet.language == "python" for snippet in RUNNABLE) >= 3
    assert any("/v1/chat/completions" in code for language, code in found if language == "bash")
    assert any("/v1/mlx/status" in code for language, code in found if language == "bash")


def test_every_snippet_that_calls_the_server_is_run() -> None:
    """A client or curl call in a snippet the rule skips must not aim at a server at all."""
    skipped = [s for s in readme_snippets() if not s.runs and CALLS_A_SERVER.search(s.code)]
    assert not skipped, [f"{s.page} line {s.line}: {s.code}" for s in skipped]


def failing_snippet_is_caught(code: str, tiny_server: LiveServer, tmp_path: Path) -> bool:
    done = run_snippet(Snippet("bash", code, 0), tiny_server.base_url, tmp_path)
    return done.returncode != 0


def test_an_http_error_fails_a_curl_snippet(tiny_server: LiveServer, tmp_path: Path) -> None:
    broken = f"curl {README_URL}/v1/chat/completions -d '{{\"messages\": 3}}'"
    assert failing_snippet_is_caught(broken, tiny_server, tmp_path)


# --- what the snippets and examples/ import is what the serve setup installs ----------------


def imported_modules(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


def examples_extra() -> set[str]:
    """The distributions of pyproject.toml's `examples` extra (read without tomllib: 3.10)."""
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r"^examples = \[(.*?)\]", text, re.M | re.S)
    assert match, "pyproject.toml has no `examples` extra"
    return {re.split(r"[<>=!~;\[ ]", spec)[0] for spec in re.findall(r'"([^"]+)"', match.group(1))}


def test_serve_setup_installs_what_snippets_and_examples_import() -> None:
    codes = [snippet.code for snippet in RUNNABLE if snippet.language == "python"]
    codes += [path.read_text(encoding="utf-8") for path in (REPO_ROOT / "examples").glob("*.py")]
    third_party = set().union(*map(imported_modules, codes))
    third_party -= set(sys.stdlib_module_names) | {"__future__", "mlx_engine_server"}
    assert third_party, "no SDK import found: the snippets were not read"
    # Each of these modules is published under its own name (openai, anthropic).
    assert third_party <= examples_extra()
    setup = (REPO_ROOT / "scripts" / "setup_venv.sh").read_text(encoding="utf-8")
    serve_extras = re.search(r'^extras="([^"]*)"', setup, re.M)
    assert serve_extras, "scripts/setup_venv.sh sets no extras"
    assert "examples" in serve_extras.group(1).split(",")


def test_every_example_is_run_by_a_test() -> None:
    """examples/client.py: tests/cli/test_cli.py; embedded.py: tests/models/test_embedding.py;
    nginx/nginx.conf: tests/http/test_nginx.py. A new example needs a test that runs it."""
    tests = "\n".join(
        path.read_text(encoding="utf-8") for path in (REPO_ROOT / "tests").rglob("test_*.py")
    )
    examples = [
        path
        for path in (REPO_ROOT / "examples").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert examples
    untested = [path.name for path in examples if f'"{path.name}"' not in tests]
    assert not untested, f"examples no test runs: {untested}"
