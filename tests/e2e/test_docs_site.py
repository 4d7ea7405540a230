"""The documentation site builds with `mkdocs build --strict`, without a warning, from the code as it is."""

from __future__ import annotations

import ast
import html
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import typer.main
from pydantic import TypeAdapter

from aetr.api.schemas import StepIn
from aetr.cli.main import app, parse_step_definitions
from aetr.client import Client
from aetr.domain.kinds import StepKind

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 60.0  # seconds; the build takes about 2 s


def mkdocs() -> list[str]:
    """The `mkdocs` installed with this interpreter (the `docs` and `test` extras)."""
    script = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[test]' (or '.[docs]')")
    return [script]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module's tests."""
    out = tmp_path_factory.mktemp("site")
    # Material prints a notice about MkDocs 2.0 on every build unless told not to: it is not about this site.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([*mkdocs(), "build", "--strict", "--site-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "mkdocs warned:\n" + "\n".join(warnings)
    return out


def text_of(site: Path, page: str) -> str:
    """A built page's article as plain text."""
    body = (site / page / "index.html").read_text(encoding="utf-8")
    article = body[body.index("<article"):body.index("</article>")]
    return html.unescape(re.sub(r"<[^>]+>", "", article))


def test_the_site_builds_strictly_with_every_page_of_the_navigation(site: Path) -> None:
    for page in ("getting-started", "concepts", "step-service", "step-kinds", "api", "cli", "client", "operations",
                 "scaling", "reliability", "performance", "performance-history", "changelog"):
        assert (site / page / "index.html").is_file(), f"{page} was not built"


def test_the_cli_reference_names_every_command_and_option_of_the_typer_app(site: Path) -> None:
    page = text_of(site, "cli")
    root = typer.main.get_command(app)

    def walk(command: object, path: str) -> None:
        assert path in page, f"the CLI reference lacks `{path}`"
        for param in getattr(command, "params", []):
            if getattr(param, "hidden", False):
                continue  # kept working for old habits (`apply -f`), not offered in --help or the reference
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert opt in page, f"the CLI reference lacks {opt} of `{path}`"
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, f"{path} {name}")

    walk(root, "aetr")


def test_the_client_reference_shows_every_public_method_with_its_docstring(site: Path) -> None:
    page = text_of(site, "client")
    for name, method in inspect.getmembers(Client, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert f"def {name}(" in page, f"the client reference lacks {name}"
        first_line = (inspect.getdoc(method) or "").splitlines()[0]
        assert html.unescape(first_line.replace("`", "")) in page.replace("`", ""), (name, first_line)


def test_the_changelog_page_is_the_changelog_file(site: Path) -> None:
    page = text_of(site, "changelog")
    headings = re.findall(r"^#+ (.+)$", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert headings
    for heading in headings:
        assert re.sub(r"[\[\]`*]", "", heading).strip() in page, heading


def imported_packages(package: Path) -> set[str]:
    """The AETR packages (or top-level modules) that the modules under `package` import, itself left out."""
    found: set[str] = set()
    for path in [package] if package.suffix == ".py" else package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found.update(n.split(".")[1] for n in names if n.startswith("aetr."))
    return found - {package.stem}


def test_each_package_imports_only_what_the_architecture_page_says() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", page, re.M))
    source = ROOT / "src" / "aetr"
    packages = {p.name for p in source.iterdir() if (p / "__init__.py").exists()} - {"ui"}
    packages |= {p.stem for p in source.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(table), f"the architecture page does not say what {sorted(packages - set(table))} import"
    for name in sorted(packages):
        said = set(re.findall(r"`(\w+)`", table[name]))
        path = source / name if (source / name).is_dir() else source / f"{name}.py"
        assert imported_packages(path) == said, (name, sorted(imported_packages(path)), sorted(said))


def test_every_test_the_docs_name_exists() -> None:
    named = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for path, names in re.findall(r"`(tests/[\w/]+\.py)((?:::\w+`(?:, `)?)*)", text):
            assert (ROOT / path).is_file(), f"{page.name} names {path}, which does not exist"
            code = (ROOT / path).read_text(encoding="utf-8")
            for name in re.findall(r"::(\w+)", names):
                named += 1
                assert re.search(rf"def {name}\(", code), f"{page.name} names {path}::{name}, which does not exist"
    assert named > 20  # the pattern still finds the references


def test_every_step_of_the_step_kinds_page_is_one_the_api_accepts() -> None:
    page = (ROOT / "docs" / "step-kinds.md").read_text(encoding="utf-8")
    adapter: TypeAdapter[Any] = TypeAdapter(StepIn)
    kinds = set()
    for block in re.findall(r"^```yaml\n(.*?)^```$", page, re.M | re.S):
        for definition in parse_step_definitions(block):
            kinds.add(adapter.validate_python(definition).kind)
    assert kinds == set(get_args(StepKind)), kinds
