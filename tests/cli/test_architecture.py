"""Each library has one home and each part its arrows (STYLE.md habit 2): an AST walk over every
import in the package.

Every import counts, also those inside functions and `importlib.import_module("...")` calls.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "mlx_engine_server"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / PACKAGE


@dataclass(frozen=True)
class SourceFile:
    relative: str  # "engine/worker.py"
    module: str  # "mlx_engine_server.engine.worker"
    imports: frozenset[str]  # absolute module names, ours resolved from relative imports


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names `from X import a, b` brings in: X, and X.a / X.b in case they are modules."""
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, node.module] if node.module else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]


def dynamic_import(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(path: Path) -> frozenset[str]:
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(resolve_from(module, is_package, node))
        elif isinstance(node, ast.Call) and (name := dynamic_import(node)):
            found.add(name)
    return frozenset(found)


def source_files() -> list[SourceFile]:
    files = [
        SourceFile(path.relative_to(PACKAGE_DIR).as_posix(), module_name(path), imports_of(path))
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    ]
    assert len(files) >= 15, f"expected the whole package under {PACKAGE_DIR}"
    return files


# Pure-text modules of a library that may also be used elsewhere: mlx-lm's tool-call parsers
# are read by our own per-family parsers (chat/parsers/, one module per family, as mlx-lm does).
EXTRA_HOMES = {"mlx_lm.tool_parsers": "chat/parsers/"}


def imports_any(source: SourceFile, roots: tuple[str, ...]) -> bool:
    return any(
        _within(name, root) and not _extra_home(source.relative, name)
        for name in source.imports
        for root in roots
    )


def _within(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _extra_home(relative: str, name: str) -> bool:
    return any(
        _within(name, module) and relative.startswith(home) for module, home in EXTRA_HOMES.items()
    )


def importers(roots: tuple[str, ...]) -> set[str]:
    return {source.relative for source in source_files() if imports_any(source, roots)}


def allowed(relative: str, homes: tuple[str, ...]) -> bool:
    return any(
        relative == home or (home.endswith("/") and relative.startswith(home)) for home in homes
    )


RULES = [
    (("mlx", "mlx_lm"), ("engine/", "models/")),
    (("mlx_vlm",), ("models/vision.py",)),
    (("PIL",), ("chat/media.py", "models/vision.py")),
    (
        ("starlette", "sse_starlette", "uvicorn"),
        (
            *("http/", "cli/serve.py", "protocols/openai/tokenize.py"),
            *("protocols/openai/routes.py", "protocols/anthropic/routes.py"),
            "protocols/responses/routes.py",
            "protocols/conversations/routes.py",
        ),
    ),
    (("llguidance",), ("engine/constraints.py", "chat/structured.py")),
    (("prometheus_client",), ("http/metrics.py",)),
    (("tqdm",), ("models/progress.py",)),
    (("click",), ("cli/main.py",)),
    (("redis",), ("state/redis.py",)),
    (("sqlite3",), ("state/sqlite.py",)),
    (("pydantic_settings",), ("cli/config.py", "cli/media_settings.py")),
]


@pytest.mark.parametrize(("libraries", "homes"), RULES, ids=[rule[0][0] for rule in RULES])
def test_each_library_has_one_home(libraries: tuple[str, ...], homes: tuple[str, ...]) -> None:
    strays = sorted(name for name in importers(libraries) if not allowed(name, homes))
    assert not strays, f"{'/'.join(libraries)} imported outside {homes}: {strays}"


def part_of(relative: str) -> str:
    """The part a file belongs to: its top folder, or its protocol's folder."""
    folders = relative.split("/")[:-1]
    if not folders:
        return relative.removesuffix(".py")
    return "/".join(folders[:2]) if folders[0] == "protocols" else folders[0]


def part_of_module(name: str) -> str | None:
    if not name.startswith(PACKAGE + "."):
        return None
    relative = name[len(PACKAGE) + 1 :].replace(".", "/")
    path = PACKAGE_DIR / relative
    if path.is_dir():
        return part_of(relative + "/__init__.py")
    if path.with_suffix(".py").is_file():
        return part_of(relative + ".py")
    return None  # a name imported from a module, not a module


PROTOCOL_IMPORTS = {"http", "pipeline", "chat", "engine", "errors", "protocols/openai", "state"}
# Which of our parts each part may import (DESIGN's boxes; LAYOUT.md 4.1). cli may import all.
ARROWS = {
    "__main__": {"cli"},
    "__init__": set(),
    "errors": set(),
    "http": {"protocols/openai", "protocols/anthropic", "protocols/responses", "pipeline"}
    | {"protocols/conversations", "chat", "engine", "errors", "state", "__init__"},
    "protocols/openai": PROTOCOL_IMPORTS,
    "protocols/anthropic": PROTOCOL_IMPORTS,
    "protocols/responses": PROTOCOL_IMPORTS,
    "protocols/conversations": PROTOCOL_IMPORTS | {"protocols/responses"},
    "pipeline": {"chat", "engine", "errors", "protocols/openai", "state"},
    "state": {"errors"},  # a leaf: the store knows no protocol, no HTTP, no engine
    "chat": {"errors", "protocols/openai"},
    "engine": {"models", "errors"},
    "models": {"engine", "errors"},
}


def part_imports() -> list[tuple[str, str, str]]:
    found = []
    for source in source_files():
        here = part_of(source.relative)
        for name in source.imports:
            there = part_of_module(name)
            if there is not None and there != here:
                found.append((source.relative, here, there))
    return found


def test_each_part_imports_only_what_its_arrows_allow() -> None:
    strays = sorted(
        f"{relative} ({here}) imports {there}"
        for relative, here, there in part_imports()
        if here != "cli" and there not in ARROWS[here]
    )
    assert not strays, "\n".join(strays)


# Outside the engine, only its public faces: the package and its messages.
ENGINE_FACES = {f"{PACKAGE}.engine", f"{PACKAGE}.engine.messages"}


def test_outside_the_engine_only_its_faces_are_imported() -> None:
    strays = sorted(
        f"{source.relative} imports {name}"
        for source in source_files()
        if part_of(source.relative) not in ("engine", "cli", "models")
        for name in source.imports
        if part_of_module(name) == "engine" and name not in ENGINE_FACES
    )
    assert not strays, strays


# The engine's front half: what the HTTP process needs to talk to an engine anywhere.
CLIENT_SIDE = (
    "engine/__init__.py",
    "engine/client.py",
    "engine/generation.py",
    "engine/messages.py",
)


@pytest.mark.parametrize("relative", CLIENT_SIDE)
def test_the_client_side_imports_only_the_client_side(relative: str) -> None:
    (source,) = [source for source in source_files() if source.relative == relative]
    ours = {name for name in source.imports if name.startswith(PACKAGE + ".")}
    allowed_modules = {f"{PACKAGE}.errors"} | {
        f"{PACKAGE}.{path.removesuffix('.py').removesuffix('/__init__').replace('/', '.')}"
        for path in CLIENT_SIDE
    }
    strays = sorted(
        name for name in ours if part_of_module(name) is not None and name not in allowed_modules
    )
    assert not strays, strays
    assert not any(_within(name, "mlx") or _within(name, "mlx_lm") for name in source.imports)


def test_importing_the_engine_package_loads_no_mlx() -> None:
    """The front's door to the engine is pure Python: the engine may live in another process."""
    probe = f"import sys, {PACKAGE}.engine; print(sorted(m for m in sys.modules if m == 'mlx' "
    probe += "or m.startswith('mlx.') or m.startswith('mlx_lm')))"
    output = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"


def test_nothing_imports_the_command_line() -> None:
    found = {
        source.relative
        for source in source_files()
        if part_of(source.relative) != "cli"
        and any(part_of_module(name) == "cli" for name in source.imports)
    }
    assert found == {"__main__.py"}


def test_the_walk_sees_the_imports_that_exist() -> None:
    """The rules above pass vacuously if the walk misses imports: check a few known ones."""
    assert "models/loader.py" in importers(("mlx",))
    assert "engine/worker.py" in importers(("mlx_lm",))
    assert "cli/serve.py" in importers(("uvicorn",))
    assert "http/sse.py" in importers(("sse_starlette",))
    assert "cli/main.py" in importers(("click",))
    assert "models/vision.py" in importers(("mlx_vlm",))  # inside a function
    assert "chat/media.py" in importers(("PIL",))
    assert "cli/config.py" in importers(("pydantic_settings",))
    (mistral,) = [source for source in source_files() if source.relative.endswith("s/mistral.py")]
    assert "mlx_lm.tool_parsers" in mistral.imports  # seen, and allowed by EXTRA_HOMES
    assert "chat/parsers/mistral.py" not in importers(("mlx_lm",))
    # main imports serve inside a function, and engine/worker.py imports `..models.loader`.
    assert "cli/main.py" in importers((f"{PACKAGE}.cli.serve",))
    assert "engine/worker.py" in importers((f"{PACKAGE}.models.loader",))
    assert ("http/app.py", "http", "pipeline") in part_imports()
    assert part_of_module(f"{PACKAGE}.engine.Engine") is None
    assert part_of_module(f"{PACKAGE}.protocols.anthropic.routes") == "protocols/anthropic"


def test_errors_imports_nothing_of_ours() -> None:
    (errors,) = [source for source in source_files() if source.relative == "errors.py"]
    ours = sorted(name for name in errors.imports if name.split(".")[0] == PACKAGE)
    assert not ours, f"errors.py must import nothing of ours: {ours}"


def test_resolving_relative_imports() -> None:
    node = ast.parse("from ..models.loader import LoadedModel").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve_from(f"{PACKAGE}.engine.worker", False, node)[0] == f"{PACKAGE}.models.loader"
    node = ast.parse("from . import engine").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert f"{PACKAGE}.engine" in resolve_from(f"{PACKAGE}.server", False, node)
    node = ast.parse("from .types import X").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve_from(f"{PACKAGE}.engine", True, node)[0] == f"{PACKAGE}.engine.types"


# STYLE.md habit 9: a module longer than this is split by responsibility (see git log for
# engine/worker.py, cli/serve.py, engine/client.py): whole functions and classes move to a
# sibling module named after what they do.
MAX_MODULE_LINES = 400
# Modules allowed past the budget, each with the reason it cannot be split. Ideally none.
LONG_MODULES: dict[str, str] = {}


def line_budget_problems(package_dir: Path, allowed_long: Mapping[str, str]) -> list[str]:
    """Modules past the budget but not allowed by name, and allowances no longer needed."""
    lines = {
        path.relative_to(package_dir).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(package_dir.rglob("*.py"))
    }
    too_long = [
        f"{relative}: {count} lines"
        for relative, count in lines.items()
        if count > MAX_MODULE_LINES and relative not in allowed_long
    ]
    unneeded = [
        f"{relative}: allowed long, has {lines.get(relative, 0)} lines"
        for relative in sorted(allowed_long)
        if lines.get(relative, 0) <= MAX_MODULE_LINES
    ]
    return too_long + unneeded


def test_every_module_stays_within_the_line_budget() -> None:
    problems = line_budget_problems(PACKAGE_DIR, LONG_MODULES)
    assert not problems, (
        f"modules over {MAX_MODULE_LINES} lines: move whole functions or classes to a sibling "
        f"module named after what they do, or list one in LONG_MODULES with why: {problems}"
    )


def test_the_line_budget_finds_a_long_module_and_a_stale_allowance(tmp_path: Path) -> None:
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES, encoding="utf-8")
    (tmp_path / "part" / "long.py").write_text("x = 1\n" * 401, encoding="utf-8")
    assert line_budget_problems(tmp_path, {}) == ["part/long.py: 401 lines"]
    assert line_budget_problems(tmp_path, {"part/long.py": "a reason"}) == []
    assert line_budget_problems(tmp_path, {"part/long.py": "why", "part/short.py": "why"}) == [
        "part/short.py: allowed long, has 400 lines"
    ]
