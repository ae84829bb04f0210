"""docs/architecture.md stays true to SAMFineTuneLib, and the engine and the Slicer side keep their size limits."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "SAMFineTuneLib"
DOC = ROOT / "docs" / "architecture.md"


def named_in_doc():
    """Every SAMFineTuneLib module (path ending .py) or package (path ending /) the doc names,
    as a path relative to SAMFineTuneLib; names inside a package's row count without the prefix."""
    text = DOC.read_text(encoding="utf-8")
    names = set(re.findall(r"SAMFineTuneLib/([\w/]+\.py|[\w/]+/)", text))
    packages = {n.rstrip("/") for n in names if n.endswith("/")}
    for package in packages:  # a row such as `models/registry.py` inside the models row
        names |= set(re.findall(r"`(%s/\w+\.py)`" % re.escape(package), text))
    return names


def present():
    out = set()
    for path in LIB.rglob("*.py"):
        rel = path.relative_to(LIB).as_posix()
        out.add(rel)
        if path.name == "__init__.py" and path.parent != LIB:
            out.add(path.parent.relative_to(LIB).as_posix() + "/")
    return out


def test_every_module_the_architecture_page_names_exists():
    missing = sorted(n for n in named_in_doc() if not (LIB / n).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_and_package_is_named_in_the_architecture_page():
    named = named_in_doc()
    unnamed = sorted(n for n in present() if n not in named and not n.endswith("/__init__.py"))
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"


def test_no_module_over_400_lines_and_no_function_over_60():
    too_long = []
    for path in list(LIB.rglob("*.py")) + list((ROOT / "SAMFineTune").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        if source.count("\n") > 400:
            too_long.append(f"{rel}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_the_extension_build_ships_the_engines_sub_packages():
    """The engine has sub-packages; a non-recursive glob in CMakeLists.txt would leave them out of
    the Slicer extension silently."""
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    glob = r"file\(GLOB_RECURSE SAMFineTuneLib_SCRIPTS .*\n\s*\$\{CMAKE_CURRENT_SOURCE_DIR\}/SAMFineTuneLib/\*\.py\)"
    assert re.search(glob, cmake), "CMakeLists.txt must glob SAMFineTuneLib/*.py recursively"
    assert any(p.parent != LIB for p in LIB.rglob("*.py"))


def test_no_python_line_over_120_characters():
    folders = (LIB, ROOT / "SAMFineTune", ROOT / "Testing")
    long_lines = [f"{path.relative_to(ROOT).as_posix()}:{number}"
                  for folder in folders for path in sorted(folder.rglob("*.py"))
                  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long_lines, f"lines over 120 characters: {long_lines}"
