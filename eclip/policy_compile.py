"""The policy's rules for ``torch.compile`` (``eclip.policy``): the backend gets the traced
graph and ``options=`` sets compiler knobs that name executables, so only built-in backends
and literal numbers and bools pass, and ``**kwargs`` only of a plain ``dict(...)``."""

from __future__ import annotations

import ast

from eclip.policy_reach import (
    COMPILE_BACKENDS,
    COMPILE_KEYWORDS,
    COMPILE_PLAIN_KEYWORDS,
    bindings,
)


class CompileRules:
    """Mixed into the checker: needs its ``tree``, ``parents`` and ``add``."""

    def _plain_compile_kwargs(self, expr: ast.AST, seen: frozenset = frozenset()) -> bool:
        """``expr`` (spread with ``**`` into compile()) is a ``dict(...)`` of fullgraph, dynamic,
        mode and disable only, or a name bound only to such dicts and never changed after."""
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "dict":
            return all(k.arg in COMPILE_PLAIN_KEYWORDS for k in expr.keywords) and all(
                self._plain_compile_kwargs(a, seen) for a in expr.args)
        if not isinstance(expr, ast.Name) or expr.id in seen:
            return False
        values = []
        for n in ast.walk(self.tree):
            targets, value = bindings(n)
            for t in targets:
                if isinstance(t, ast.Name) and t.id == expr.id:
                    values.append(value if isinstance(n, ast.Assign) else None)
            if isinstance(n, ast.Name) and n.id == expr.id and isinstance(n.ctx, ast.Load) and not self._spread(n):
                # opts["backend"] = …, opts.update(backend=…), set_backend(opts), alias = opts
                return False
        return bool(values) and all(v is not None and self._plain_compile_kwargs(v, seen | {expr.id})
                                    for v in values)

    def _spread(self, name: ast.Name) -> bool:
        """``name`` is read only to be copied: spread (``f(**opts)``) or the first argument of a
        ``dict(opts, …)``. Any other read may hand the dict to code that changes it."""
        parent = self.parents.get(name)
        if isinstance(parent, ast.keyword):
            return parent.arg is None
        return (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id == "dict"
                and name in parent.args)

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
