"""The static policy check of recipe files."""

import pytest

from eclip.policy import check_file, check_source
from eclip.train import TEMPLATE


def test_the_template_passes():
    assert check_file(TEMPLATE) == []


@pytest.mark.parametrize("line,message", [
    ("import os", "import of 'os' is not allowed"),
    ("import subprocess as sp", "import of 'subprocess' is not allowed"),
    ("from pathlib import Path", "import from 'pathlib' is not allowed"),
    ("from eclip import prepare", "import of 'eclip.prepare' is not allowed"),
    ("from eclip.harness import main", "import from 'eclip.harness' is not allowed"),
    ("from torch import *", "'from torch import *' is not allowed"),
    ("from . import x", "relative imports are not allowed"),
    ("f = open('result.json', 'w')", "use of 'open' is not allowed"),
    ("exec('x = 1')", "use of 'exec' is not allowed"),
    ("y = eval('1 + 1')", "use of 'eval' is not allowed"),
    ("c = compile('1', 'f', 'eval')", "use of 'compile' is not allowed"),
    ("m = __import__('os')", "use of '__import__' is not allowed"),
    ("g = getattr(torch, 'load')", "use of 'getattr' is not allowed"),
    ("setattr(torch, 'x', 1)", "use of 'setattr' is not allowed"),
    ("g = globals()", "use of 'globals' is not allowed"),
    ("b = __builtins__", "use of '__builtins__' is not allowed"),
    ("k = ().__class__.__base__", "dunder attribute"),
    ("w = torch.load('weights.pt')", "attribute '.load' is not allowed"),
    ("f = torch.utils.data.datapipes.iter.FileOpener(['/proc/1/environ'])", "attribute '.datapipes' is not allowed"),
    ("torch.save({}, 'x.pt')", "attribute '.save' is not allowed"),
    ("m = torch.hub.load('a', 'b')", "attribute '.hub' is not allowed"),
    ("def f(:", "syntax error"),
])
def test_forbidden_constructs_are_named_with_their_line(line, message):
    source = f"import torch\n\nHPARAMS = {{'batch_size': 8}}\n{line}\n"
    found = check_source(source)
    assert found, line
    assert all(v.line == 4 for v in found) and any(message in v.message for v in found), found


def test_allowed_constructs_pass():
    source = (
        "import math\nimport functools\nimport torch\nimport torch.nn.functional as F\n"
        "from dataclasses import dataclass\nfrom typing import Any\nimport kernels\n"
        "from eclip.model import model_config\nfrom eclip import expert\n"
        "step = torch.compile(lambda x: x)\nif __name__ == '__main__':\n    pass\n"
    )
    assert check_source(source) == []
