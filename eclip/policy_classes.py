"""The policy's rules for the recipe's own classes (``eclip.policy``): which parameters are a
method's receiver (the only names an attribute write may go through), which classes have a
method that writes through it (never passed on as a value), and the checks of definitions,
class writers (``dataclasses.dataclass``) and class patterns that rest on them."""

from __future__ import annotations

import ast
import builtins

from eclip.policy_reach import (
    ALLOWED_DUNDER_DEFS,
    AUTOGRAD_METHODS,
    CLASS_WRITERS,
    FORBIDDEN_ATTRIBUTES,
    KEEPS_SELF,
    RECEIVERS,
    WHY,
    arg_nodes,
    bindings,
    dotted_name,
    is_dunder,
    is_private,
    resolve,
    root_name,
)

# Builtin classes a recipe's class may derive from by name (class StopTraining(Exception)):
# plain data and the exceptions; type (a metaclass) and the descriptors are no base
BUILTIN_BASES = frozenset({"object", "dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bytes",
                           *(n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, Exception))})


class ClassRules:
    """Mixed into the checker: needs its ``tree``, ``parents``, ``classes``, ``add``,
    ``rebinds``, ``_is`` and ``check_annotation``."""

    def _classes(self, tree: ast.AST) -> None:
        """The recipe's classes as the rules need them: ``methods`` (class → its methods' names,
        its bases' included; ``own_methods`` without them), ``receivers`` (the parameters that
        are a method's ``self``, ``cls`` or ``ctx``) and ``writers`` (classes with a method, its
        bases' included, that writes through its receiver)."""
        # class name → its methods' names; the first parameters that are an instance's ``self``
        # (or a classmethod's ``cls``): the only receivers an attribute write may have
        self.methods: dict[str, set[str]] = {}
        self.receivers: set[int] = set()
        writes: set[str] = set()  # classes with a method that writes through its receiver
        bases: dict[str, set[str]] = {}  # class → its bases among the recipe's classes
        self.class_defs: dict[str, list[ast.ClassDef]] = {}  # name → its class statements (one may be nested)
        setup: set[str] = set()  # classes whose body binds setup_context
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            self.class_defs.setdefault(cls.name, []).append(cls)
            bases.setdefault(cls.name, set()).update(
                b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in self.classes)
            if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "setup_context"
                   or isinstance(n, ast.Name) and n.id == "setup_context" for s in cls.body for n in ast.walk(s)):
                setup.add(cls.name)
        # with a setup_context, autograd calls forward(*args) without a context: its first
        # parameter is whatever apply() was given first (Fn.apply(torch.Tensor, v) would write
        # into torch.Tensor). Any class related by inheritance counts: a subclass's (or a mixin's)
        # setup_context makes the base's forward run so too.
        related = self._related(bases)
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            function = any(self._is(b, ("torch.autograd.Function",)) for b in cls.bases)
            properties = {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                          and any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)}
            for fn in cls.body:
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                static = [d.id for d in fn.decorator_list if isinstance(d, ast.Name)
                          and d.id in ("classmethod", "staticmethod")]
                first = arg_nodes(fn.args)[:1]
                if function and static == ["staticmethod"] and fn.name in AUTOGRAD_METHODS:
                    # ctx is autograd's context object; MyFn.forward(torch.Tensor, …) is refused
                    self.methods.setdefault(cls.name, set()).add(fn.name)
                    if first and first[0].arg == "ctx" and len(fn.decorator_list) == 1 and not (
                            fn.name == "forward" and related[cls.name] & setup):
                        self.receivers.add(id(first[0]))
                        if self._writes_through(fn, "ctx"):
                            writes.add(cls.name)
                    continue
                if not static:  # classmethods and staticmethods are called through the class
                    self.methods.setdefault(cls.name, set()).add(fn.name)
                if first and first[0].arg in ("self", "cls") and self._plain_method(fn, properties):
                    self.receivers.add(id(first[0]))
                    if not is_dunder(fn.name) and self._writes_through(fn, first[0].arg):
                        writes.add(cls.name)  # (a dunder method is never reached through the class)
        # a subclass has its bases' methods: J.put(torch.Tensor, v) runs H.put with self = torch.Tensor
        lineage = {name: self._lineage(name, bases) for name in self.classes}
        self.lineages, self.groups = lineage, related  # (the private-name and unbound-method rules')
        self.own_methods = self.methods
        self.methods = {name: set().union(*(self.methods.get(b, set()) for b in lineage[name]))
                        for name in self.classes}
        self.writers = {name for name in self.classes if lineage[name] & writes}

    @classmethod
    def _related(cls, bases: dict[str, set[str]]) -> dict[str, set[str]]:
        """Class → the recipe's classes related to it by inheritance, either way and through
        each other (its bases, its subclasses, their other bases, …), itself included."""
        links = {name: set(up) for name, up in bases.items()}
        for name, up in bases.items():
            for b in up:
                links.setdefault(b, set()).add(name)
        out: dict[str, set[str]] = {}
        for name in links:
            if name not in out:
                group = cls._lineage(name, links)  # along links both ways: the whole group
                out.update(dict.fromkeys(group, group))
        return out

    @staticmethod
    def _lineage(name: str, bases: dict[str, set[str]]) -> set[str]:
        """``name`` and the recipe's classes it derives from, however far up (``bases``: a
        class's bases; given links both ways, its whole group)."""
        out, todo = set(), [name]
        while todo:
            if (c := todo.pop()) not in out:
                out.add(c)
                todo.extend(bases.get(c, ()))
        return out

    @staticmethod
    def _writes_through(fn, receiver: str) -> bool:
        """``fn`` assigns (or deletes) an attribute through its parameter ``receiver``."""
        return any(root_name(t) == receiver and not isinstance(t, ast.Name)
                   for n in ast.walk(fn) for t in bindings(n)[0])

    def _plain_method(self, fn, properties: set[str]) -> bool:
        """Its decorators cannot change what its first parameter is bound to: none,
        ``property``/``classmethod``, a property's ``@x.setter`` (x one of its class's
        ``properties``), or one of ``KEEPS_SELF`` (``torch.no_grad()``)."""
        for d in fn.decorator_list:
            if isinstance(d, ast.Name) and d.id in ("property", "classmethod"):
                continue
            if (isinstance(d, ast.Attribute) and d.attr in ("setter", "getter", "deleter")
                    and isinstance(d.value, ast.Name) and d.value.id in properties):
                continue
            if not self._is(d.func if isinstance(d, ast.Call) else d, KEEPS_SELF):
                return False
        return True

    def _class_use(self, node: ast.Name) -> bool:
        """``node`` (a class) is called, subclassed, compared, read from (``H.x``: methods are
        refused there) or handed to ``isinstance``/``issubclass``: nothing that passes it on."""
        parent, test = self.parents.get(node), ("isinstance", "issubclass")  # (builtins: never rebound)
        if isinstance(parent, ast.Tuple) and isinstance(call := self.parents.get(parent), ast.Call):
            return isinstance(call.func, ast.Name) and call.func.id in test and parent in call.args
        if isinstance(parent, ast.Call):  # H(...), isinstance(x, H)
            return parent.func is node or (isinstance(parent.func, ast.Name) and parent.func.id in test
                                           and node in parent.args)
        return (isinstance(parent, (ast.Attribute, ast.Compare)) or isinstance(parent, ast.ClassDef)
                and node in parent.bases or isinstance(parent, ast.MatchClass) and parent.cls is node)

    def _class_scope(self, node: ast.AST) -> ast.ClassDef | None:
        """The class whose body ``node`` is directly in (no function between), or None."""
        while (node := self.parents.get(node)) is not None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return None
            if isinstance(node, ast.ClassDef):
                return node
        return None

    def _accessor(self, node: ast.Name) -> bool:
        """``@name.setter`` (or getter, deleter) over a property's next method."""
        parent = self.parents.get(node)
        method = self.parents.get(parent)
        return (isinstance(parent, ast.Attribute) and parent.attr in ("setter", "getter", "deleter")
                and isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and parent in method.decorator_list)

    def check_class_writer(self, node: ast.AST) -> None:
        """``dataclasses.dataclass`` (and the other ``CLASS_WRITERS``) only as a decorator of the
        recipe's own ``class`` or ``def`` (``@dataclasses.dataclass``, ``@dataclasses.dataclass(frozen=True)``):
        dataclass writes its fields' names into code it runs, and a class not made by a ``class``
        statement may have any strings for them (``w = dataclasses.dataclass(init=False); w(C)``)."""
        if node is not self._whole_chain(node) or not self._is(node, CLASS_WRITERS):
            return
        use, parent = node, self.parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node and not parent.args:
            use, parent = parent, self.parents.get(parent)  # @dataclasses.dataclass(frozen=True)
        if isinstance(parent, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and use in parent.decorator_list:
            # the decorators below it run first and hand it what they return: any class
            # (@dataclasses.dataclass over @(lambda c: torch.nn.Linear) writes into Linear)
            below = parent.decorator_list[parent.decorator_list.index(use) + 1:]
            if all(self._is(d.func if isinstance(d, ast.Call) and not d.args else d, CLASS_WRITERS) for d in below):
                return
            self.add(node, f"'{dotted_name(node)}' may only decorate the recipe's own classes: no decorator but "
                           "another class writer may come below it (what that returns is what it writes into)")
            return
        self.add(node, f"'{dotted_name(node)}' may only decorate the recipe's own classes, as '@{dotted_name(node)}' "
                       "(called on a class it writes methods into it, generated as code from its fields' names)")

    def check_match_class(self, node: ast.MatchClass) -> None:
        """``case object(__self__=b)`` reads ``subject.__self__`` (``len``'s is the builtins module):
        a class pattern's keywords are attributes, and checked as attributes are. Its positional
        arguments read the attributes its class's ``__match_args__`` names, which the check never
        sees: a dataclass field named ``gi_frame`` in a class that an ABC's ``register`` made a
        generator an instance of (``case P(frame)``) read a frame, then ``f_builtins``."""
        if node.patterns:
            self.add(node, "a class pattern's positional arguments are not allowed: they read the attributes its "
                           "class's match_args name, which the check cannot see (name them: case C(shape=s))")
        for attr in node.kwd_attrs:
            if is_dunder(attr):
                self.add(node, f"a class pattern's keyword reads the dunder attribute '.{attr}', which is not allowed "
                               f"({WHY})")
            elif attr in FORBIDDEN_ATTRIBUTES or is_private(attr):
                self.add(node, f"a class pattern's keyword reads the attribute '.{attr}', which is not allowed ({WHY})")

    def check_receivers(self, node) -> None:
        """``self`` and ``cls`` name an instance (a class) of the recipe's own, always: as a
        plain method's first parameter and nowhere else, since writes through them are allowed."""
        for a in arg_nodes(node.args):
            self.rebinds(node, a.arg)
            if a.arg in RECEIVERS and id(a) not in self.receivers:
                self.add(node, f"'{a.arg}' may only be the first parameter of a method of the recipe's own "
                               "classes (no decorator of the recipe's, no staticmethod; with a setup_context, "
                               "forward gets no ctx)")

    def imported_bases(self, names) -> list[ast.AST]:
        """The bases of the recipe classes ``names`` that name an import's class (their chains)."""
        return [b for name in names for c in self.class_defs.get(name, ()) for b in c.bases
                if root_name(b) in self.imported]

    def _base_problem(self, base: ast.AST) -> str | None:
        """Why ``base`` is no statically known class (None when it is): a recipe class's name
        (bound by class statements only), an import's chain that resolves to a class, or
        ``typing.Generic[…]`` / ``typing.Protocol[…]``. A base the check cannot see (a name
        bound to a chain, a default argument, a class attribute, ``typing.Annotated[C, …]``)
        let a class derive from a torch class that no rule on its methods' receivers knew of."""
        import typing

        if isinstance(base, ast.Subscript):
            named = base.value
            obj = resolve(dotted_name(named), self.modules) if root_name(named) in self.imported else None
            return None if obj in (typing.Generic, typing.Protocol) else \
                f"'{dotted_name(named)}[…]' (of subscripted bases, only typing.Generic and typing.Protocol)"
        if isinstance(base, ast.Name) and base.id not in self._bound_otherwise() and (
                base.id in self.classes or base.id in BUILTIN_BASES):
            return None
        if isinstance(base, (ast.Name, ast.Attribute)) and root_name(base) in self.imported:
            obj = resolve(dotted_name(base), self.modules)
            if isinstance(obj, type) or obj is not None and hasattr(obj, "__mro_entries__"):  # typing.List
                return None
        return f"'{dotted_name(base)}' (write the import's chain, a class of the recipe's or a builtin one)"

    def _bound_otherwise(self) -> set[str]:
        """Names something other than a class statement binds (an argument, an assignment, a
        loop, an import): a class name also bound so may hold any class at run time."""
        if getattr(self, "_other_bindings", None) is None:
            names = set(self.imported)
            for n in ast.walk(self.tree):
                if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
                    names.add(n.id)
                elif isinstance(n, ast.arg):
                    names.add(n.arg)
                elif isinstance(n, ast.ExceptHandler) and n.name:
                    names.add(n.name)
                elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
                    names.add(n.name)
                elif isinstance(n, (ast.Global, ast.Nonlocal)):
                    names.update(n.names)
            self._other_bindings = names
        return self._other_bindings

    def check_definition(self, node) -> None:
        self.rebinds(node, node.name)
        if is_dunder(node.name) and node.name not in ALLOWED_DUNDER_DEFS:
            # Python calls these itself, on objects the evaluation handles too: only the listed
            # ones, and the refusal says what to write instead (a proposer spent turns on it)
            self.add(node, f"defining '{node.name}' is not allowed: a recipe's class may define only "
                           f"{', '.join(sorted(ALLOWED_DUNDER_DEFS))} (give the method a plain name and call it, "
                           f"or subclass torch.nn.Module and define forward; {WHY})")
        if isinstance(node, ast.ClassDef):
            for k in node.keywords:
                self.add(node, f"class keyword '{k.arg or '**'}' is not allowed (a metaclass makes the class from its "
                               f"dict, which may hold any names; {WHY})")
            for base in node.bases:
                if (why := self._base_problem(base)) is not None:
                    self.add(node, f"a class's bases must be named classes (an import's or the recipe's), not "
                                   f"computed: {why}")
            return
        self.check_receivers(node)
        for ann in [a.annotation for a in arg_nodes(node.args)] + [node.returns]:
            if ann is not None:
                self.check_annotation(ann)
