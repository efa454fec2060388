"""Static policy check of a recipe file: what a training recipe has no business doing.

A recipe is edited by a proposer (an LLM or a search) and then run by the harness, which
owns the data, the clock and the score. Whatever the recipe can reach it may eventually
game, so before it runs, its syntax tree is checked (the lists and the chain resolution
live in ``eclip.policy_reach``, the rules on the recipe's classes in ``eclip.policy_classes``,
those on ``torch.compile`` in ``eclip.policy_compile``):

- imports only from ``ALLOWED_IMPORTS`` (torch and a few standard modules for maths and
  types, and the project's model and kernel modules), never ``import *``, never a private
  or forbidden part (``torch.utils._python_dispatch``, ``from torch import load``), never
  ``import eclip.X`` without ``as`` (it binds ``eclip``, the harness's package); a name an
  import binds names that import only (no second import, parameter or assignment of it), and
  the builtins the check takes at their word (``TRUSTED_BUILTINS``: ``property``, ``dict``, …)
  are never bound;
- no builtins that reach files, processes, the network or the interpreter's machinery
  (``FORBIDDEN_NAMES``: ``open``, ``exec``, ``eval``, the builtin ``compile`` — attribute
  ``torch.compile`` is fine —, ``__import__``, ``getattr``/``setattr``, ``globals``, …);
- no dunder names, attributes or definitions (``__init__`` and a few harmless methods
  excepted), no private ``_x`` attributes outside ``self``, no string naming a dunder and
  no format field that reads attributes (``"{0.gi_frame}"``), no string annotations
  (``typing.get_type_hints`` evaluates them);
- no ``FORBIDDEN_ATTRIBUTES`` (``torch.load``, ``torch.library``, frames, module
  re-exports such as ``dataclasses.sys``, calls that return a module such as
  ``torch.get_device_module``, an AttributeError's ``.obj``, …), also as a class pattern's
  keyword (``case object(__self__=b)`` reads ``x.__self__``), and no positional argument of
  a class pattern (``case P(f)`` reads the attribute ``P.__match_args__`` names, a dataclass
  field's or a named tuple's, on whatever an ABC's ``register`` made an instance of ``P``: a
  generator's ``gi_frame``); attribute chains on imports
  are resolved (through ``torch.backends``' modules too, which hand any name on to the
  module they wrap: ``torch.backends.types``), and one that lands in a module outside the
  allowed ones, in a part of torch outside
  ``TORCH_MODULES`` (closed by default: TorchScript compiles code from strings, and its
  C++ bindings at torch's top level read and write files) or in ``DENIED_MODULES`` is
  refused;
- attribute writes only on ``self`` (``cls``) in the recipe's own methods, and a tensor's
  ``WRITABLE_ATTRIBUTES``: a name can come to hold a class in more ways than any tracking
  follows (``type(x)``, a return value, a default argument, a ``match`` capture), so no
  write through a name is allowed; ``self`` is only ever a plain method's first parameter,
  a method is only used through an instance (a class whose methods write through their
  receiver is never a value, ``cls`` included), ``type(x)`` is only compared. Writes into
  imports are named as such, through any binding and any name that holds one
  (``r = kernels.retrieval``); modules are not values at all. Settings under ``SETTINGS``
  may be set, to numbers, bools or None only (string literals under torch.backends, whose
  knobs take names; a compiler knob's string may name an executable), and no compiler knob that writes files or
  reaches a server (``FILE_KNOB``: ``trace.enabled``, ``*_remote_cache``);
- classes only from ``class`` statements: no metaclass (``FunctionMeta``, ``typing.Type``
  as a base) or class keyword, and bases named, not computed: a class made from a name and a
  dict holds any names, dunders and annotations built from strings at run time; and the
  functions that write methods into a class (``dataclasses.dataclass``: it generates them
  as code from its fields' names) only as a decorator of the recipe's own statements, with
  no other decorator below it (``@(lambda c: torch.nn.Linear)`` would hand it an import's
  class); no ``dataclasses.Field`` (a subclass's method renames a field after a dataclass took
  it: its subclass then generates code from that name);
- UTF-8 text with no other declared encoding (``read_source``, which the loader uses too:
  the program checked is the program run), no NUL character.

This is a list of what may not be done, and such lists leak; it is the first line of
defence. The second is structural (``eclip.harness``): the recipe trains in a process that
holds the training images only, is evaluated from its checkpoint in others (images in
one, captions in another, each in a secret order; a few of each again in a third, fresh,
which checks that an embedding depends on its own input only), and the ranking runs in
the harness, which never imports it.
"""

from __future__ import annotations

import ast
import importlib
import re
import types
from dataclasses import dataclass
from pathlib import Path

from eclip.policy_classes import ClassRules
from eclip.policy_compile import CompileRules
from eclip.policy_reach import (
    ALLOWED_FROM_ECLIP,
    ALLOWED_IMPORTS,
    ANNOTATION_BUILTINS,
    CLASS_WRITERS,
    FILE_KNOB,
    FORBIDDEN_ATTRIBUTES,
    FORBIDDEN_NAMES,
    FORMAT_FIELD,
    MAX_SOURCE_CHARS,
    RECEIVERS,
    SETTINGS,
    SETTINGS_MODULES,
    TRUSTED_BUILTINS,
    WHY,
    WRITABLE_ATTRIBUTES,
    Unimported,
    allowed_module,
    arg_nodes,
    bindings,
    dotted_name,
    import_modules,
    import_paths,
    imported_names,
    in_settings,
    in_settings_module,
    is_dunder,
    is_private,
    is_super_call,
    known,
    makes_classes,
    outside,
    refused_path,
    resolve,
    root_name,
    unbound_owner,
    under,
)

# Private names a recipe may read on anything: a compiled module's original (torch.compile
# returns a wrapper; its _orig_mod is the recipe's own module), and a module's class name
PRIVATE_ANYWHERE = frozenset({"_orig_mod", "_get_name"})
# Forbidden names a recipe's own class may still use for its own attributes (self.node of a tree)
OWN_RESERVED = frozenset({"node", "storage"})
# Methods that register an attribute by its name (self.register_buffer("_mask", m))
REGISTERS = ("register_buffer", "register_parameter", "register_module", "add_module")


@dataclass
class Violation:
    line: int  # 1-based line of the offending node
    message: str  # what is not allowed, in a few words

    def format(self, filename: str) -> str:
        """``file:line: message``, as every report of a violation prints it."""
        return f"{filename}:{self.line}: {self.message}"


class _Checker(ClassRules, CompileRules):
    """One pass over a parsed recipe, collecting violations."""

    def __init__(self, tree: ast.AST):
        self.tree = tree
        self.found: list[Violation] = []
        self.imported = imported_names(tree)
        self.import_paths = import_paths(tree)
        self.modules = import_modules(tree) if self.imported else {}
        self.parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        self.classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
            n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body and isinstance(
            n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)}
        self._own: set[str] | None = None  # (_own_names' memo)
        self.aliases = self._aliases()
        self.chains = self._chains()
        self._classes(tree)

    def _is(self, node: ast.AST, names: tuple[str, ...]) -> bool:
        """``node`` (a chain on the recipe's imports) names one of the objects ``names``."""
        if root_name(node) not in self.imported:
            return False
        obj = resolve(dotted_name(node), self.modules)
        return obj is not None and any(obj is known(n) for n in names)

    def _full_name(self, node: ast.AST) -> str:
        """``node``'s chain with an import alias spelled out (``cudnn.benchmark`` →
        ``torch.backends.cudnn.benchmark``)."""
        dotted = dotted_name(node)
        root, _, rest = dotted.partition(".")
        module = self.modules.get(root)
        if isinstance(module, types.ModuleType) and module.__name__ != root:
            return f"{module.__name__}.{rest}" if rest else module.__name__
        paths = self.import_paths.get(root, {})
        if root in self.modules and not isinstance(module, types.ModuleType) and len(paths) == 1:
            # from torch.backends.cuda import matmul: an object, spelt by the one path importing it
            path = next(iter(paths))
            return f"{path}.{rest}" if rest else path
        return dotted

    def _own_private(self, node: ast.Attribute) -> bool:
        """``node`` is ``self._x``, ``cls._x`` or ``super()._x`` with ``_x`` a name no tensor
        class the recipe class's group derives from has (``_tensor_private``): a module's, an
        optimizer's or the recipe's own. A reserved name (``self.node``) must also be one the
        recipe's classes define (a method, a class attribute, an attribute set through
        ``self``/``cls`` or registered by name: ``register_buffer("node", …)``)."""
        value = node.value
        if not (isinstance(value, ast.Name) and value.id in ("self", "cls") and value.id not in self.imported
                or is_super_call(value)):
            return False
        if node.attr in OWN_RESERVED and node.attr not in self._own_names():
            return False
        return self._tensor_private(node) is None

    def _own_names(self) -> set[str]:
        """Names the recipe's classes define: methods, class attributes, attributes set
        through ``self``/``cls``, and those registered by name on ``self``."""
        if self._own is None:
            own = set()
            for cls in (c for defs in self.class_defs.values() for c in defs):
                for stmt in cls.body:
                    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        own.add(stmt.name)
                    for t in bindings(stmt)[0] if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else ():
                        if isinstance(t, ast.Name):
                            own.add(t.id)
            for n in ast.walk(self.tree):
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) \
                        and n.value.id in ("self", "cls"):
                    own.add(n.attr)  # self._x = …
                elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in REGISTERS \
                        and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
                    own.add(n.args[0].value)  # self.register_buffer("_mask", …)
            self._own = own
        return self._own

    def _tensor_private(self, node: ast.AST) -> str | None:
        """The tensor class (its chain) that a recipe class enclosing ``node``, or one related
        to it by inheritance (a mixin's method runs with the subclass's self), derives from
        and that has ``node``'s attribute; None when none has it. Tensors' and storages' own
        members are torch's machinery (a Parameter's _typed_storage().type("name") imported any
        module); a module's or an optimizer's private helpers are no such door."""
        import torch

        # the class of the method that binds the receiver: a class nested in that method
        # (class Inner: def f(me): return self._x) sees the outer method's self, not its own
        receiver = node.value.id if isinstance(node.value, ast.Name) else None  # None: super()
        cls, bound = self.parents.get(node), receiver is None
        while cls is not None and not (bound and isinstance(cls, ast.ClassDef)):
            if not bound and isinstance(cls, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) \
                    and receiver in (a.arg for a in arg_nodes(cls.args)):
                bound = True  # the next class up is the receiver's
            cls = self.parents.get(cls)
        if cls is None:
            return None
        for b in self.imported_bases(self.groups.get(cls.name, {cls.name})):
            obj = resolve(dotted_name(b), self.modules)
            for k in obj.__mro_entries__((obj,)) if hasattr(obj, "__mro_entries__") else (obj,):
                if isinstance(k, type) and (issubclass(k, torch._C.TensorBase) or issubclass(k, torch._C.StorageBase)
                                            or "Storage" in k.__name__) \
                        and any(node.attr in vars(m) for m in k.__mro__):
                    return dotted_name(b)
        return None

    def _inherited_method(self, node: ast.Attribute) -> str | None:
        """The imported class (its name) from which the recipe class ``node.value`` (or one of
        the recipe classes it derives from) inherits ``node.attr`` as a plain Python method."""
        for b in self.imported_bases(self.lineages.get(node.value.id, ())):
            if (owner := unbound_owner(f"{dotted_name(b)}.{node.attr}", self.modules)) is not None:
                return owner
        return None

    def _whole_chain(self, node: ast.AST) -> ast.AST:
        """The longest attribute chain ``node`` begins (``torch._dynamo`` in ``torch._dynamo.x.y``)."""
        while isinstance(self.parents.get(node), ast.Attribute):
            node = self.parents[node]
        return node

    def add(self, node: ast.AST, message: str) -> None:
        while not hasattr(node, "lineno") and node in self.parents:  # a comprehension's clause
            node = self.parents[node]
        self.found.append(Violation(getattr(node, "lineno", 0), message))

    def _called(self, node: ast.AST) -> bool:
        parent = self.parents.get(node)
        return isinstance(parent, ast.Call) and parent.func is node

    def _bare(self, node: ast.AST, roots: set[str]) -> bool:
        """``node`` is a name or attribute chain rooted at ``roots`` used as a value: not
        called, not the base of a longer chain."""
        if not isinstance(node, (ast.Name, ast.Attribute)) or root_name(node) not in roots:
            return False
        return not (isinstance(self.parents.get(node), ast.Attribute) or self._called(node))

    def _holds_import(self, node: ast.AST, roots: set[str]) -> bool:
        """A bare chain that is (or may be) a module or class: writing into it patches it."""
        if not self._bare(node, roots):
            return False
        if root_name(node) not in self.imported:
            return True
        obj = resolve(dotted_name(node), self.modules)
        return obj is None or isinstance(obj, (type, types.ModuleType))

    def _parameters(self) -> dict[str, list[str]]:
        """Function (and method) name → its parameter names, ``self``/``cls`` left out."""
        out: dict[str, list[str]] = {}
        for n in ast.walk(self.tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.setdefault(n.name, []).extend(a.arg for a in arg_nodes(n.args) if a.arg not in ("self", "cls"))
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
                targets, value = bindings(node)
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Call):  # f(torch.Tensor): every parameter of the recipe's f
                    value = ast.Tuple(elts=[*node.args, *(k.value for k in node.keywords)], ctx=ast.Load())
                    func = node.func
                    if isinstance(func, ast.Lambda):
                        names = [a.arg for a in arg_nodes(func.args)]
                    else:
                        names = params.get(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""), [])
                if value is None or not names or not any(self._holds_import(n, roots) for n in ast.walk(value)):
                    continue
                for name in names:
                    if name not in roots:
                        roots.add(name)
                        changed = True
        return roots - self.imported

    def _chains(self) -> dict[str, str]:
        """Names bound once in the whole file, by ``NAME = a.b.c`` on an import (``L =
        torch.autograd.graph``), mapped to the chain they hold spelt from the import: a read
        through one (``L.log.manager``) is resolved and judged as the chain it continues
        (``torch.autograd.graph.log.manager``), not left unresolved for being on a plain name."""
        bound: dict[str, list[ast.AST]] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound.setdefault(node.id, []).append(node)
            elif isinstance(node, ast.arg):
                bound.setdefault(node.arg, []).append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                for name in node.names:
                    bound.setdefault(name, []).append(node)
            elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
                bound.setdefault(node.name, []).append(node)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                bound.setdefault(node.rest, []).append(node)
        direct: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                continue
            name, value = node.targets[0].id, node.value
            if (len(bound.get(name, ())) == 1 and name not in self.imported and isinstance(value, (ast.Name, ast.Attribute))
                    and "[]" not in (dotted := dotted_name(value)) and not dotted.startswith("?")):
                direct[name] = dotted
        chains: dict[str, str] = {}
        for name in direct:  # L = torch.autograd; G = L.graph: G spelt from the import
            seen, spelt = {name}, direct[name]
            while (root := spelt.split(".")[0]) in direct and root not in seen:  # a cycle (a = b.x, b = a.x) ends
                seen.add(root)
                spelt = direct[root] + spelt[len(root):]
            if root in self.imported:
                chains[name] = spelt
        return chains

    def run(self) -> list[Violation]:
        for name, paths in import_paths(self.tree).items():
            # the check resolves every chain on a name as one import: `import dataclasses as m`
            # here and `import torch.utils.checkpoint as m` in a function would let m.types pass
            for node in list(paths.values())[1:]:
                self.add(node, f"'{name}' names two imports ({', '.join(paths)}): one name, one import")
            if name in TRUSTED_BUILTINS:
                self.add(next(iter(paths.values())), f"binding the builtin '{name}' is not allowed (the check "
                                                     "relies on what it is)")
            if name in RECEIVERS:  # import typing as cls: cls._eval_type passed as the receiver's own
                self.add(next(iter(paths.values())), f"an import named '{name}' is not allowed (it names the "
                                                     "instance of a method)")
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                self.check_import(node)
            elif isinstance(node, ast.ImportFrom):
                self.check_import_from(node)
            elif isinstance(node, ast.Name):
                self.check_name(node)
                self.check_class_writer(node)
            elif isinstance(node, ast.Attribute):
                self.check_attribute(node)
                self.check_class_writer(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.check_definition(node)
            elif isinstance(node, ast.Lambda):
                self.check_receivers(node)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.check_string(node)
            elif isinstance(node, ast.Call):
                self.check_call(node)
            elif isinstance(node, ast.MatchClass):
                self.check_match_class(node)
            if isinstance(node, ast.ExceptHandler) and node.name:
                self.rebinds(node, node.name)
                if node.name in RECEIVERS:  # except E as self: self._x would be the exception's
                    self.add(node, f"binding '{node.name}' is not allowed (it names the instance of a method)")
            elif isinstance(node, ast.pattern):  # case torch: binds torch
                for t in bindings(node)[0]:
                    self.rebinds(node, t.id)
            self.check_bindings(node)
        return sorted(self.found, key=lambda v: v.line)

    def check_string(self, node: ast.Constant) -> None:
        text = node.value
        if id(node) in self.docstrings:
            return  # read only through __doc__, which is refused
        if re.search(r"__\w+__", text) and text != "__main__":
            self.add(node, f"a string naming a dunder ({text[:40]!r}) is not allowed ({WHY})")
        elif FORMAT_FIELD.search(text):  # "{0.gi_frame.f_locals}".format(g) reads attributes by name
            self.add(node, f"a format field that reads an attribute or item ({text[:40]!r}) is not allowed ({WHY})")

    def check_module_path(self, node: ast.AST, path: str) -> None:
        if (why := refused_path(path)) is not None:
            self.add(node, f"import of '{path}' is not allowed ({why})")

    def check_import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not allowed_module(alias.name) and alias.name not in SETTINGS_MODULES:
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
        elif not allowed_module(mod):
            self.add(node, f"import from '{mod}' is not allowed (allowed: {', '.join(ALLOWED_IMPORTS)})")
        elif under(mod, SETTINGS_MODULES):
            # its patch() takes any knob as a string (cpp.cxx: an executable the compiler runs),
            # and a name bound so escapes the rules that judge the knobs' full names
            names = ", ".join(a.name for a in node.names)
            self.add(node, f"'from {mod} import {names}': set its knobs by their full name ({mod}.<knob> = …)")
        else:
            self.check_module_path(node, mod)
            for alias in node.names:
                if alias.name in FORBIDDEN_ATTRIBUTES or alias.name in FORBIDDEN_NAMES or is_private(alias.name):
                    self.add(node, f"import of '{mod}.{alias.name}' is not allowed ({WHY})")
                elif (where := outside(self.modules.get(alias.asname or alias.name))) is not None:
                    self.add(node, f"'{mod}.{alias.name}' comes from '{where}', which recipes may not use")
                elif makes_classes(self.modules.get(alias.asname or alias.name)):
                    self.add(node, f"import of '{mod}.{alias.name}' is not allowed: it makes classes (a metaclass, "
                                   f"or type by another name; {WHY})")

    def rebinds(self, node: ast.AST, name: str) -> None:
        """``name`` is bound by something other than its import (a parameter, an assignment, a
        loop): chains on it are checked as the import, so it may not name anything else."""
        if name in self.imported:
            # the line of the import too: a recipe that adds `from x import field` learns why its
            # untouched `for field in ...` lines are refused, and which of the two to rename
            at = min(n.lineno for n in import_paths(self.tree)[name].values())
            self.add(node, f"'{name}' is imported (line {at}): binding it otherwise is not allowed (chains on it are "
                           "checked as the import's); rename one of the two")
        elif name in TRUSTED_BUILTINS:  # def property(f): return lambda s, *a: f(torch.Tensor, *a)
            self.add(node, f"binding the builtin '{name}' is not allowed (the check relies on what it is: "
                           "@property keeps self, dict(...) holds compile()'s options)")

    def check_name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load) and (node.id in self.imported or node.id in TRUSTED_BUILTINS):
            self.rebinds(node, node.id)
        elif node.id in FORBIDDEN_NAMES:
            self.add(node, f"use of '{node.id}' is not allowed ({WHY})")
        elif node.id == "type" and not self._called(node):
            self.add(node, f"'type' may only be called with one argument, not passed on ({WHY})")
        elif is_dunder(node.id) and node.id != "__name__":
            self.add(node, f"dunder name '{node.id}' is not allowed ({WHY})")
        elif node.id in ("staticmethod", "classmethod") and not (
                isinstance(parent := self.parents.get(node), (ast.FunctionDef, ast.AsyncFunctionDef))
                and node in parent.decorator_list):
            self.add(node, f"'{node.id}' may only decorate a method, as '@{node.id}'")
        elif isinstance(node.ctx, ast.Load) and (cls := self._class_scope(node)) is not None \
                and node.id in self.own_methods.get(cls.name, ()) and not self._accessor(node):
            # in the class body a method is a plain function: put(torch.Tensor) binds self to it
            self.add(node, f"the method '{node.id}' used in its class body is not allowed "
                           "(a method is only used through an instance)")
        elif isinstance(node.ctx, ast.Load) and (node.id in self.writers or node.id == "cls") \
                and not self._class_use(node):
            # A = H; A.put(torch.Tensor, v), or [H][0].put, a function that returns H, a
            # dataclass field annotated H: put would run with self = torch.Tensor
            self.add(node, f"the class '{node.id}' used as a value is not allowed: its methods write through their "
                           "receiver, and called through the class they would write into whatever comes first "
                           "(create it, subclass it, compare it or read its attributes)")
        elif node.id in self.imported and self._bare(node, self.imported) and outside(self.modules.get(node.id)) is None \
                and isinstance(self.modules.get(node.id), types.ModuleType):
            self.add(node, f"the module '{node.id}' used as a value is not allowed (call or read its attributes)")

    def check_attribute(self, node: ast.Attribute) -> None:
        dotted = dotted_name(node)
        root = root_name(node)
        if node.attr == "__init__" and is_super_call(node.value):
            return  # super().__init__() in a Module subclass
        if is_dunder(node.attr):
            self.add(node, f"dunder attribute '.{node.attr}' is not allowed ({WHY})")
        elif node.attr in FORBIDDEN_ATTRIBUTES and not (node.attr in OWN_RESERVED and self._own_private(node)):
            rename = " (a reserved name: rename the recipe's own)" if node.attr in OWN_RESERVED else ""
            self.add(node, f"attribute '.{node.attr}' is not allowed{rename} ({WHY})")
        elif is_private(node.attr) and node.attr not in PRIVATE_ANYWHERE and not self._own_private(node) \
                and not in_settings_module(dotted_name(self._whole_chain(node))):
            # self._x is the recipe's own; self.ref._y is whatever self.ref holds (a ForwardRef's
            # _evaluate runs a string as code), and a torch class's private members, reached through
            # a subclass's self or super() (a Parameter subclass's self._typed_storage().type("name")
            # imported any module), are torch's machinery
            receiver = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") or is_super_call(node.value)
            owner = self._tensor_private(node) if receiver else None
            whose = f": it is {owner}'s, a tensor class's machinery" if owner else ""
            self.add(node, f"private attribute '.{node.attr}' is not allowed{whose} ({WHY})")
        elif isinstance(node.value, ast.Name) and node.attr in self.methods.get(node.value.id, ()):
            # H.f(torch.Tensor) would run f with self = torch.Tensor: its writes would patch torch
            self.add(node, f"'{dotted}': a method may only be used through an instance of its class")
        elif isinstance(node.value, ast.Name) and node.value.id in self.classes \
                and node.value.id not in self.imported and (owner := self._inherited_method(node)) is not None:
            # class S(LRScheduler): S.state_dict(object) is the base's method with any self
            self.add(node, f"'{dotted}': a method of {owner} taken from the class runs with any self; call it "
                           "on an instance")
        elif node.attr == "compile" and not self._called(node):
            self.add(node, f"'{dotted}' may only be called, not used as a value (its arguments are checked)")
        elif node.attr in ("format", "format_map") and not isinstance(node.value, ast.Constant):
            # a format string built at run time reads attributes by name ("{0.gi_" + "frame}")
            self.add(node, f"'.{node.attr}' on anything but a string literal is not allowed ({WHY})")
        elif dotted.startswith(SETTINGS[1:]) and not isinstance(node.ctx, ast.Store) and node is self._whole_chain(node):
            # the compiler configs' functions take strings and pickles: their knobs are assigned, never read
            self.add(node, f"'{dotted}' may only be assigned (a number or a bool), not read or called")
        elif root in self.imported and root not in self.modules and isinstance(node.value, ast.Name):
            # an import the check could not resolve (it failed here): nothing on it can be judged
            self.add(node, f"'{dotted}': the check cannot resolve the import of '{root}', so nothing reached "
                           "through it is allowed")
        elif root in self.imported or root in self.chains:
            spelt = dotted if root in self.imported else self.chains[root] + dotted[len(root):]
            obj = resolve(spelt, self.modules)
            if (where := outside(obj)) is not None:
                held = "" if spelt == dotted else f" ({root} holds '{self.chains[root]}')"
                self.add(node, f"'{dotted}' is '{where}', which recipes may not use{held}")
            elif makes_classes(obj) and node is self._whole_chain(node):
                self.add(node, f"'{dotted}' makes classes (a metaclass, or type by another name), which is not allowed "
                               f"({WHY})")
            elif isinstance(obj, types.ModuleType) and self._bare(node, self.imported):
                self.add(node, f"the module '{dotted}' used as a value is not allowed (call or read its attributes)")
            elif (owner := unbound_owner(spelt, self.modules)) is not None:
                # a Python method taken from its class runs with any self: a scheduler's state_dict
                # is vars(self), and state_dict(object) handed over object.__getattribute__
                self.add(node, f"'{dotted}': a method of {owner} taken from the class runs with any self; call it "
                               "on an instance")

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

    def check_call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr == "compile":
            self.check_compile(node)
        if isinstance(node.func, ast.Name) and node.func.id == "type" and (
                len(node.args) != 1 or node.keywords or isinstance(node.args[0], ast.Starred)):
            self.add(node, f"type() with other than one argument makes a class, which is not allowed ({WHY})")
        elif isinstance(node.func, ast.Name) and node.func.id == "type" and not isinstance(self.parents.get(node), ast.Compare):
            self.add(node, "type(x) may only be compared ('type(a) is type(b)'): the class it returns could be "
                           "patched through a name")
        if isinstance(node.func, ast.Name) and node.func.id == "super" and (node.args or node.keywords):
            self.add(node, "super() takes no arguments here: super(C, x) runs a method on whatever x is")
        writer = node.func.func if isinstance(node.func, ast.Call) else node.func
        if node.args and self._is(writer, CLASS_WRITERS):
            self.add(node, f"'{dotted_name(writer)}' may only decorate the recipe's own classes "
                           "(called on a class it writes methods into it)")
        dotted = dotted_name(node.func)
        if dotted.startswith(SETTINGS[1:]):  # config.patch(), load_config(): strings, pickles
            self.add(node, f"calling '{dotted}' is not allowed (set a knob to a number or a bool)")

    def _setting_owner(self, target: ast.Attribute) -> str | None:
        """None when what ``target`` (a knob's chain) writes into is a module of torch.backends,
        or an object or class of one (``torch.backends.cuda.matmul``), or when it names a knob
        of a settings module (its ``_config`` lists them: ``trace.enabled``); else what it is.
        ``torch._inductor.config.torch`` is torch, as ``torch.backends.cuda.torch`` is."""
        full = self._full_name(target)
        for module in SETTINGS_MODULES:
            if full.startswith(module + "."):
                knobs = getattr(importlib.import_module(module), "_config", None)
                knob = full[len(module) + 1:]
                return None if isinstance(knobs, dict) and knob in knobs else f"'{module}', no knob of which is '{knob}'"
        obj = resolve(dotted_name(target.value), self.modules)
        if obj is None or isinstance(obj, Unimported):
            return f"'{dotted_name(target.value)}', which the check cannot resolve"
        home = ("torch.backends", *SETTINGS_MODULES)
        if isinstance(obj, types.ModuleType):
            name = obj.__name__
        else:
            name = obj.__module__ if isinstance(obj, type) else type(obj).__module__
        return None if isinstance(name, str) and under(name, home) else f"'{name}'"

    def check_bindings(self, node: ast.AST) -> None:
        targets, value = bindings(node)
        if isinstance(node, ast.AnnAssign):
            self.check_annotation(node.annotation)
        for t in targets:
            if isinstance(t, ast.Name):
                if t.id in RECEIVERS:
                    self.add(node, f"binding '{t.id}' is not allowed (it names the instance of a method)")
                continue
            dotted, root = dotted_name(t), root_name(t)
            if root in self.imported and in_settings(self._full_name(t)):
                dotted, root = self._full_name(t), None  # import torch.backends.cudnn as cudnn
            if root is None and isinstance(t, ast.Attribute) and not dotted.startswith(SETTINGS):
                self.add(node, f"assigning into an attribute of a computed value ('{dotted}') is not allowed "
                               "(bind it to a name first)")
            elif dotted.startswith(SETTINGS):
                # torch.backends takes strings from a fixed set (matmul.fp32_precision = "tf32"); a
                # compiler knob's string may name an executable or a folder (cpp.cxx, cutlass_dir)
                text = (str,) if dotted.startswith(SETTINGS[0]) else ()
                constant = isinstance(value, ast.Constant) and (
                    not isinstance(value.value, (str, bytes)) or isinstance(value.value, text)) or (
                    isinstance(value, ast.UnaryOp) and isinstance(value.operand, ast.Constant))
                if (where := self._setting_owner(t)) is not None:
                    # torch.backends.cuda.torch is torch itself: torch.backends.cuda.torch.nn.Module.eval
                    # = None patched torch's classes for every later call
                    self.add(node, f"'{dotted}' is not a setting: it writes into {where}, not into torch.backends "
                                   "or a compiler config")
                elif dotted.startswith(SETTINGS[0]) and callable(resolve(self._full_name(t), self.modules)):
                    # torch.backends.cudnn.is_available = None: a function of torch's, not a knob
                    self.add(node, f"'{dotted}' is a function or class of torch.backends, not a setting")
                elif not (isinstance(node, ast.Assign) and len(node.targets) == 1 and constant):
                    self.add(node, f"'{dotted}' may only be set to a number, a bool or None (a string too "
                                   "under torch.backends), in a plain assignment")
                elif dotted.startswith(SETTINGS[1:]) and any(FILE_KNOB.search(part) for part in dotted.split(".")[3:]):
                    self.add(node, f"'{dotted}' is not allowed: a compiler knob that writes files (traces, records, "
                                   "dumps) or reaches a cache server")
            elif root in self.imported or root in self.aliases:
                via = "" if root in self.imported else f", through '{root}', which holds an import"
                self.add(node, f"assigning into '{dotted}' is not allowed (it patches an imported module "
                               f"or class{via}, which the harness relies on)")
            elif isinstance(t, ast.Attribute) and not (t.attr in WRITABLE_ATTRIBUTES or (
                    isinstance(t.value, ast.Name) and t.value.id in RECEIVERS)):
                # a name may hold a class however it was bound: only writes that cannot patch one
                self.add(node, f"assigning into '{dotted}' is not allowed: a recipe assigns attributes of "
                               f"'self' (self.x) and {', '.join(sorted(WRITABLE_ATTRIBUTES))} only (model "
                               "settings go through HPARAMS['model'], or a method of the recipe's own class)")


# PEP 263: a "coding" comment on one of the first two lines names the file's encoding
CODING = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")


def source_encoding(lines: list[str]) -> str | None:
    """The encoding a PEP 263 comment on the first two of ``lines`` declares, or None."""
    for line in lines[:2]:
        if m := CODING.match(line):
            return m.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            break  # the second line counts only after a comment or a blank line
    return None


def check_source(source: str, filename: str = "recipe.py") -> list[Violation]:
    """All violations in ``source`` (empty when it passes), in line order."""
    if len(source) > MAX_SOURCE_CHARS:
        return [Violation(0, f"the recipe has {len(source):,} characters; at most {MAX_SOURCE_CHARS:,} are checked")]
    if "\0" in source:
        return [Violation(source.count("\n", 0, source.index("\0")) + 1, "a NUL character is not allowed")]
    coding = source_encoding(source.splitlines()[:2])
    if coding is not None and coding.lower().replace("_", "-") not in ("utf-8", "utf8", "utf-8-sig"):
        # Python would read the file's bytes as that encoding: another program than this text
        return [Violation(1 if CODING.match(source.splitlines()[0]) else 2,
                          f"coding '{coding}': recipes are UTF-8 and may not declare another encoding")]
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


def read_source(data: bytes) -> str:
    """A recipe file's text: UTF-8, a byte-order mark dropped (as Python drops it). The
    checker and ``eclip.loop.load_recipe`` both read the file through this, so the program
    checked is the program run. UnicodeDecodeError when the bytes are not UTF-8."""
    return data.decode("utf-8-sig")


def check_file(path: str | Path) -> list[Violation]:
    path = Path(path)
    data = path.read_bytes()
    try:
        source = read_source(data)
    except UnicodeDecodeError as e:  # Python would refuse to import it too: a violation, not a traceback
        return [Violation(data.count(b"\n", 0, e.start) + 1, f"not UTF-8 text (byte {e.start}: {e.reason})")]
    return check_source(source, str(path))
