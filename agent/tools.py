"""The tools offered to the model, and their confinement: what a proposer can reach is
exactly this, enforced here in code rather than asked for in the prompt.

- ``view``: read-only; ``recipe.py`` (the working copy being edited), ``program.md`` and a
  fixed list of reference files of the project, by name, with an optional line range;
- ``edit``: ``recipe.py`` only — ``view``, ``str_replace`` (the old text must occur exactly
  once) and ``insert`` (after a line). Edits apply to an in-memory copy; the loop writes the
  file only after the proposal is submitted and checked again. Each edit is checked for
  syntax and by the recipe policy, and the result says so, so the model can fix it;
- ``submit``: hypothesis, a short description for results.tsv, the expected effect.

There is no shell, no other file and no network. A path is accepted only if it names
``recipe.py`` in the workspace after normalisation: any other name, ``..``, an absolute path,
or a ``recipe.py`` that is a symlink is refused with an error result, never an exception.
"""

from __future__ import annotations

import ast
import posixpath
from pathlib import Path

from eclip.policy import check_source

ROOT = Path(__file__).resolve().parents[1]
# name -> path of the project's read-only reference files
REFERENCE_FILES = {name: ROOT / name for name in (
    "eclip/recipe.py", "eclip/model.py", "eclip/towers.py", "eclip/expert.py", "eclip/batch.py",
    "eclip/policy.py", "eclip/policy_reach.py", "eclip/policy_classes.py", "eclip/pretrained.py",
    "kernels/contrastive.py", "kernels/__init__.py",
)}
MAX_VIEW_LINES = 400  # a view returns at most this many lines; ask for a range beyond

TOOLS = [
    {
        "name": "view",
        "description": (
            "Read a file, with line numbers. Readable: recipe.py (your working copy, with your edits so "
            "far), program.md (the research brief) and the project's reference files: "
            + ", ".join(REFERENCE_FILES) + ". Nothing else can be read. Use view_range [first, last] "
            f"(1-based, inclusive; last -1 = end of file) for long files; at most {MAX_VIEW_LINES} lines "
            "are returned per call."),
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "recipe.py, program.md or a reference file name"},
                "view_range": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
                               "description": "[first, last] line numbers, 1-based, inclusive"},
            },
            "required": ["path"],
        },
    },
    {
        "name": "edit",
        "description": (
            "Edit recipe.py, the only file you may change. Commands: 'view' (as the view tool), "
            "'str_replace' (replace old_str, which must occur exactly once and match exactly, whitespace "
            "included, by new_str), 'insert' (insert new_str after line insert_line; 0 inserts at the "
            "top). Each successful edit is checked for syntax and by the recipe policy; the result "
            "reports any problem so you can fix it before you submit."),
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "enum": ["view", "str_replace", "insert"]},
                "path": {"type": "string", "description": "must be recipe.py"},
                "old_str": {"type": "string", "description": "str_replace: the exact text to replace"},
                "new_str": {"type": "string", "description": "str_replace / insert: the new text"},
                "insert_line": {"type": "integer", "description": "insert: the line after which to insert"},
                "view_range": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            },
            "required": ["command", "path"],
        },
    },
    {
        "name": "submit",
        "description": (
            "Submit the edited recipe.py as this experiment and end the turn. The loop then trains it "
            "for the fixed budget through the harness and keeps it only if it beats the best by more "
            "than the noise floor. Submitting without an edit, or with an edit that fails the syntax "
            "or policy check, is refused."),
        "input_schema": {
            "type": "object",
            "properties": {
                "hypothesis": {"type": "string", "description": "why this change should lower the mean rank"},
                "description": {"type": "string",
                                "description": "a short label for results.tsv, at most 80 characters"},
                "expected_effect": {"type": "string",
                                    "description": "the change in val_mean_rank (and speed) you expect"},
            },
            "required": ["hypothesis", "description"],
        },
    },
]


class ToolError(Exception):
    """A refused or malformed tool call: its message goes back to the model as is_error."""


def _unprintable(text: str, allowed: str = "") -> str | None:
    """The first character of ``text`` a submission may not carry, as Python writes it, or
    None: a control character (a NUL fails the commit message it goes into) or a lone
    surrogate (not UTF-8: the journal's history, sent with every later proposal, could
    not be)."""
    for ch in text:
        if ch not in allowed and (ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF):
            return repr(ch)
    return None


def _numbered(text: str, view_range, name: str) -> str:
    lines = text.splitlines()
    first, last = 1, len(lines)
    if view_range is not None:
        if (not isinstance(view_range, list) or len(view_range) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in view_range)):
            raise ToolError("view_range must be two integers [first, last]")
        first, last = view_range[0], (len(lines) if view_range[1] == -1 else view_range[1])
        if not 1 <= first <= max(1, len(lines)) or last < first:
            raise ToolError(f"view_range {view_range} is outside {name} (1..{len(lines)})")
    last = min(last, len(lines), first + MAX_VIEW_LINES - 1)
    body = "\n".join(f"{i:>4}\t{lines[i - 1]}" for i in range(first, last + 1))
    more = f"\n[lines {last + 1}..{len(lines)} not shown]" if last < len(lines) else ""
    return f"{name} (lines {first}-{last} of {len(lines)}):\n{body}{more}"


class ToolBox:
    """The state of one proposal: the working copy of recipe.py and what was submitted."""

    def __init__(self, workspace_root: Path, source: str, program: str):
        self.root = Path(workspace_root)
        self.original = source
        self.source = source
        self.program = program
        self.edits = 0  # successful edits
        self.submission: dict | None = None
        self.calls: list[dict] = []  # (name, ok) of every call, for the journal

    # -- confinement -----------------------------------------------------------------------
    def _recipe_path(self, path) -> None:
        """Accept only a path that names the workspace's recipe.py (ToolError otherwise)."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string naming recipe.py")
        raw = path.strip()
        if raw.startswith(("/", "\\", "~")) or (len(raw) > 1 and raw[1] == ":"):
            raise ToolError(f"{raw}: absolute paths are refused; the only editable file is recipe.py")
        parts = raw.replace("\\", "/").split("/")
        if ".." in parts:
            raise ToolError(f"{raw}: '..' is refused; the only editable file is recipe.py")
        if posixpath.normpath(raw.replace("\\", "/")) != "recipe.py":
            raise ToolError(f"{raw}: not editable; the only editable file is recipe.py")
        target = self.root / "recipe.py"
        if target.is_symlink() or target.resolve().parent != self.root.resolve():
            raise ToolError("recipe.py is a symlink in this workspace; editing is refused")

    def _checks(self, source: str) -> list[str]:
        try:
            ast.parse(source)
            return [v.format("recipe.py") for v in check_source(source)]
        except SyntaxError as e:
            return [f"recipe.py:{e.lineno}: syntax error: {e.msg}"]
        except (RecursionError, MemoryError, ValueError) as e:  # absurdly nested or huge source
            return [f"recipe.py: cannot be parsed ({type(e).__name__})"]

    # -- dispatch --------------------------------------------------------------------------
    def run(self, name: str, args) -> tuple[str, bool]:
        """Execute one tool call: (result text, is_error)."""
        try:
            if self.submission is not None:  # the submitted text is final: nothing after it applies
                raise ToolError("already submitted; calls after submit are not carried out")
            if not isinstance(args, dict):
                raise ToolError(f"input must be a JSON object, got {type(args).__name__}")
            handler = {"view": self._view, "edit": self._edit, "submit": self._submit}.get(name)
            if handler is None:
                raise ToolError(f"unknown tool {name!r}; the tools are view, edit and submit")
            out, ok = handler(args), True
        except ToolError as e:
            out, ok = f"error: {e}", False
        except Exception as e:  # whatever a tool input provokes, the model gets an error result
            out, ok = f"error: the tool failed ({type(e).__name__}: {str(e)[:200]})", False
        self.calls.append({"tool": name, "ok": ok})
        return out, not ok

    def _view(self, args: dict) -> str:
        path = args.get("path")
        if path in ("recipe.py", "./recipe.py"):
            self._recipe_path(path)
            return _numbered(self.source, args.get("view_range"), "recipe.py")
        if path in ("program.md", "./program.md"):
            return _numbered(self.program, args.get("view_range"), "program.md")
        if isinstance(path, str) and path in REFERENCE_FILES:
            text = REFERENCE_FILES[path].read_text(encoding="utf-8")
            return _numbered(text, args.get("view_range"), path)
        raise ToolError(f"{path!r} is not readable; readable: recipe.py, program.md, "
                        + ", ".join(REFERENCE_FILES))

    def _edit(self, args: dict) -> str:
        command = args.get("command")
        self._recipe_path(args.get("path"))
        if command == "view":
            return _numbered(self.source, args.get("view_range"), "recipe.py")
        if command == "str_replace":
            old, new = args.get("old_str"), args.get("new_str", "")
            if not isinstance(old, str) or not old:
                raise ToolError("str_replace needs old_str, the exact text to replace")
            if not isinstance(new, str):
                raise ToolError("new_str must be a string")
            count = self.source.count(old)
            if count != 1:
                raise ToolError(f"old_str occurs {count} times in recipe.py; it must occur exactly once "
                                "(include more surrounding lines)" if count else
                                "old_str does not occur in recipe.py (it must match exactly, whitespace included)")
            new_source = self.source.replace(old, new, 1)
        elif command == "insert":
            line, text = args.get("insert_line"), args.get("new_str")
            lines = self.source.splitlines(keepends=True)
            if not isinstance(line, int) or isinstance(line, bool) or not 0 <= line <= len(lines):
                raise ToolError(f"insert_line must be an integer in 0..{len(lines)}")
            if not isinstance(text, str) or not text:
                raise ToolError("insert needs new_str, the text to insert")
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            new_source = "".join(lines[:line]) + text + ("" if text.endswith("\n") else "\n") + "".join(lines[line:])
        else:
            raise ToolError(f"unknown edit command {command!r}; use view, str_replace or insert")
        self.source = new_source
        self.edits += 1
        problems = self._checks(new_source)
        status = ("edited recipe.py; it parses and passes the policy check" if not problems else
                  "edited recipe.py, but it would be rejected as it stands:\n" + "\n".join(problems))
        return status

    def _submit(self, args: dict) -> str:
        desc, hyp = args.get("description"), args.get("hypothesis")
        if not isinstance(desc, str) or not desc.strip() or not isinstance(hyp, str) or not hyp.strip():
            raise ToolError("submit needs a non-empty hypothesis and description")
        expected = args.get("expected_effect", "")
        expected = expected if isinstance(expected, str) else ""
        for name, text in (("description", desc), ("hypothesis", hyp), ("expected_effect", expected)):
            if bad := _unprintable(text, "\n\r\t"):  # line ends and tabs: the description's are made spaces
                raise ToolError(f"{name} holds the character {bad}: use printable text")
        if self.source == self.original:
            raise ToolError("recipe.py is unchanged: edit it before submitting")
        problems = self._checks(self.source)
        if problems:
            raise ToolError("recipe.py would be rejected; fix it first:\n" + "\n".join(problems))
        self.submission = {"description": " ".join(desc.split())[:80], "hypothesis": hyp.strip(),
                           "expected_effect": expected.strip()}
        return "submitted; the experiment will run now"
