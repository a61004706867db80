"""The project's layering (the design card's "Layout"), read from the source: every .py file parsed, none imported.

Dependencies point one way, ``jobs -> actors, learners -> anyflow_ray core``:
  (a) the core (``anyflow_ray/`` except ``anyflow_ray/jobs/``) imports no ``ray`` and no ``deepspeed``;
  (b) ``actors/`` never imports ``learners``, ``learners/`` never imports ``actors``;
  (c) the core imports neither ``actors`` nor ``learners``;
  (d) no module takes a private name (``_foo``, not a dunder) from another module of the project, by
      ``from x import _foo`` or by ``x._foo`` on a module it imported.
An import counts wherever it is: inside a function, under ``if TYPE_CHECKING``, or as
``importlib.import_module("ray")`` with a literal name. Each rule is shown able to fail on a planted tree.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("anyflow_ray", "actors", "learners", "tests", "tools")
SKIP_DIRS = {"__pycache__", ".venv", "build", "dist", "outputs"}


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the scanned root, with "/"
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.detail}"


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name ("" for a relative import that climbs past the root)
    names: tuple[str, ...] = ()  # the names of ``from module import ...``; () for ``import module``
    asnames: tuple[str | None, ...] = ()  # their ``as`` names


def python_files(root: Path) -> list[Path]:
    files = []
    for package in PROJECT_PACKAGES:
        if not (root / package).is_dir():
            continue
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).parts
            if not any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
                files.append(path)
    return files


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(root: Path, path: Path) -> str:
    name = module_name(root, path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(root: Path, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = _package_of(root, path).split(".") if _package_of(root, path) else []
    if node.level - 1 > len(package):
        return ""
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path, path: Path, tree: ast.AST) -> list[Import]:
    """Every import in the file, at any depth, with relative imports made absolute."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(Import(node.lineno, _resolve(root, path, node), tuple(a.name for a in node.names),
                                tuple(a.asname for a in node.names)))
        elif isinstance(node, ast.Call) and _is_import_module_call(node):
            found.append(Import(node.lineno, node.args[0].value))
    return found


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return (name in ("import_module", "__import__") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _top(module: str) -> str:
    return module.split(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _in_core(rel: str) -> bool:
    return rel.startswith("anyflow_ray/") and not rel.startswith("anyflow_ray/jobs/")


def _module_aliases(root: Path, tree: ast.AST, found: list[Import]) -> dict[str, str]:
    """Local names bound to a project module: ``import a.b as m`` (m), ``import a.b`` (a), ``from a import b``
    where a/b is a module of the project (b)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in PROJECT_PACKAGES:
                    aliases[alias.asname or _top(alias.name)] = alias.name if alias.asname else _top(alias.name)
    for imp in found:
        for name, asname in zip(imp.names, imp.asnames):
            dotted = f"{imp.module}.{name}" if imp.module else name
            if _top(dotted) in PROJECT_PACKAGES and _is_module(root, dotted):
                aliases[asname or name] = dotted
    return aliases


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything but a chain of names."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return head + [node.attr] if head is not None else None
    return None


def private_attribute_uses(root: Path, tree: ast.AST, found: list[Import], own: str) -> list[tuple[int, str]]:
    """``m._foo`` where m (or m.sub) is a project module this file imported, other than the file itself."""
    aliases = _module_aliases(root, tree, found)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain = _dotted(node.value)
            if chain and chain[0] in aliases:
                target = ".".join([aliases[chain[0]], *chain[1:]])
                if target != own and _is_module(root, target):
                    uses.append((node.lineno, f"{target}.{node.attr}"))
    return uses


def check_layering(root: Path) -> list[Violation]:
    violations = []
    for path in python_files(root):
        rel = path.relative_to(root).as_posix()
        own = module_name(root, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        found = imports(root, path, tree)
        for imp in found:
            top = _top(imp.module)
            if _in_core(rel) and top in ("ray", "deepspeed"):
                violations.append(Violation(rel, imp.line, "a", f"the core imports {imp.module}"))
            if _in_core(rel) and top in ("actors", "learners"):
                violations.append(Violation(rel, imp.line, "c", f"the core imports {imp.module}"))
            for this, other in (("actors", "learners"), ("learners", "actors")):
                if rel.startswith(f"{this}/") and top == other:
                    violations.append(Violation(rel, imp.line, "b", f"{this}/ imports {imp.module}"))
            if top in PROJECT_PACKAGES and imp.module != own:
                for name in imp.names:
                    if _is_private(name):
                        violations.append(Violation(rel, imp.line, "d", f"imports {name} from {imp.module}"))
        for line, name in private_attribute_uses(root, tree, found, own):
            violations.append(Violation(rel, line, "d", f"uses the private {name}"))
    return sorted(set(violations), key=lambda v: (v.path, v.line, v.rule, v.detail))


# -- the real tree -----------------------------------------------------------------------------------------


def test_the_project_follows_its_layering():
    assert len(python_files(ROOT)) > 50  # the scan found the tree
    violations = check_layering(ROOT)
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


# -- each rule can fail ------------------------------------------------------------------------------------


def _plant(root: Path, files: dict[str, str]) -> Path:
    for package in PROJECT_PACKAGES[:3]:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            if str(parent) != ".":
                (root / parent / "__init__.py").touch()
        path.write_text(text)
    return root


def _found(violations: list[Violation]) -> set[tuple[str, int, str]]:
    return {(v.path, v.line, v.rule) for v in violations}


CLEAN = {
    "anyflow_ray/models/flow.py": "import torch\nfrom anyflow_ray.sampling import schedule\n\n\ndef _helper():\n"
                                  "    return 1\n",
    "anyflow_ray/sampling/schedule.py": "from ..models.flow import torch\n",
    "anyflow_ray/jobs/distill.py": "import ray\nimport deepspeed\nfrom actors.fleet import Fleet\n"
                                   "from learners.group import Group\n",
    "actors/fleet.py": "import ray\nfrom anyflow_ray.sampling import schedule\n\n\nclass Fleet:\n    pass\n",
    "learners/group.py": "import deepspeed\nimport ray\nfrom anyflow_ray.models.flow import __name__ as n\n\n\n"
                         "class Group:\n    pass\n",
    "tests/test_flow.py": "from anyflow_ray.models import flow\n\n\ndef test():\n    assert flow.torch\n",
}


def test_a_clean_planted_tree_passes(tmp_path):
    """Ray and DeepSpeed in jobs/, actors/ and learners/, the core from anywhere, dunders: all allowed."""
    assert check_layering(_plant(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("offence, line", [
    ("import ray\n", 1),
    ("import ray.util.metrics as m\n", 1),
    ("from ray.exceptions import GetTimeoutError\n", 1),
    ("import deepspeed\n", 1),
    ("from deepspeed.runtime import zero\n", 1),
    ("import torch\n\n\ndef f():\n    import ray\n    return ray\n", 5),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import deepspeed\n", 3),
    ("import importlib\nray = importlib.import_module('ray')\n", 2),
])
def test_rule_a_the_core_importing_ray_or_deepspeed_is_reported(tmp_path, offence, line):
    root = _plant(tmp_path, {**CLEAN, "anyflow_ray/training/ema.py": offence})
    assert _found(check_layering(root)) == {("anyflow_ray/training/ema.py", line, "a")}


def test_rule_a_covers_the_core_package_files_but_not_jobs(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "anyflow_ray/__init__.py": "x = 1\nimport ray\n",
                             "anyflow_ray/cli.py": "def main():\n    from deepspeed import init_distributed\n",
                             "anyflow_ray/jobs/sub/run.py": "import ray\n"})
    assert _found(check_layering(root)) == {("anyflow_ray/__init__.py", 2, "a"), ("anyflow_ray/cli.py", 2, "a")}


@pytest.mark.parametrize("rel, offence, line", [
    ("actors/rollout.py", "from learners.group import Group\n", 1),
    ("actors/rollout.py", "def f():\n    import learners.partitions\n", 2),
    ("learners/worker.py", "import actors\n", 1),
    ("learners/worker.py", "from actors import fleet\n", 1),
    ("learners/sub/publish.py", "from ...actors.fleet import Fleet\n", 1),
])
def test_rule_b_actors_and_learners_importing_each_other_is_reported(tmp_path, rel, offence, line):
    root = _plant(tmp_path, {**CLEAN, rel: offence})
    assert _found(check_layering(root)) == {(rel, line, "b")}


@pytest.mark.parametrize("offence, line", [
    ("from actors.fleet import Fleet\n", 1),
    ("import learners.group\n", 1),
    ("\ndef f():\n    from learners import group\n", 3),
    ("from ...learners.group import Group\n", 1),
])
def test_rule_c_the_core_importing_actors_or_learners_is_reported(tmp_path, offence, line):
    root = _plant(tmp_path, {**CLEAN, "anyflow_ray/run/storage.py": offence})
    assert _found(check_layering(root)) == {("anyflow_ray/run/storage.py", line, "c")}


def test_rule_a_and_c_together_on_one_line_report_both(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "anyflow_ray/run/storage.py": "import ray, actors.fleet\n"})
    assert _found(check_layering(root)) == {("anyflow_ray/run/storage.py", 1, "a"),
                                            ("anyflow_ray/run/storage.py", 1, "c")}


@pytest.mark.parametrize("rel, offence, line", [
    ("anyflow_ray/jobs/teacher.py", "from anyflow_ray.models.flow import _helper\n", 1),
    ("learners/worker.py", "import os\nfrom anyflow_ray.models.flow import torch, _helper as h\n", 2),
    ("anyflow_ray/models/other.py", "from .flow import _helper\n", 1),
    ("tests/test_b.py", "def test():\n    from tests.test_flow import _shared\n", 2),
    ("tests/test_b.py", "from anyflow_ray.models import flow\n\n\ndef test():\n    assert flow._helper()\n", 5),
    ("tests/test_b.py", "import anyflow_ray.models.flow as f\nx = f._helper\n", 2),
    ("tests/test_b.py", "import anyflow_ray.models.flow\nx = anyflow_ray.models.flow._helper\n", 2),
])
def test_rule_d_a_private_name_from_another_project_module_is_reported(tmp_path, rel, offence, line):
    root = _plant(tmp_path, {**CLEAN, rel: offence})
    assert _found(check_layering(root)) == {(rel, line, "d")}


def test_rule_d_allows_dunders_own_privates_and_other_libraries_privates(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "tests/test_b.py": (
        "from anyflow_ray.models.flow import __doc__\nfrom torch._dynamo import config\nimport os\n"
        "x = os._exit\nfrom anyflow_ray.models import flow\ny = flow.__name__\nclass C:\n    _a = 1\nz = C._a\n"),
        "anyflow_ray/models/flow.py": "import anyflow_ray.models.flow as me\n\n\ndef _helper():\n"
                                      "    return me._helper\n"})
    assert check_layering(root) == []


def test_a_violation_names_the_file_and_line(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "anyflow_ray/data/shards.py": "import os\n\n\ndef read():\n    import ray\n"})
    (violation,) = check_layering(root)
    assert str(violation) == "anyflow_ray/data/shards.py:5: [a] the core imports ray"


# ------------------------------------------------------------------------- the installed distribution

TOP_LEVEL = {"anyflow_ray", "actors", "learners"}


def test_the_distribution_installs_the_three_layers_and_every_folder_of_them():
    """What `pip install .` puts in site-packages: the core ``anyflow_ray`` and the two Ray layers under their
    top-level names ``actors`` and ``learners`` (DESIGN.md's layout). They are not mapped under
    ``anyflow_ray.``: a `ray job submit --working-dir .` job imports ``anyflow_ray`` from the uploaded
    working dir, whose ``anyflow_ray/`` has no ``actors/`` in it, so a mapped ``anyflow_ray.actors`` would not
    resolve on the cluster's workers. Every folder of modules is a regular package (an ``__init__.py``), so
    none is left out of a built wheel."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_packages(str(ROOT), include=find["include"]))
    assert {name.split(".")[0] for name in packages} == TOP_LEVEL
    folders = {str(p.parent.relative_to(ROOT)).replace("/", ".") for top in TOP_LEVEL
               for p in (ROOT / top).rglob("*.py")}
    assert folders <= packages, f"folders of modules without __init__.py: {sorted(folders - packages)}"


def test_actors_and_learners_are_this_projects_not_another_distributions():
    import actors
    import learners

    for package in (actors, learners):
        assert Path(package.__file__).resolve().parent.parent == ROOT, package.__file__
