"""What a recipe may import and reach: the lists behind ``eclip.policy`` and the helpers that
read a recipe's syntax tree and resolve its attribute chains against the real modules
(importing only what the recipe itself would import, never a refused module).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import types
import typing
from dataclasses import dataclass

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
    # TorchScript compiles and runs code from strings (whose ops open files); C++ allocators
    # and GPUDirect files load libraries and open paths; profiler exports write files
    "jit", "CompilationUnit", "execWrapper", "import_ir_module", "import_ir_module_from_buffer",
    "parse_ir", "GdsFile", "gds", "tunable", "CUDAPluggableAllocator", "XPUPluggableAllocator",
    "change_current_allocator", "export_stacks", "xeon", "run_cpu", "get_file_path",
    # pickles: a config module's load_config, a compiled function's loader
    "load_config", "load_compiled_function", "save_compiled_function",
    # a CUDA graph's dump writes a file; global optimizer hooks run in every optimizer's step
    "debug_dump", "register_optimizer_step_pre_hook", "register_optimizer_step_post_hook",
    # modules as values, where no chain resolution follows them: calls that return one
    # (torch.get_device_module("cpu").torch.export.zipfile) and an AttributeError's .obj, the
    # object it was raised on (a module, for a missing module attribute)
    "get_device_module", "cudart", "get_opt_einsum", "obj",
    # getattr and setattr by a string key (pd["__class__"] is getattr(pd, "__class__")), and what
    # hands back a class, whose methods then run with any self (H.mro()[0].put(torch.Tensor, v))
    "ParameterDict", "mro", "type_before_parametrizations",
    # the builtins reached as attributes of a builtins module (enum's bltns), should one be reached,
    # and code objects, which a FunctionType runs with other names (code.replace(co_names=…))
    "bltns", "exec", "getattr", "setattr", "delattr", "globals", "locals", "vars", "breakpoint", "memoryview",
    "gi_code", "cr_code", "ag_code", "FunctionType", "CodeType",
    # a backend by another door than compile()'s checked keyword: the default one, a stance's
    # forced one (each gets the traced graph, whose code generation on_generate_code rewrites)
    "set_default_backend", "set_stance", "on_generate_code", "recompile",
    # a class whose annotations are any strings (TypedDict('T', {'a, b': int})): a dataclass
    # writes its fields' names into the code it generates
    "TypedDict",
    # a Field of the recipe's own class (class F(dataclasses.Field)) renames itself through self
    # (self.name = "…") after a dataclass took it as a field's default: a subclass that is a
    # dataclass too writes that name into the code it generates (its __eq__, __init__)
    "Field",
    # logging's hooks run a recipe's function with whatever torch logs (compiler objects, sympy
    # expressions), and sympy's string parsing evaluates its input: refused on any object
    "getLogger", "addFilter", "addHandler", "setLogRecordFactory", "setLoggerClass", "sympify", "parse_expr",
    "lambdify",
    # the compiler's own objects: a function it calls while it traces (allow_in_graph) gets fake
    # tensors whose sizes lead, through .node (or a fake tensor's mode and its shape env), to
    # sympy expressions, many of whose methods (coeff, diff, match, ...) evaluate a string
    "allow_in_graph", "substitute_in_graph", "assume_constant_result", "node", "fake_mode", "shape_env",
    # a storage's type("a.b") imports the module a string names (torch._utils._import_dotted_name)
    "storage", "untyped_storage", "Storage", "BFloat16Storage", "BoolStorage",  # (torch.storage's: its module)
    "ByteStorage", "CharStorage", "ComplexDoubleStorage", "ComplexFloatStorage", "DoubleStorage", "FloatStorage",
    "HalfStorage", "IntStorage", "LongStorage", "QInt32Storage", "QInt8Storage", "QUInt2x4Storage",
    "QUInt4x2Storage", "QUInt8Storage", "ShortStorage",
    # the storages' C base, whose private methods write and read file descriptors and start
    # torch's shared-memory manager; a class's __module__ rewritten, two objects' classes swapped
    "StorageBase", "set_module", "swap_tensors",
})
# torch modules that run code from strings or pickles, write files, start processes or
# change what every later torch call computes: refused however they are reached
DENIED_MODULES = ("torch.utils.benchmark", "torch.utils.tensorboard", "torch.utils.collect_env",
                  "torch.utils.model_dump", "torch.utils.show_pickle", "torch.utils.file_baton",
                  "torch.utils.hipify", "torch.utils.cpp_extension", "torch.utils.model_zoo",
                  "torch.utils.data.datapipes", "torch.testing", "torch.onnx", "torch.hub",
                  "torch.package", "torch.distributed", "torch.multiprocessing", "torch.profiler",
                  "torch.autograd.profiler", "torch.library", "torch.overrides", "torch.serialization",
                  "torch.fx", "torch.export", "torch.ao", "torch.quantization", "torch.jit",
                  "torch.backends.xeon", "torch.cuda.gds", "torch.cuda.tunable", "torch.utils.jit",
                  "torch.autograd.profiler_util", "torch.autograd.profiler_legacy", "torch.compiler.config",
                  # with a module that looks parametrized already, a parametrization is set as a
                  # property of the module's class itself (torch.nn.Module, torch.nn.Linear)
                  "torch.nn.utils.parametrize", "torch.nn.utils.parametrizations")
# The torch modules a recipe may import or reach at all (with their submodules, less the
# denied ones): what training code needs. Any other part of torch is refused, so a module
# nobody has reviewed is closed by default rather than open until someone finds it.
TORCH_MODULES = ("torch.nn", "torch.optim", "torch.autograd", "torch.amp", "torch.cuda", "torch.backends",
                 "torch.compiler", "torch.func", "torch.linalg", "torch.fft", "torch.special",
                 "torch.distributions", "torch.utils.checkpoint", "torch.types", "torch.random",
                 "torch.functional", "torch.nested", "torch.masked", "torch.sparse", "torch.signal",
                 "torch.accelerator")
# torch.compile(backend=f) hands f the traced graph (whose code generation can be injected)
# and options= sets compiler knobs that name executables: only these, as literals
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")
COMPILE_PLAIN_KEYWORDS = ("fullgraph", "dynamic", "mode", "disable")  # harmless whatever their value
COMPILE_KEYWORDS = (*COMPILE_PLAIN_KEYWORDS, "backend", "options")
MAX_SOURCE_CHARS = 200_000  # a recipe is a page of code; far more is a way to exhaust the parser
SETTINGS = ("torch.backends.", "torch._inductor.config.", "torch._dynamo.config.")  # knobs, not code
# Modules behind the settings: importable (to set a knob), never called (their patch() and
# load_config() take strings and pickles, and some knobs name executables and folders).
SETTINGS_MODULES = ("torch._inductor.config", "torch._dynamo.config")
# Compiler knobs that write files or reach the network when set to True (trace.enabled writes
# the graphs and generated code under the working directory, replay_record_enabled records,
# *_remote_cache connects to a cache server): a word of the knob's name that names one (whole
# words between underscores: epilogue_fusion is no log)
FILE_KNOB = re.compile(r"(?:^|_)(?:c?profil(?:e|er|ing)|trace|debug|record(?:ing)?|remote|dump|save|log(?:ging|path)?"
                       r"|repro|upload|export)(?:_|$)")
ANNOTATION_BUILTINS = frozenset({"int", "float", "bool", "str", "bytes", "list", "dict", "tuple", "set",
                                 "frozenset", "object", "type", "None", "complex", "slice"})
# Attribute writes: ``self.x`` (and ``cls.x``) in the recipe's own methods, and these on anything
# (a tensor's flags and contents: a class patched by them gains nothing)
RECEIVERS = ("self", "cls", "ctx")  # ctx: an autograd.Function's context
WRITABLE_ATTRIBUTES = frozenset({"requires_grad", "grad", "data"})
# Decorators a method may have: they call it with the instance it was called on
KEEPS_SELF = ("torch.no_grad", "torch.enable_grad", "torch.inference_mode", "torch.compile",
              "torch.compiler.disable", "functools.cache", "functools.lru_cache", "functools.cached_property")
# Builtins whose names the check takes at their word (@property keeps self, dict(...) holds
# compile()'s options, isinstance(x, C) passes nothing on): a recipe may not bind them
TRUSTED_BUILTINS = frozenset({"property", "classmethod", "staticmethod", "super", "type", "dict", "isinstance",
                              "issubclass"})
AUTOGRAD_METHODS = ("forward", "backward", "setup_context", "jvp", "vjp")  # torch.autograd.Function's
# Functions that write methods into the class they are given: decorators of the recipe's own
# classes only, never called on a class (dataclasses.dataclass(torch.nn.Linear))
CLASS_WRITERS = ("dataclasses.dataclass", "functools.total_ordering", "typing.final", "typing.no_type_check",
                 "typing.runtime_checkable")
ALLOWED_DUNDER_DEFS = frozenset({"__init__", "__repr__", "__post_init__"})  # methods a recipe may define
FORMAT_FIELD = re.compile(r"\{[^{}:!]*[.\[][^{}]*\}")  # str.format's {name.attr} and {name[key]}
WHY = "recipes may not reach files, processes, the network or the interpreter's machinery"


def under(name: str, prefixes) -> bool:
    """``name`` is one of the dotted ``prefixes`` or lies below one (``torch.nn.functional``
    under ``torch.nn``; ``torch.nnx`` is not)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def allowed_module(name: str) -> bool:
    return under(name, ALLOWED_IMPORTS)


def denied(module: str) -> bool:
    """``module`` is in ``DENIED_MODULES``: nothing defined there may be used."""
    return under(module, DENIED_MODULES)


def closed(module: str) -> bool:
    """``module`` may not be imported or reached as a module: denied, or a part of torch
    outside ``TORCH_MODULES`` (the settings modules, importable to set their knobs, aside).
    Objects defined in closed modules stay usable where torch re-exports them
    (``torch.Generator`` is ``torch._C``'s)."""
    if any(under(m, (module,)) for m in (*SETTINGS_MODULES, *TORCH_MODULES)):
        return False  # on the way to an open module (``torch.utils`` to its ``checkpoint``)
    if under(module, ("torch",)) and not under(module, TORCH_MODULES):
        return True
    return denied(module)


@functools.cache
def known(dotted: str):
    """The object a trusted dotted name names (``torch.no_grad``), for identity checks."""
    module, *rest = dotted.split(".")
    return functools.reduce(getattr, rest, importlib.import_module(module))


def is_binding_class(obj) -> bool:
    """A class bound from C++ by pybind11: at torch's top level these are TorchScript's
    machinery (``CompilationUnit``, ``ScriptModule``, ``Graph``) and its file reader and
    writer (``PyTorchFileReader``); no recipe needs one."""
    return (isinstance(obj, type) and type(obj).__name__ == "pybind11_type"
            and not hasattr(obj, "__members__"))  # an enum (SDPBackend) is a set of values


def makes_classes(obj) -> bool:
    """A metaclass (``torch.autograd.function.FunctionMeta``, ``typing.NamedTupleMeta``) or
    ``typing.Type`` (``type`` by another name: a class deriving from it is a metaclass). Called
    with a name, bases and a dict, each makes a class as ``type()`` with three arguments does,
    its dict holding any names (dunders and annotations from strings built at run time)."""
    if isinstance(obj, type):
        return issubclass(obj, type)
    try:
        return typing.get_origin(obj) is type
    except Exception:
        return False


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def is_private(name: str) -> bool:
    """``_x`` but not ``__x__``; ``torch._foreach_*`` ops are public in all but name."""
    return name.startswith("_") and not is_dunder(name) and not name.startswith("_foreach_")


def imported_names(tree: ast.AST) -> set[str]:
    """Names bound by imports anywhere in the file (``import torch.nn as nn`` binds nn)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def import_bindings(tree: ast.AST):
    """(import node, alias, the name it binds, the path that name holds) for every name every
    import binds: ``import torch.nn`` binds ``torch`` (path ``torch``); ``import torch.nn as
    nn`` and ``from torch import nn`` bind ``nn`` (path ``torch.nn``); relative imports keep
    their dots."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if isinstance(node, ast.Import):
                    path, name = (alias.name, alias.asname) if alias.asname else (alias.name.split(".")[0],) * 2
                else:
                    path, name = f"{'.' * node.level}{node.module or ''}.{alias.name}", alias.asname or alias.name
                yield node, alias, name, path


def import_paths(tree: ast.AST) -> dict[str, dict[str, ast.AST]]:
    """Name → {each path an import binds it to: the first import that does}."""
    out: dict[str, dict[str, ast.AST]] = {}
    for node, _, name, path in import_bindings(tree):
        out.setdefault(name, {}).setdefault(path, node)
    return out


def root_name(node: ast.AST) -> str | None:
    """The variable at the root of ``a.b[c].d``; None for other expressions."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def dotted_name(node: ast.AST) -> str:
    """``torch.backends.cuda.matmul.allow_tf32`` for an attribute chain ('?' for the rest)."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        parts.append(node.attr if isinstance(node, ast.Attribute) else "[]")
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")
    return ".".join(reversed(parts))


def in_settings(dotted: str) -> bool:
    """``dotted`` (a whole attribute chain) is a knob under SETTINGS or a settings module."""
    return dotted.startswith(SETTINGS) or dotted in SETTINGS_MODULES


def in_settings_module(dotted: str) -> bool:
    """``dotted`` lies in a settings module (``torch._inductor.config``): the only place a
    private part of a chain is allowed, since the module's own path has one."""
    return under(dotted, SETTINGS_MODULES)


def is_super_call(node: ast.AST) -> bool:
    """``super()`` as a method writes it: ``super(C, C)`` binds no instance."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
            and not node.args and not node.keywords)


def arg_nodes(args: ast.arguments) -> list[ast.arg]:
    """Every parameter of a def or lambda, in order, ``*args`` and ``**kwargs`` included."""
    return [a for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a is not None]


def refused_path(path: str) -> str | None:
    """Why importing the module ``path`` is refused by name (a forbidden or private part, a
    denied module), or None; settings modules pass."""
    if path in SETTINGS_MODULES:
        return None
    for part in path.split("."):
        if part in FORBIDDEN_ATTRIBUTES or is_private(part):
            return f"'{part}': {WHY}"
    return WHY if closed(path) else None


def flat_targets(targets) -> list[ast.AST]:
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


def bindings(node: ast.AST) -> tuple[list[ast.AST], ast.AST | None]:
    """(targets, value) of any construct that binds: assignments, ``del``, ``for`` and
    comprehension targets, ``with … as``, ``:=``; ([], None) for anything else."""
    if isinstance(node, ast.Assign):
        return flat_targets(node.targets), node.value
    if isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
        return flat_targets([node.target]), node.value
    if isinstance(node, ast.Delete):
        return flat_targets(node.targets), None
    if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        return flat_targets([node.target]), node.iter
    if isinstance(node, ast.withitem):
        return flat_targets([node.optional_vars]), node.context_expr
    if isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:  # case T: / case [*T]:
        return [ast.Name(id=node.name, ctx=ast.Store())], None
    if isinstance(node, ast.MatchMapping) and node.rest:  # case {**T}:
        return [ast.Name(id=node.rest, ctx=ast.Store())], None
    return [], None


@dataclass
class Unimported:
    """A denied module a chain reaches, by name (the check never imports it)."""

    name: str


def forwarding(module) -> bool:
    """A module object whose class answers unknown names with code (a ``__getattr__`` of the
    class, not PEP 562's in the module's dict): ``torch.backends`` and its ``cudnn``,
    ``opt_einsum``, … are ``PropModule`` objects that hand every name on to the module they
    wrap, imports included (``torch.backends.types``, ``torch.backends.cudnn.warnings``)."""
    return (isinstance(module, types.ModuleType) and type(module) is not types.ModuleType
            and inspect.getattr_static(type(module), "__getattr__", None) is not None)


def static_attr(obj, part: str):
    """``obj.part`` as the check reads it, without running code (``inspect.getattr_static``);
    through a ``PropModule`` (``forwarding``), the attribute of the module it wraps (its ``m``),
    as its ``__getattr__`` reads it. AttributeError when neither holds it."""
    try:
        return inspect.getattr_static(obj, part)
    except AttributeError:
        inner = inspect.getattr_static(obj, "m", None) if forwarding(obj) else None
        if not isinstance(inner, types.ModuleType):
            raise
        return inspect.getattr_static(inner, part)


def unbound_owner(dotted: str, modules: dict) -> str | None:
    """The class (its name) whose plain Python method ``dotted`` takes from the class itself
    (``torch.optim.lr_scheduler.LRScheduler.state_dict``), else None: such a function runs
    with whatever it is given as self. Static and class methods, and C methods (which check
    their self's type), are no such door."""
    head, _, name = dotted.rpartition(".")
    owner = resolve(head, modules) if head else None
    if not isinstance(owner, type):
        return None
    try:
        raw = inspect.getattr_static(owner, name)
    except AttributeError:
        return None
    return owner.__qualname__ if isinstance(raw, types.FunctionType) else None


def resolve(dotted: str, modules: dict):
    """The object ``a.b.c`` names when ``a`` is an imported module (``modules`` maps the
    recipe's import names to them), or None where it cannot be told without running code."""
    root, *rest = dotted.split(".")
    obj = modules.get(root)
    for part in rest:
        if isinstance(obj, Unimported):
            return obj  # what lies beyond a denied module is denied with it
        if obj is None or part == "[]":
            return None
        try:
            obj = static_attr(obj, part)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                return None
            name = f"{obj.__name__}.{part}"
            if forwarding(obj) and obj.__name__ not in SETTINGS_MODULES \
                    and not isinstance(inspect.getattr_static(obj, "m", None), types.ModuleType):
                return Unimported(name)  # what its __getattr__ answers is not known here: refused
            if closed(name) and obj.__name__ not in SETTINGS_MODULES:  # a settings module's are knobs
                return Unimported(name)  # refused: named, never imported into the referee
            if is_private(part) or part in FORBIDDEN_ATTRIBUTES:
                return None  # refused by name anyway
            try:  # lazily imported submodules (torch's) are not static attributes
                obj = importlib.import_module(name)
            except Exception:
                return None
    return obj


def import_modules(tree: ast.AST) -> dict:
    """Import name → module object for the recipe's allowed imports (importing them is
    what the recipe itself will do; an import that fails is left unresolved)."""
    out = {}
    for node, alias, name, full in import_bindings(tree):
        if getattr(node, "level", 0):
            continue  # relative: refused anyway
        if isinstance(node, ast.ImportFrom):
            sub = f"{node.module}.{alias.name}"
            if node.module and not allowed_module(node.module) and allowed_module(sub) and not refused_path(sub):
                # from eclip import expert: an allowed module by way of a package that is not
                # one (left out, every chain on the name went unresolved: expert_mod.torch.export)
                try:
                    out[name] = importlib.import_module(sub)
                except Exception:
                    pass
                continue
            if not allowed_module(node.module or "") or refused_path(node.module):
                continue  # refused anyway: never imported into the referee
            out.update(_imported_name(node.module, alias.name, name))
            continue
        if not allowed_module(full) or refused_path(full):
            continue
        try:
            out[name] = importlib.import_module(full)
        except Exception:
            pass
    return out


def _imported_name(module: str, attr: str, name: str) -> dict:
    """``{name: what "from module import attr" binds}``: the module's attribute if it has one
    (``from torch import zeros``), else its submodule, unless that is closed (named only)."""
    try:
        return {name: static_attr(importlib.import_module(module), attr)}
    except Exception:
        pass
    full = f"{module}.{attr}"
    if closed(full):
        return {name: Unimported(full)}
    try:
        return {name: importlib.import_module(full)}
    except Exception:
        return {}


def outside(obj) -> str | None:
    """The module a resolved object belongs to when that is not one a recipe may import."""
    if isinstance(obj, Unimported):
        return obj.name
    # a class's methods and properties as getattr_static finds them: the function inside is
    # what a call runs (TorchDispatchMode.push is a classmethod of torch.utils._python_dispatch)
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    elif isinstance(obj, property) and obj.fget is not None:
        obj = obj.fget
    if is_binding_class(obj):
        return f"{obj.__module__}.{obj.__name__}, a C++ binding"
    if isinstance(obj, types.ModuleType):
        name = obj.__name__
        if closed(name):
            return name
    elif isinstance(obj, (type, types.FunctionType)):
        name = getattr(obj, "__module__", None)
    elif isinstance(obj, types.BuiltinFunctionType):  # C functions: where they are defined, else whom they bind
        name = getattr(obj, "__module__", None)
        if name is None:
            owner = getattr(obj, "__self__", None)
            name = owner.__name__ if isinstance(owner, types.ModuleType) else type(owner).__module__
        if isinstance(name, str) and name.startswith("_") and allowed_module(name[1:]):
            name = name[1:]  # an allowed module's C half: functools.reduce is _functools'
    elif obj is None:
        return None
    else:
        # any other object is judged by its class: a module's global may be an instance of
        # another module's class (torch.autograd.graph.log is a logging.Logger, whose manager
        # hands out every logger, and a filter on one runs with what torch logs)
        name = type(obj).__module__
    if not isinstance(name, str) or name == "builtins" and not isinstance(obj, types.ModuleType):
        return None
    if denied(name) or closed(name) and not any(is_private(part) for part in name.split(".")):
        return name  # defined in a closed public module (torch.jit, torch.storage, torch.utils.data)
    return None if allowed_module(name) or name in SETTINGS_MODULES else name
