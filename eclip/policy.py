"""Static policy check of a recipe file: what a training recipe has no business doing.

A recipe is edited by a proposer (an LLM or a search) and then run by the harness, which
owns the data, the clock and the score. Whatever the recipe can reach it may eventually
game, so before it runs, its syntax tree is checked:

- imports only from ``ALLOWED_IMPORTS`` (torch and a few standard modules for maths and
  types, and the project's model and kernel modules), never ``import *``;
- no builtins that reach files, processes, the network or the interpreter's machinery
  (``FORBIDDEN_NAMES``: ``open``, ``exec``, ``eval``, the builtin ``compile`` — attribute
  ``torch.compile`` is fine —, ``__import__``, ``getattr``/``setattr``, ``globals``, …);
- no dunder names or attributes (``x.__class__``, ``__builtins__``: the usual ways out);
- no ``FORBIDDEN_ATTRIBUTES`` such as ``torch.load``, ``torch.save``, ``torch.hub``;
- no assignment into an imported module or class (``torch.Tensor.sum = …``,
  ``kernels.retrieval_ranks = …``): the evaluation runs on those libraries.

It is a guard against accidents and casual gaming, checked on the source; the harness
also strips secrets from the environment and runs the recipe in a separate process.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

ALLOWED_IMPORTS = ("torch", "math", "functools", "dataclasses", "typing", "kernels",
                   "eclip.model", "eclip.expert", "eclip.towers", "eclip.batch")
ALLOWED_FROM_ECLIP = ("model", "expert", "towers", "batch")  # ``from eclip import model``
FORBIDDEN_NAMES = frozenset({
    "open", "exec", "eval", "compile", "__import__", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview",
    "__builtins__", "__loader__", "__spec__",
})
FORBIDDEN_ATTRIBUTES = frozenset({
    "load", "save", "hub", "package", "cpp_extension", "load_library", "classes",
    "multiprocessing", "distributed", "from_file", "system", "popen",
    # data loading is the harness's: datapipes open files and URLs, DataLoader starts processes
    "datapipes", "DataLoader", "FileOpener", "FileLister", "IoPathFileOpener", "IoPathFileLister",
})
SETTINGS = ("torch.backends.", "torch._inductor.config.", "torch._dynamo.config.")  # knobs, not code
WHY = "recipes may not reach files, processes, the network or the interpreter's machinery"


@dataclass
class Violation:
    line: int  # 1-based line of the offending node
    message: str  # what is not allowed, in a few words

    def format(self, filename: str) -> str:
        """``file:line: message``, as every report of a violation prints it."""
        return f"{filename}:{self.line}: {self.message}"


SECRET = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def scrub_environment(env: dict | None = None) -> list[str]:
    """Remove variables that look like secrets from ``env`` (default: os.environ), in
    place; returns their names. A recipe has no reason to see an API key."""
    env = os.environ if env is None else env
    gone = [k for k in env if SECRET.search(k)]
    for k in gone:
        del env[k]
    return gone


def _allowed_module(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ALLOWED_IMPORTS)


def _imported_names(tree: ast.AST) -> set[str]:
    """Names bound by imports anywhere in the file (``import torch.nn as nn`` binds nn)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root_name(node: ast.AST) -> str | None:
    """The variable at the root of ``a.b[c].d``; None for other expressions."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> str:
    """``torch.backends.cuda.matmul.allow_tf32`` for an attribute chain ('?' for the rest)."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        parts.append(node.attr if isinstance(node, ast.Attribute) else "[]")
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")
    return ".".join(reversed(parts))


def _is_super_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def check_source(source: str, filename: str = "recipe.py") -> list[Violation]:
    """All violations in ``source`` (empty when it passes), in line order."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        return [Violation(e.lineno or 0, f"syntax error: {e.msg}")]
    found: list[Violation] = []
    imported = _imported_names(tree)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _allowed_module(alias.name):
                    found.append(Violation(line, f"import of '{alias.name}' is not allowed "
                                           f"(allowed: {', '.join(ALLOWED_IMPORTS)})"))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                found.append(Violation(line, "relative imports are not allowed"))
            elif any(a.name == "*" for a in node.names):
                found.append(Violation(line, f"'from {mod} import *' is not allowed"))
            elif mod == "eclip":
                for alias in node.names:
                    if alias.name not in ALLOWED_FROM_ECLIP:
                        found.append(Violation(line, f"import of 'eclip.{alias.name}' is not allowed"))
            elif not _allowed_module(mod):
                found.append(Violation(line, f"import from '{mod}' is not allowed "
                                       f"(allowed: {', '.join(ALLOWED_IMPORTS)})"))
        elif isinstance(node, ast.Name):
            if node.id in FORBIDDEN_NAMES:
                found.append(Violation(line, f"use of '{node.id}' is not allowed ({WHY})"))
            elif node.id.startswith("__") and node.id.endswith("__") and node.id != "__name__":
                found.append(Violation(line, f"dunder name '{node.id}' is not allowed ({WHY})"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                root = _root_name(t)
                if root in imported and not isinstance(t, ast.Name) and not _dotted(t).startswith(SETTINGS):
                    found.append(Violation(line, f"assigning into '{_dotted(t)}' is not allowed (it patches "
                                           f"the imported '{root}', which the harness relies on)"))
        if isinstance(node, ast.Attribute):
            if node.attr == "__init__" and _is_super_call(node.value):
                continue  # super().__init__() in a Module subclass
            if node.attr.startswith("__") and node.attr.endswith("__"):
                found.append(Violation(line, f"dunder attribute '.{node.attr}' is not allowed ({WHY})"))
            elif node.attr in FORBIDDEN_ATTRIBUTES:
                found.append(Violation(line, f"attribute '.{node.attr}' is not allowed ({WHY})"))
    return sorted(found, key=lambda v: v.line)


def check_file(path: str | Path) -> list[Violation]:
    path = Path(path)
    return check_source(path.read_text(encoding="utf-8"), str(path))
