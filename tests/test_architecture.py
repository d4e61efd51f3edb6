"""Each library has one home (STYLE.md habit 2): an AST walk over every import in the package.

Every import counts, also those inside functions and `importlib.import_module("...")` calls.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "mlx_engine_server"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "src" / PACKAGE


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
    (("mlx", "mlx_lm"), ("engine/", "model_manager.py", "gguf.py", "vision_model.py")),
    (("mlx_vlm",), ("vision_model.py",)),
    (("PIL",), ("chat/media.py",)),
    (
        ("starlette", "sse_starlette", "uvicorn"),
        (
            "server.py",
            "serving.py",
            "sse.py",
            "http_errors.py",
            "http_io.py",
            "guard.py",
            "request_log.py",
            "openapi.py",
            "monitoring.py",
            "metrics.py",
            "tokenizer_routes.py",
            "pipeline.py",
            "protocols/anthropic_routes.py",
            "protocols/openai_responses_routes.py",
        ),
    ),
    (("llguidance",), ("engine/constraints.py", "chat/structured.py")),
    (("prometheus_client",), ("metrics.py",)),
    (("click",), ("main.py",)),
    (("pydantic_settings",), ("config.py",)),
]


@pytest.mark.parametrize(("libraries", "homes"), RULES, ids=[rule[0][0] for rule in RULES])
def test_each_library_has_one_home(libraries: tuple[str, ...], homes: tuple[str, ...]) -> None:
    strays = sorted(name for name in importers(libraries) if not allowed(name, homes))
    assert not strays, f"{'/'.join(libraries)} imported outside {homes}: {strays}"


def test_the_walk_sees_the_imports_that_exist() -> None:
    """The rules above pass vacuously if the walk misses imports: check a few known ones."""
    assert "model_manager.py" in importers(("mlx",))
    assert "engine/worker.py" in importers(("mlx_lm",))
    assert "serving.py" in importers(("uvicorn",))
    assert "sse.py" in importers(("sse_starlette",))
    assert "main.py" in importers(("click",))
    assert "vision_model.py" in importers(("mlx_vlm",))  # inside a function
    assert "chat/media.py" in importers(("PIL",))
    assert "config.py" in importers(("pydantic_settings",))
    (mistral,) = [source for source in source_files() if source.relative.endswith("s/mistral.py")]
    assert "mlx_lm.tool_parsers" in mistral.imports  # seen, and allowed by EXTRA_HOMES
    assert "chat/parsers/mistral.py" not in importers(("mlx_lm",))
    # main imports serving inside a function, and engine/worker.py imports `..model_manager`.
    assert "main.py" in importers((f"{PACKAGE}.serving",))
    assert "engine/worker.py" in importers((f"{PACKAGE}.model_manager",))


def test_errors_imports_nothing_of_ours() -> None:
    (errors,) = [source for source in source_files() if source.relative == "errors.py"]
    ours = sorted(name for name in errors.imports if name.split(".")[0] == PACKAGE)
    assert not ours, f"errors.py must import nothing of ours: {ours}"


@pytest.mark.parametrize(
    ("target", "allowed_importers"),
    [("server", {"serving.py"}), ("serving", {"main.py"}), ("main", {"__main__.py"})],
)
def test_only_main_imports_the_entry_points(target: str, allowed_importers: set[str]) -> None:
    found = importers((f"{PACKAGE}.{target}",)) - {f"{target}.py"}
    assert found <= allowed_importers, (
        f"{target}.py imported by {sorted(found - allowed_importers)}"
    )


def test_resolving_relative_imports() -> None:
    node = ast.parse("from ..model_manager import LoadedModel").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve_from(f"{PACKAGE}.engine.worker", False, node)[0] == f"{PACKAGE}.model_manager"
    node = ast.parse("from . import engine").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert f"{PACKAGE}.engine" in resolve_from(f"{PACKAGE}.server", False, node)
    node = ast.parse("from .types import X").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve_from(f"{PACKAGE}.engine", True, node)[0] == f"{PACKAGE}.engine.types"
