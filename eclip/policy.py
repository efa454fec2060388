"""Static policy check of a recipe file: what a training recipe has no business doing.

A recipe is edited by a proposer (an LLM or a search) and then run by the harness, which
owns the data, the clock and the score. Whatever the recipe can reach it may eventually
game, so before it runs, its syntax tree is checked:

- imports only from ``ALLOWED_IMPORTS`` (torch and a few standard modules for maths and
  types, and the project's model and kernel modules), never ``import *``, never a private
  or forbidden part (``torch.utils._python_dispatch``, ``from torch import load``), never
  ``import eclip.X`` without ``as`` (it binds ``eclip``, the harness's package);
- no builtins that reach files, processes, the network or the interpreter's machinery
  (``FORBIDDEN_NAMES``: ``open``, ``exec``, ``eval``, the builtin ``compile`` — attribute
  ``torch.compile`` is fine —, ``__import__``, ``getattr``/``setattr``, ``globals``, …);
- no dunder names, attributes or definitions (``__init__`` and a few harmless methods
  excepted), no private ``_x`` attributes outside ``self``, no string naming a dunder and
  no format field that reads attributes (``"{0.gi_frame}"``), no string annotations
  (``typing.get_type_hints`` evaluates them);
- no ``FORBIDDEN_ATTRIBUTES`` (``torch.load``, ``torch.library``, frames, module
  re-exports such as ``dataclasses.sys``, …); attribute chains on imports are resolved, and
  one that lands in a module outside the allowed ones or in ``DENIED_MODULES`` is refused;
- no write into an imported module or class, through any binding (assignment, tuple,
  ``for`` or comprehension target, ``with … as``, ``del``) and through any name that holds
  one (``r = kernels.retrieval``); modules are not values at all. Settings under
  ``SETTINGS`` may be set, to numbers, bools or None only.

This is a list of what may not be done, and such lists leak; it is the first line of
defence. The second is structural: the harness ranks the embeddings in a process that
never imports the recipe (``eclip.harness``), so patching the ranking gains nothing.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import types
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
    # files by other names: numpy's, pathlib's, profiler traces, tensorboard and ONNX writers
    "open", "numpy", "tofile", "fromfile", "memmap", "dump", "savetxt", "loadtxt", "genfromtxt",
    "DataSource", "read_text", "read_bytes", "write_text", "write_bytes", "profiler",
    "export_chrome_trace", "tensorboard", "onnx", "model_zoo", "collect_env",
    # modules that other modules import and so expose as attributes (dataclasses.sys, …)
    "builtins", "sys", "os", "subprocess", "importlib", "io", "inspect", "shutil", "socket",
    "pathlib", "Path", "operator", "ctypes", "pickle", "marshal", "tempfile", "glob", "np",
    "signal", "threading", "urllib", "runpy", "code", "codeop", "pty", "posix",
    # frames and tracebacks: the evaluation's locals (the shuffled order, the true pairs)
    "f_locals", "f_globals", "f_builtins", "f_back", "f_code", "gi_frame", "cr_frame",
    "ag_frame", "tb_frame", "tb_next", "gi_yieldfrom",
    # process-wide changes of what torch computes: operator overrides, function and dispatch
    # modes, tensor subclasses, global module hooks, default dtypes
    "library", "overrides", "as_subclass", "set_default_dtype", "set_default_device",
    "set_default_tensor_type", "register_module_forward_hook", "register_module_forward_pre_hook",
    "register_module_full_backward_hook", "register_module_full_backward_pre_hook",
    "register_module_backward_hook", "register_module_buffer_registration_hook",
    "register_module_module_registration_hook", "register_module_parameter_registration_hook",
    # attribute writes by name (update_wrapper copies named attributes onto any object) and
    # code run from strings (string annotations are evaluated by get_type_hints)
    "update_wrapper", "wraps", "get_type_hints", "ForwardRef", "evaluate_forward_ref",
    "make_dataclass", "import_module", "load_cache_artifacts", "singledispatch", "singledispatchmethod",
    "set_submodule", "load_object", "import_submodule", "getattr_from_fqn",
})
# torch modules that run code from strings or pickles, write files, start processes or
# change what every later torch call computes: refused however they are reached
DENIED_MODULES = ("torch.utils.benchmark", "torch.utils.tensorboard", "torch.utils.collect_env",
                  "torch.utils.model_dump", "torch.utils.show_pickle", "torch.utils.file_baton",
                  "torch.utils.hipify", "torch.utils.cpp_extension", "torch.utils.model_zoo",
                  "torch.utils.data.datapipes", "torch.testing", "torch.onnx", "torch.hub",
                  "torch.package", "torch.distributed", "torch.multiprocessing", "torch.profiler",
                  "torch.autograd.profiler", "torch.library", "torch.overrides", "torch.serialization",
                  "torch.fx", "torch.export", "torch.ao", "torch.quantization")
# torch.compile(backend=f) hands f the traced graph (whose code generation can be injected)
# and options= sets compiler knobs that name executables: only these, as literals
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")
COMPILE_KEYWORDS = ("fullgraph", "dynamic", "mode", "backend", "options", "disable")
MAX_SOURCE_CHARS = 200_000  # a recipe is a page of code; far more is a way to exhaust the parser
SETTINGS = ("torch.backends.", "torch._inductor.config.", "torch._dynamo.config.")  # knobs, not code
# Modules behind the settings: importable (to set a knob), never called (their patch() and
# load_config() take strings and pickles, and some knobs name executables and folders).
SETTINGS_MODULES = ("torch._inductor.config", "torch._dynamo.config")
ANNOTATION_BUILTINS = frozenset({"int", "float", "bool", "str", "bytes", "list", "dict", "tuple", "set",
                                 "frozenset", "object", "type", "None", "complex", "slice"})
ALLOWED_DUNDER_DEFS = frozenset({"__init__", "__repr__", "__post_init__"})  # methods a recipe may define
FORMAT_FIELD = re.compile(r"\{[^{}:!]*[.\[][^{}]*\}")  # str.format's {name.attr} and {name[key]}
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


def _denied(module: str) -> bool:
    return any(module == d or module.startswith(d + ".") for d in DENIED_MODULES)


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _is_private(name: str) -> bool:
    """``_x`` but not ``__x__``; ``torch._foreach_*`` ops are public in all but name."""
    return name.startswith("_") and not _is_dunder(name) and not name.startswith("_foreach_")


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


def _in_settings(dotted: str) -> bool:
    """``dotted`` (a whole attribute chain) is a knob under SETTINGS or a settings module."""
    return dotted.startswith(SETTINGS) or dotted in SETTINGS_MODULES


def _is_super_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _flat_targets(targets) -> list[ast.AST]:
    """The names, attributes and subscripts a binding writes, through tuples, lists and stars."""
    out, stack = [], [t for t in targets if t is not None]
    while stack:
        t = stack.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            stack.extend(t.elts)
        elif isinstance(t, ast.Starred):
            stack.append(t.value)
        else:
            out.append(t)
    return out


def _bindings(node: ast.AST) -> tuple[list[ast.AST], ast.AST | None]:
    """(targets, value) of any construct that binds: assignments, ``del``, ``for`` and
    comprehension targets, ``with … as``, ``:=``; ([], None) for anything else."""
    if isinstance(node, ast.Assign):
        return _flat_targets(node.targets), node.value
    if isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
        return _flat_targets([node.target]), node.value
    if isinstance(node, ast.Delete):
        return _flat_targets(node.targets), None
    if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        return _flat_targets([node.target]), node.iter
    if isinstance(node, ast.withitem):
        return _flat_targets([node.optional_vars]), node.context_expr
    return [], None


@dataclass
class _Unimported:
    """A denied module a chain reaches, by name (the check never imports it)."""

    name: str


def _resolve(dotted: str, modules: dict):
    """The object ``a.b.c`` names when ``a`` is an imported module (``modules`` maps the
    recipe's import names to them), or None where it cannot be told without running code."""
    root, *rest = dotted.split(".")
    obj = modules.get(root)
    for part in rest:
        if isinstance(obj, _Unimported):
            return obj  # what lies beyond a denied module is denied with it
        if obj is None or part == "[]":
            return None
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                return None
            name = f"{obj.__name__}.{part}"
            if _denied(name):
                return _Unimported(name)  # refused: named, never imported into the referee
            if _is_private(part) or part in FORBIDDEN_ATTRIBUTES:
                return None  # refused by name anyway
            try:  # lazily imported submodules (torch's) are not static attributes
                obj = importlib.import_module(name)
            except Exception:
                return None
    return obj


def _import_modules(tree: ast.AST) -> dict:
    """Import name → module object for the recipe's allowed imports (importing them is
    what the recipe itself will do; an import that fails is left unresolved)."""
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
            continue
        for alias in node.names:
            if isinstance(node, ast.Import):
                full, name = (alias.name, alias.asname) if alias.asname else (alias.name.split(".")[0],) * 2
            else:
                full, name = f"{node.module}.{alias.name}", alias.asname or alias.name
            if not _allowed_module(full) and not (isinstance(node, ast.ImportFrom) and _allowed_module(node.module or "")):
                continue
            parts = full.split(".")
            if full not in SETTINGS_MODULES and (_denied(full) or any(
                    x in FORBIDDEN_ATTRIBUTES or _is_private(x) for x in parts)):
                continue  # refused anyway: never imported into the referee
            try:
                out[name] = importlib.import_module(full)
            except Exception:  # ``from torch import nn`` is a module; ``from torch import zeros`` is not
                try:
                    out[name] = inspect.getattr_static(importlib.import_module(node.module), alias.name)
                except Exception:
                    pass
    return out


def _outside(obj) -> str | None:
    """The module a resolved object belongs to when that is not one a recipe may import."""
    if isinstance(obj, _Unimported):
        return obj.name
    if isinstance(obj, types.ModuleType):
        name = obj.__name__
    elif isinstance(obj, (type, types.FunctionType)):
        name = getattr(obj, "__module__", None)
    else:
        return None
    if not isinstance(name, str) or name == "builtins" and not isinstance(obj, types.ModuleType):
        return None
    if _denied(name):
        return name
    return None if _allowed_module(name) or name in SETTINGS_MODULES else name


class _Checker:
    """One pass over a parsed recipe, collecting violations."""

    def __init__(self, tree: ast.AST):
        self.tree = tree
        self.found: list[Violation] = []
        self.imported = _imported_names(tree)
        self.modules = _import_modules(tree) if self.imported else {}
        self.parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        self.classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.aliases = self._aliases()

    def _whole_chain(self, node: ast.AST) -> ast.AST:
        """The longest attribute chain ``node`` begins (``torch._dynamo`` in ``torch._dynamo.x.y``)."""
        while isinstance(self.parents.get(node), ast.Attribute):
            node = self.parents[node]
        return node

    def add(self, node: ast.AST, message: str) -> None:
        while not hasattr(node, "lineno") and node in self.parents:  # a comprehension's clause
            node = self.parents[node]
        self.found.append(Violation(getattr(node, "lineno", 0), message))

    def _bare(self, node: ast.AST, roots: set[str]) -> bool:
        """``node`` is a name or attribute chain rooted at ``roots`` used as a value: not
        called, not the base of a longer chain."""
        if not isinstance(node, (ast.Name, ast.Attribute)) or _root_name(node) not in roots:
            return False
        parent = self.parents.get(node)
        return not (isinstance(parent, ast.Attribute) or isinstance(parent, ast.Call) and parent.func is node)

    def _holds_import(self, node: ast.AST, roots: set[str]) -> bool:
        """A bare chain that is (or may be) a module or class: writing into it patches it."""
        if not self._bare(node, roots):
            return False
        if _root_name(node) not in self.imported:
            return True
        obj = _resolve(_dotted(node), self.modules)
        return obj is None or isinstance(obj, (type, types.ModuleType))

    def _parameters(self) -> dict[str, list[str]]:
        """Function (and method) name → its parameter names, ``self``/``cls`` left out."""
        out: dict[str, list[str]] = {}
        for n in ast.walk(self.tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = n.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
                out.setdefault(n.name, []).extend(x for x in names if x not in ("self", "cls"))
        return out

    def _aliases(self) -> set[str]:
        """Names bound to a value that holds an imported module or class (``r = kernels.retrieval``,
        ``T = [torch.Tensor]``, ``for m in (torch,)``, and a parameter of the recipe's own
        function or lambda called with one): writing into them writes into the import."""
        roots, changed = set(self.imported), True
        params = self._parameters()
        while changed:
            changed = False
            for node in ast.walk(self.tree):
                targets, value = _bindings(node)
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Call):  # f(torch.Tensor): every parameter of the recipe's f
                    value = ast.Tuple(elts=[*node.args, *(k.value for k in node.keywords)], ctx=ast.Load())
                    func = node.func
                    if isinstance(func, ast.Lambda):
                        a = func.args
                        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
                    else:
                        names = params.get(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""), [])
                if value is None or not names or not any(self._holds_import(n, roots) for n in ast.walk(value)):
                    continue
                for name in names:
                    if name not in roots:
                        roots.add(name)
                        changed = True
        return roots - self.imported

    def run(self) -> list[Violation]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                self.check_import(node)
            elif isinstance(node, ast.ImportFrom):
                self.check_import_from(node)
            elif isinstance(node, ast.Name):
                self.check_name(node)
            elif isinstance(node, ast.Attribute):
                self.check_attribute(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.check_definition(node)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.check_string(node)
            elif isinstance(node, ast.Call):
                self.check_call(node)
            self.check_bindings(node)
        return sorted(self.found, key=lambda v: v.line)

    def check_string(self, node: ast.Constant) -> None:
        text = node.value
        if re.search(r"__\w+__", text) and text != "__main__":
            self.add(node, f"a string naming a dunder ({text[:40]!r}) is not allowed ({WHY})")
        elif FORMAT_FIELD.search(text):  # "{0.gi_frame.f_locals}".format(g) reads attributes by name
            self.add(node, f"a format field that reads an attribute or item ({text[:40]!r}) is not allowed ({WHY})")

    def check_module_path(self, node: ast.AST, path: str) -> None:
        if path in SETTINGS_MODULES:
            return
        for part in path.split("."):
            if part in FORBIDDEN_ATTRIBUTES or _is_private(part):
                self.add(node, f"import of '{path}' is not allowed ('{part}': {WHY})")
                return
        if _denied(path):
            self.add(node, f"import of '{path}' is not allowed ({WHY})")

    def check_import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _allowed_module(alias.name) and alias.name not in SETTINGS_MODULES:
                self.add(node, f"import of '{alias.name}' is not allowed (allowed: {', '.join(ALLOWED_IMPORTS)})")
            elif alias.name in SETTINGS_MODULES and alias.asname:
                self.add(node, f"'import {alias.name} as {alias.asname}': set its knobs by their full name")
            elif alias.name.startswith("eclip.") and not alias.asname:
                self.add(node, f"'import {alias.name}' binds 'eclip', which reaches the harness: "
                               f"use 'from eclip import {alias.name.split('.')[1]}'")
            else:
                self.check_module_path(node, alias.name)

    def check_import_from(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level:
            self.add(node, "relative imports are not allowed")
        elif any(a.name == "*" for a in node.names):
            self.add(node, f"'from {mod} import *' is not allowed")
        elif mod == "eclip":
            for alias in node.names:
                if alias.name not in ALLOWED_FROM_ECLIP:
                    self.add(node, f"import of 'eclip.{alias.name}' is not allowed")
        elif not _allowed_module(mod):
            self.add(node, f"import from '{mod}' is not allowed (allowed: {', '.join(ALLOWED_IMPORTS)})")
        else:
            self.check_module_path(node, mod)
            for alias in node.names:
                if alias.name in FORBIDDEN_ATTRIBUTES or alias.name in FORBIDDEN_NAMES or _is_private(alias.name):
                    self.add(node, f"import of '{mod}.{alias.name}' is not allowed ({WHY})")
                elif (where := _outside(self.modules.get(alias.asname or alias.name))) is not None:
                    self.add(node, f"'{mod}.{alias.name}' comes from '{where}', which recipes may not use")

    def check_name(self, node: ast.Name) -> None:
        if node.id in FORBIDDEN_NAMES:
            self.add(node, f"use of '{node.id}' is not allowed ({WHY})")
        elif node.id == "type" and not (isinstance(self.parents.get(node), ast.Call) and self.parents[node].func is node):
            self.add(node, f"'type' may only be called with one argument, not passed on ({WHY})")
        elif _is_dunder(node.id) and node.id != "__name__":
            self.add(node, f"dunder name '{node.id}' is not allowed ({WHY})")
        elif node.id in self.imported and self._bare(node, self.imported) and _outside(self.modules.get(node.id)) is None \
                and isinstance(self.modules.get(node.id), types.ModuleType):
            self.add(node, f"the module '{node.id}' used as a value is not allowed (call or read its attributes)")

    def check_attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        root = _root_name(node)
        if node.attr == "__init__" and _is_super_call(node.value):
            return  # super().__init__() in a Module subclass
        if _is_dunder(node.attr):
            self.add(node, f"dunder attribute '.{node.attr}' is not allowed ({WHY})")
        elif node.attr in FORBIDDEN_ATTRIBUTES:
            self.add(node, f"attribute '.{node.attr}' is not allowed ({WHY})")
        elif _is_private(node.attr) and root not in ("self", "cls") and not _in_settings(_dotted(self._whole_chain(node))):
            self.add(node, f"private attribute '.{node.attr}' is not allowed ({WHY})")
        elif node.attr == "compile" and not (isinstance(self.parents.get(node), ast.Call)
                                             and self.parents[node].func is node):
            self.add(node, f"'{dotted}' may only be called, not used as a value (its arguments are checked)")
        elif node.attr in ("format", "format_map") and not isinstance(node.value, ast.Constant):
            # a format string built at run time reads attributes by name ("{0.gi_" + "frame}")
            self.add(node, f"'.{node.attr}' on anything but a string literal is not allowed ({WHY})")
        elif dotted.startswith(SETTINGS[1:]) and not isinstance(node.ctx, ast.Store) and node is self._whole_chain(node):
            # the compiler configs' functions take strings and pickles: their knobs are assigned, never read
            self.add(node, f"'{dotted}' may only be assigned (a number or a bool), not read or called")
        elif root in self.imported:
            obj = _resolve(dotted, self.modules)
            if (where := _outside(obj)) is not None:
                self.add(node, f"'{dotted}' is '{where}', which recipes may not use")
            elif isinstance(obj, types.ModuleType) and self._bare(node, self.imported):
                self.add(node, f"the module '{dotted}' used as a value is not allowed (call or read its attributes)")

    def check_definition(self, node) -> None:
        if _is_dunder(node.name) and node.name not in ALLOWED_DUNDER_DEFS:
            self.add(node, f"defining '{node.name}' is not allowed ({WHY})")
        if isinstance(node, ast.ClassDef):
            return
        args = node.args
        annotated = [a.annotation for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
                     if a is not None and a.annotation is not None] + [node.returns]
        for ann in annotated:
            if ann is not None:
                self.check_annotation(ann)

    def check_annotation(self, ann: ast.AST) -> None:
        """Annotations name types: an import, a builtin type or a class of the recipe. A string,
        or a variable holding one, is evaluated as code by typing (functools.singledispatch)."""
        for n in ast.walk(ann):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                self.add(ann, f"string annotations are not allowed (typing evaluates them as code; {WHY})")
                return
            if isinstance(n, ast.Name) and n.id not in self.imported and n.id not in self.classes \
                    and n.id not in ANNOTATION_BUILTINS:
                self.add(ann, f"annotation '{n.id}' is not a type the recipe imports or defines ({WHY})")
                return

    def _plain_compile_kwargs(self, expr: ast.AST, seen: frozenset = frozenset()) -> bool:
        """``expr`` (spread with ``**`` into compile()) is a ``dict(...)`` of fullgraph, dynamic,
        mode and disable only, or a name bound only to such dicts and never changed after."""
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "dict":
            return all(k.arg in ("fullgraph", "dynamic", "mode", "disable") for k in expr.keywords) and all(
                self._plain_compile_kwargs(a, seen) for a in expr.args)
        if not isinstance(expr, ast.Name) or expr.id in seen:
            return False
        values = []
        for n in ast.walk(self.tree):
            targets, value = _bindings(n)
            for t in targets:
                if isinstance(t, ast.Name) and t.id == expr.id:
                    values.append(value if isinstance(n, ast.Assign) else None)
                elif _root_name(t) == expr.id:
                    return False  # opts["backend"] = …
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == expr.id:
                return False  # opts.update(backend=…)
        return bool(values) and all(v is not None and self._plain_compile_kwargs(v, seen | {expr.id})
                                    for v in values)

    def check_compile(self, node: ast.Call) -> None:
        """``torch.compile(fn, ...)`` / ``module.compile(...)``: literal backends and options only."""
        if len(node.args) > 1 or any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None and not self._plain_compile_kwargs(k.value) for k in node.keywords):
            self.add(node, "compile(): pass the function and keyword arguments by name (no *args; **kwargs only "
                           "of a dict(...) of fullgraph, dynamic, mode, disable)")
            return
        for k in node.keywords:
            v = k.value
            if k.arg is None:
                continue  # a plain dict, checked above
            if k.arg not in COMPILE_KEYWORDS:
                self.add(node, f"compile(): keyword '{k.arg}' is not allowed (allowed: {', '.join(COMPILE_KEYWORDS)})")
            elif k.arg == "backend" and not (isinstance(v, ast.Constant) and v.value in COMPILE_BACKENDS):
                self.add(node, f"compile(): backend must be one of {', '.join(COMPILE_BACKENDS)}, as a literal")
            elif k.arg == "options" and not (isinstance(v, ast.Dict) and all(
                    isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(val, ast.Constant)
                    and isinstance(val.value, (bool, int, float)) for key, val in zip(v.keys, v.values, strict=True))):
                self.add(node, "compile(): options must be a dict literal of numbers and bools")

    def check_call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr == "compile":
            self.check_compile(node)
        if isinstance(node.func, ast.Name) and node.func.id == "type" and (
                len(node.args) != 1 or node.keywords or isinstance(node.args[0], ast.Starred)):
            self.add(node, f"type() with other than one argument makes a class, which is not allowed ({WHY})")
        dotted = _dotted(node.func)
        if dotted.startswith(SETTINGS[1:]):  # config.patch(), load_config(): strings, pickles
            self.add(node, f"calling '{dotted}' is not allowed (set a knob to a number or a bool)")

    def check_bindings(self, node: ast.AST) -> None:
        targets, value = _bindings(node)
        if isinstance(node, ast.AnnAssign):
            self.check_annotation(node.annotation)
        for t in targets:
            if isinstance(t, ast.Name):
                continue
            dotted, root = _dotted(t), _root_name(t)
            if root is None and isinstance(t, ast.Attribute):
                self.add(node, f"assigning into an attribute of a computed value ('{dotted}') is not allowed "
                               "(bind it to a name first)")
            elif dotted.startswith(SETTINGS):
                constant = isinstance(value, ast.Constant) and not isinstance(value.value, (str, bytes)) or (
                    isinstance(value, ast.UnaryOp) and isinstance(value.operand, ast.Constant))
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and constant):
                    self.add(node, f"'{dotted}' may only be set to a number, a bool or None, "
                                   "in a plain assignment")
            elif root in self.imported or root in self.aliases:
                via = "" if root in self.imported else f", through '{root}', which holds an import"
                self.add(node, f"assigning into '{dotted}' is not allowed (it patches an imported module "
                               f"or class{via}, which the harness relies on)")


def check_source(source: str, filename: str = "recipe.py") -> list[Violation]:
    """All violations in ``source`` (empty when it passes), in line order."""
    if len(source) > MAX_SOURCE_CHARS:
        return [Violation(0, f"the recipe has {len(source):,} characters; at most {MAX_SOURCE_CHARS:,} are checked")]
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        return [Violation(e.lineno or 0, f"syntax error: {e.msg}")]
    except (RecursionError, MemoryError, ValueError) as e:  # nested past what the parser holds
        return [Violation(0, f"the recipe cannot be checked ({type(e).__name__}: nested too deeply)")]
    try:
        return _Checker(tree).run()
    except (RecursionError, MemoryError) as e:
        return [Violation(0, f"the recipe cannot be checked ({type(e).__name__}: nested too deeply)")]


def check_file(path: str | Path) -> list[Violation]:
    path = Path(path)
    return check_source(path.read_text(encoding="utf-8"), str(path))
