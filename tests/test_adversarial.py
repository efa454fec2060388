"""Recipes that try to game the score: each must be rejected before it runs, or score no
better than chance (random ≈ (N−1)/2), far from what honest training reaches.

The harness evaluates the checkpoint in a process of its own, handing it images and texts in
separate passes, each in an order only the harness knows, so a model that counts its calls
or remembers the image pass cannot line the two up; and the training process holds the
training images only."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eclip.policy import check_source
from eclip.scoring import BATCH_TOL
from eclip.train import TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
N_VAL = 60
RANDOM = (N_VAL - 1) / 2

# A model that wraps the real one for training but answers evaluation with a trick.
WRAPPER = '''

_real_build_model = build_model


class _Trick(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.logit_scale = inner.logit_scale

    def forward(self, images, tokens, mask):
        return self.inner(images, tokens, mask)

    def clamp_logit_scale_(self):
        self.inner.clamp_logit_scale_()

    def param_groups(self, wd):
        return self.inner.param_groups(wd)

    def flops_per_sample(self):
        return self.inner.flops_per_sample()

{methods}

def build_model(spec):
    return _Trick(_real_build_model(spec))
'''

TRICKS = {
    "constant embedding": '''
    def encode_image(self, images):
        return torch.ones(images.shape[0], 8, device=images.device)

    def encode_text(self, tokens, mask):
        return torch.ones(tokens.shape[0], 8, device=tokens.device)
''',
    "counts its calls": '''
    def encode_image(self, images):
        return self._kth(images.shape[0], images.device, "img")

    def encode_text(self, tokens, mask):
        return self._kth(tokens.shape[0], tokens.device, "txt")

    def _kth(self, b, device, which):
        start = _COUNTS.get(which, 0)
        _COUNTS[which] = start + b
        return torch.nn.functional.one_hot(torch.arange(start, start + b, device=device), 4096).float()
''',
    # The shuffles once came from a generator seeded with the run's seed (42 + 7919 by
    # default): a recipe could draw the same permutations and answer by position.
    "replays the shuffle": '''
    def encode_image(self, images):
        return self._replay(images.shape[0], images.device)

    def encode_text(self, tokens, mask):
        return self._replay(tokens.shape[0], tokens.device)

    def _replay(self, b, device):
        if not _ORDERS:  # the evaluation's generator, as it was seeded: image pass, then text pass
            g = torch.Generator().manual_seed(42 + 7919)
            _ORDERS.append(torch.randperm(60, generator=g))
            _ORDERS.append(torch.randperm(60, generator=g))
        which = "img" if _COUNTS.get("img", 0) < 60 else "txt"
        start = _COUNTS.get(which, 0)
        _COUNTS[which] = start + b
        order = _ORDERS[0 if which == "img" else 1]
        return torch.nn.functional.one_hot(order[start:start + b].to(device), 4096).float()
''',
    "remembers the image pass": '''
    def encode_image(self, images):
        emb = self.inner.encode_image(images)
        _MEMORY.append(emb.detach())
        return emb

    def encode_text(self, tokens, mask):
        seen = torch.cat(_MEMORY)
        start = _COUNTS.get("txt", 0)
        _COUNTS["txt"] = start + tokens.shape[0]
        return seen[start:start + tokens.shape[0]]
''',
}


@pytest.fixture
def cache(small_cache):
    return small_cache


def harness(recipe: Path, cache: Path, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "eclip.harness", "run", "--recipe", str(recipe), "--data", str(cache),
                        "--budget-s", "1", "--out", str(out), "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    return json.loads((out / "result.json").read_text()) | {"returncode": p.returncode, "stderr": p.stderr}


@pytest.mark.parametrize("trick", list(TRICKS))
def test_tricks_at_evaluation_score_no_better_than_chance(cache, tmp_path, trick, monkeypatch, capsys):
    source = TEMPLATE.read_text() + "\n_COUNTS = {}\n_MEMORY = []\n_ORDERS = []\n" + WRAPPER.format(methods=TRICKS[trick])
    assert check_source(source) == []  # nothing forbidden: the evaluation itself must resist
    recipe = tmp_path / "recipe.py"
    recipe.write_text(source)
    r = harness(recipe, cache, tmp_path / "run")
    if trick == "remembers the image pass":  # the captions' process never saw an image: nothing to recall
        assert r["status"] == "error" and "(eclip.encode, texts) failed" in r["reason"], r["stderr"][-2000:]
        return
    if trick in ("counts its calls", "replays the shuffle"):
        # an answer by position, not by input: the copies encoded again at the end get other
        # embeddings than their first, and the batch check refuses the run before any ranking
        assert r["status"] == "error" and r["val_mean_rank"] is None, r["stderr"][-2000:]
        assert r["reason"].startswith("evaluation (images): an item encoded again, fresh and in a pair, got "
                                      "another embedding"), r["reason"]
        # without the batch check, the secret orders alone leave it at chance
        from eclip import harness as h
        from eclip import harness_eval

        monkeypatch.setattr(harness_eval, "BATCH_PROBES", 0)
        out = tmp_path / "unchecked"
        assert h.main(["run", "--recipe", str(recipe), "--data", str(cache), "--budget-s", "1", "--out", str(out),
                       "--device", "cpu"]) == 0, capsys.readouterr().err[-2000:]
        r = json.loads((out / "result.json").read_text())
        assert "batch_gap" not in r and r["val_mean_rank"] > RANDOM * 0.6, r["val_mean_rank"]  # chance, not a match
        return
    assert r["status"] == "ok", r["stderr"][-2000:]
    assert r["val_mean_rank"] == N_VAL - 1  # a constant embedding: ties count against the model


# Models that train normally but use the other items they are given at evaluation (the
# scored split): nothing the static policy can see. Each subclasses the template's model.
USES_ITS_BATCH = {
    "centres each batch on its mean": '''
    def at_eval(x, emb, key):
        emb = emb - emb.mean(0, keepdim=True)
        return emb / emb.norm(dim=1, keepdim=True)
''',
    # the first batch's mean (up to 512 items of the split: all of it when it is smaller),
    # kept for every later batch, so that a copy encoded later in the same process matches
    "centres on the first batch's mean": '''
    def at_eval(x, emb, key):
        if key not in _SEEN:
            _SEEN[key] = emb.mean(0, keepdim=True)
        emb = emb - _SEEN[key]
        return emb / emb.norm(dim=1, keepdim=True)
''',
    # standardised over its batch, and an input seen before answered as the first time
    "remembers its answers": '''
    def at_eval(x, emb, key):
        emb = (emb - emb.mean(0, keepdim=True)) / (emb.std(0, keepdim=True) + 1e-6)
        emb = emb / emb.norm(dim=1, keepdim=True)
        flat = x.reshape(x.shape[0], -1)
        for seen_x, seen_e in _MEMORY:
            if seen_x.shape[1] == flat.shape[1]:
                hit = (flat[:, None, :] == seen_x[None, :, :]).all(2)  # [b, seen]
                found = hit.any(1)
                emb[found] = seen_e[hit[found].float().argmax(1)]
        _MEMORY.append((flat.clone(), emb.clone()))
        return emb
''',
}

BATCH_WRAPPER = '''

from eclip.model import EclipModel as _EclipModel

_SEEN = {{}}
_MEMORY = []
_plain_build_model = build_model
{at_eval}

class _AtEval(_EclipModel):
    def encode_image(self, images):
        emb = super().encode_image(images)
        return emb if self.training else at_eval(images, emb, "img")

    def encode_text(self, tokens, mask):
        emb = super().encode_text(tokens, mask)
        return emb if self.training else at_eval(tokens, emb, "txt")


def build_model(spec):
    model = _plain_build_model(spec)
    wrapped = _AtEval(model.cfg).to(spec.device)
    wrapped.load_state_dict(model.state_dict())
    return wrapped
'''


@pytest.mark.parametrize("trick", list(USES_ITS_BATCH))
def test_a_model_that_uses_the_other_items_it_is_given_is_refused(cache, tmp_path, trick):
    source = TEMPLATE.read_text() + BATCH_WRAPPER.format(at_eval=textwrap.dedent(USES_ITS_BATCH[trick]))
    assert check_source(source) == []  # nothing forbidden: the batch check must catch it
    recipe = tmp_path / "recipe.py"
    recipe.write_text(source)
    r = harness(recipe, cache, tmp_path / "run")
    assert r["status"] == "error" and r["val_mean_rank"] is None and r["returncode"] == 1, r["stderr"][-2000:]
    assert r["reason"].startswith("evaluation (images): an item encoded again, fresh and in a pair, got another "
                                  "embedding than among the rest (1 - cosine "), r["reason"]
    assert float(r["reason"].split("1 - cosine ")[1].split(",")[0]) > BATCH_TOL
    assert not any((tmp_path / "run" / f"{kind}_batch_check.safetensors").exists() for kind in ("eval", "emb"))


@pytest.mark.parametrize("code,message", [
    ("kernels.retrieval_ranks = lambda *a, **k: None", "assigning into 'kernels.retrieval_ranks'"),
    ("torch.Tensor.sum = lambda *a, **k: torch.zeros(())", "assigning into 'torch.Tensor.sum'"),
    ("_open = getattr(__builtins__, 'op' + 'en')", "use of 'getattr' is not allowed"),
    ("torch.save({}, 'leak.pt')", "attribute '.save' is not allowed"),
    ("_w = torch.load('answers.pt')", "attribute '.load' is not allowed"),
    ("import eclip.evaluate", "import of 'eclip.evaluate' is not allowed"),
    # each of these once passed the check and scored 0 through the harness
    ("_r = kernels.retrieval\n_r.retrieval_ranks = None", "the module 'kernels.retrieval' used as a value"),
    ("_lib = torch.library.Library('aten', 'IMPL')", "attribute '.library' is not allowed"),
    ("import dataclasses\n_f = dataclasses.sys._getframe(0)", "attribute '.sys' is not allowed"),
    # and these ran code in the training process (a module reached as a value, the builtins
    # module read by a class pattern, a torch.compile backend through a dict(...) of the recipe's)
    ("_t = torch.get_device_module('cpu').torch", "attribute '.get_device_module' is not allowed"),
    ("match len:\n    case object(__self__=_b):\n        pass", "a class pattern's keyword reads the dunder attribute"),
    ("def dict(**k):\n    return {'backend': print}", "binding the builtin 'dict' is not allowed"),
    # and these ran os.system in the encoding processes (code dataclass generated from a field's
    # name), which read the cache's pairs and scored a mean rank of 0.6, or read the cache's files
    ("import dataclasses\n_C = torch.autograd.function.FunctionMeta('C', (), {})\n"
     "_w = dataclasses.dataclass(init=False, repr=False)\n_D = _w(_C)", "'dataclasses.dataclass' may only decorate"),
    ("_C = torch.backends.types.new_class('C')", "'torch.backends.types' is 'types'"),
    ("_r = torch.backends.cudnn.warnings.formatwarning('', UserWarning, 'records.jsonl', 1)", "is 'warnings'"),
    # and this one read a generator's frame and the frame's builtins (a class pattern's positional
    # argument reads the field its dataclass names, on anything register() admits): open and
    # __import__ in the encoding processes read the cache's pairs, a mean rank of 0.47 (honest: 18.5)
    ("import dataclasses\nimport typing\n@dataclasses.dataclass\nclass _P(typing.AsyncGenerator):\n"
     "    gi_frame: int = 0\n_P.register(typing.get_origin(typing.Generator))\n"
     "match (lambda: (yield))():\n    case _P(_f):\n        pass", "a class pattern's positional arguments"),
])
def test_reaching_for_the_referee_is_rejected_unrun(cache, tmp_path, code, message):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(TEMPLATE.read_text() + "\n" + code + "\n")
    r = harness(recipe, cache, tmp_path / "run")
    assert r["returncode"] == 2 and r["status"] == "rejected"
    assert any(message in v for v in r["violations"]), r["violations"]


def test_embeddings_of_a_tensor_subclass_are_refused(cache):
    # A subclass's __torch_function__ would run inside the ranking (its ">=" could answer
    # False everywhere: rank 0 for every query), so the evaluation takes plain tensors only.
    import torch

    from eclip.data.cache import load_cache
    from eclip.errors import EclipError
    from eclip.loop import evaluate_split

    class Sub(torch.Tensor):
        pass

    class Model(torch.nn.Module):
        def encode_image(self, images):
            return torch.ones(images.shape[0], 8).as_subclass(Sub)

        def encode_text(self, tokens, mask):
            return torch.ones(tokens.shape[0], 8)

    c = load_cache(cache)
    rows = c.split_images("val")
    with pytest.raises(EclipError, match=r"model.encode_image returned a Sub, not a plain torch.Tensor"):
        evaluate_split(Model(), c, rows, torch.device("cpu"))
    Model.encode_image = Model.encode_text = lambda self, x, *m: torch.ones(x.shape[0], 8)
    assert evaluate_split(Model(), c, rows, torch.device("cpu"))["mean_rank"] == N_VAL - 1


# Whatever a recipe reaches in its own processes, there is no evaluation data to find: it
# looks through every object the interpreter tracks for caches and image tensors, at import.
# (Forbidden by the policy; the test switches the policy off to see what the processes hold.)
PROBE = '''
import gc as _gc
import json as _json
import os as _os
from eclip.data.cache import Cache as _Cache

_objs = _gc.get_objects()
with open(_os.environ["ECLIP_TEST_PROBE"], "a") as _f:
    _f.write(_json.dumps({
        "caches": [[int(c.images.shape[0]), sorted(set(c.split.tolist()))] for c in _objs if isinstance(c, _Cache)],
        "image_rows": sorted({int(t.shape[0]) for t in _objs
                              if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 4}),
    }) + "\\n")
'''


def test_the_recipes_processes_hold_no_split_they_are_scored_on(cache, tmp_path, monkeypatch, capsys):
    from eclip import harness as h

    recipe = tmp_path / "recipe.py"
    recipe.write_text(TEMPLATE.read_text() + PROBE)
    probe = tmp_path / "probe.jsonl"
    monkeypatch.setenv("ECLIP_TEST_PROBE", str(probe))
    # the probe finds what is there: by hand, eclip.train holds the whole cache (380 images)
    mine = subprocess.run([sys.executable, "-m", "eclip.train", "--recipe", str(recipe), "--data", str(cache),
                           "--out", str(tmp_path / "by-hand"), "--steps", "1", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert json.loads(probe.read_text()) == {"caches": [[380, [0, 1, 2]]], "image_rows": [380]}
    probe.unlink()
    monkeypatch.setattr(h, "check_file", lambda path: [])
    monkeypatch.setattr(h, "scrub_environment", lambda: [])
    for final, trained_on, scored in ((False, [0], 60), (True, [0, 1], 20)):
        out = tmp_path / f"run-{final}"
        rc = h.main(["run", "--recipe", str(recipe), "--data", str(cache), "--budget-s", "1", "--out", str(out),
                     "--device", "cpu"] + (["--final"] if final else []))
        assert rc == 0, capsys.readouterr().err[-2000:]
        training, *encoding = (json.loads(line) for line in probe.read_text().splitlines())
        probe.unlink()
        # training: the training images only; encoding: no cache at all, and the scored
        # split's images (in an order the harness drew and kept) in one of the processes
        n = 300 + 60 * final
        assert training == {"caches": [[n, trained_on]], "image_rows": [n]}
        # (and the batch check's 16 of them, with 16 captions, in a third)
        assert sorted(encoding, key=str) == sorted([{"caches": [], "image_rows": []},
                                                     {"caches": [], "image_rows": [scored]},
                                                     {"caches": [], "image_rows": [16]}], key=str)
