"""Checkpoints of the training loop: what ``save_checkpoint`` writes and ``load_checkpoint``
restores (weights, tied weights, optimizer state), saves cut short, and damaged or unfitting
checkpoints refused with one error naming the file."""

import json
import re

import pytest
import torch

from eclip import train
from eclip.checkpoint import load_checkpoint, save_checkpoint
from eclip.loop import load_recipe


def test_checkpoint_round_trip(train_cache, tmp_path, monkeypatch):
    recipe = load_recipe(train.TEMPLATE)
    recipe.HPARAMS["model"] = {"vision.patch_size": 16, "vision.width": 64, "vision.depth": 1,
                               "text.width": 64, "text.depth": 1, "expert.width": 32}
    from eclip.loop import ModelSpec
    spec = ModelSpec(vocab_size=300, context_length=48, phrase_length=16, image_size=64, device=torch.device("cpu"))
    model = recipe.build_model(spec)
    opt = recipe.build_optimizer(model)
    model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.ones(2, 5, dtype=torch.long),
          torch.ones(2, 5, dtype=torch.bool))[0].sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {"x": torch.arange(3)}, {"step": 1})
    model2, opt2 = recipe.build_model(spec), None
    opt2 = recipe.build_optimizer(model2)
    meta, state = load_checkpoint(tmp_path, model2, opt2)
    assert meta["step"] == 1 and torch.equal(state["x"], torch.arange(3))
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid, st in s1["state"].items():
        for key, v in st.items():
            assert torch.equal(v, s2["state"][pid][key]), (pid, key)
    other = load_recipe(train.TEMPLATE)  # a checkpoint from another config is refused
    other.HPARAMS["model"] = dict(recipe.HPARAMS["model"], **{"vision.width": 32})
    from eclip.errors import EclipError
    with pytest.raises(EclipError, match="checkpoint does not fit this model"):
        load_checkpoint(tmp_path, other.build_model(spec), None)
    # weights without an optimizer's state, or another optimizer's: one line naming the file
    with pytest.raises(EclipError, match=r"checkpoint\.safetensors: the checkpoint's optimizer state does not "
                                         r"fit this optimizer \(.*parameter groups"):
        load_checkpoint(tmp_path, model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    import eclip.checkpoint as ck
    meta, source = ck.read_meta_from(tmp_path)
    monkeypatch.setattr(ck, "read_meta_from", lambda d: ({k: v for k, v in meta.items() if k != "optimizer"}, source))
    with pytest.raises(EclipError, match=r"checkpoint has no optimizer state .* cannot be resumed"):
        load_checkpoint(tmp_path, model2, opt2)


def test_a_save_cut_short_between_its_two_files_reads_back_whole(tmp_path, monkeypatch):
    # killed after the tensors file is renamed into place and before checkpoint.json is: the
    # meta read back is the one saved with those tensors, not the previous save's
    import eclip.checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, opt, {}, {"step": 3})
    with torch.no_grad():
        model.weight.add_(1.0)
    real = ckpt.atomic_write

    def killed_before_the_json(path, write):
        if path.name == ckpt.META:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", killed_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, opt, {}, {"step": 5})
    assert json.loads((tmp_path / ckpt.META).read_text())["step"] == 3  # the previous save's
    other = torch.nn.Linear(3, 2)
    meta, _ = load_checkpoint(tmp_path, other, None)
    assert meta["step"] == 5 and torch.equal(other.weight, model.weight)
    # a checkpoint written before the header copy is read from its JSON
    from safetensors.torch import load_file
    from safetensors.torch import save_file as plain_save

    plain_save(load_file(tmp_path / ckpt.TENSORS), str(tmp_path / ckpt.TENSORS))
    assert ckpt.read_meta(tmp_path)["step"] == 3


def test_checkpoint_with_tied_weights(tmp_path):
    # Two names for one tensor (tied weights) are stored once and restored as one.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    model = Tied()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, opt, {}, {"step": 0})
    other = Tied()
    load_checkpoint(tmp_path, other, None)
    assert torch.equal(other.a.weight, model.a.weight) and other.a.weight is other.b.weight


def test_checkpoint_keeps_an_optimizers_plain_number_state(tmp_path):
    # AdamW keeps its step as a tensor; a recipe's optimizer may keep a Python number
    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["count"] = self.state[p].get("count", 0) + 1
            return super().step(closure)

    model = torch.nn.Linear(3, 2)
    opt = Counting(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {}, {"step": 2})
    model2 = torch.nn.Linear(3, 2)
    opt2 = Counting(model2.parameters(), lr=0.1)
    load_checkpoint(tmp_path, model2, opt2)
    assert [opt2.state[p].get("count") for p in model2.parameters()] == [2, 2]


def test_a_checkpoint_that_lacks_weights_of_the_model_is_refused(tmp_path):
    # a recipe's own model has no cfg to compare: the strict load is what refuses it
    from eclip.errors import EclipError

    small = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_checkpoint(tmp_path, small, torch.optim.AdamW(small.parameters()), {}, {"step": 0})
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(EclipError, match="checkpoint does not fit this model"):
        load_checkpoint(tmp_path, bigger, None)


def test_a_channels_last_model_and_its_optimizer_state_round_trip(tmp_path):
    # channels_last conv weights (and AdamW's moments, made like them) are not contiguous in
    # the default layout, which safetensors refuses to write as they are
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).square().sum().backward()
    opt.step()
    assert not model.weight.is_contiguous() and not opt.state[model.weight]["exp_avg"].is_contiguous()
    save_checkpoint(tmp_path, model, opt, {}, {"step": 1})
    model2 = torch.nn.Conv2d(3, 4, 3)
    opt2 = torch.optim.AdamW(model2.parameters())
    load_checkpoint(tmp_path, model2, opt2)
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[model2.weight][key], opt.state[model.weight][key]), key


def test_save_checkpoint_times_the_writing_only(tmp_path, monkeypatch):
    # the loop subtracts this from the time after training: a clock that advances 1 s per
    # file written must read 2 s, whatever gathering the tensors took
    import eclip.checkpoint as ckpt

    clock = [100.0]
    real = ckpt.atomic_write

    def slow_write(path, write):
        clock[0] += 1.0
        real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", slow_write)
    monkeypatch.setattr(ckpt.time, "perf_counter", lambda: clock[0])
    model = torch.nn.Linear(3, 2)
    assert save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), {}, {"step": 0}) == 2.0


@pytest.mark.parametrize("where", ["header", "json"])
@pytest.mark.parametrize("text,reason", [
    ('{"step": 3', r"unreadable checkpoint metadata \(Expecting"),  # cut short
    ("[1, 2]", r"unreadable checkpoint metadata \(not a JSON object\)"),
])
def test_unreadable_checkpoint_metadata_is_one_error_naming_its_file(tmp_path, where, text, reason):
    # the meta is read from the tensors file's header, or from checkpoint.json for a
    # checkpoint older than the header copy: the error names the one it came from
    from safetensors.torch import save_file

    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / ckpt.TENSORS),
              metadata={ckpt.HEADER_KEY: text} if where == "header" else None)
    (tmp_path / ckpt.META).write_text(text if where == "json" else '{"step": 1}')
    source = tmp_path / (ckpt.TENSORS if where == "header" else ckpt.META)
    with pytest.raises(EclipError, match=rf"^{re.escape(str(source))}: {reason}"):
        ckpt.read_meta(tmp_path)


def test_checkpoint_json_that_is_not_text_is_one_error_naming_it(tmp_path):
    # damaged bytes in checkpoint.json (read when the tensors file has no header copy) were a
    # UnicodeDecodeError traceback from `train --resume` and `eclip.encode`
    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    (tmp_path / ckpt.META).write_bytes(b"\xff\xfe{garbage")
    with pytest.raises(EclipError, match=rf"^{re.escape(str(tmp_path / ckpt.META))}: "
                                         r"unreadable checkpoint metadata \(not UTF-8 text\)$"):
        ckpt.read_meta(tmp_path)


def test_an_alias_of_no_stored_weight_is_one_error_naming_the_file(tmp_path):
    # tied weights are stored once and named again in the metadata's aliases; an alias whose
    # weight is not in the file (edited or foreign metadata) was a bare KeyError
    from safetensors.torch import load_file, save_file

    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    tied = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    tied[1].weight = tied[0].weight
    save_checkpoint(tmp_path, tied, torch.optim.AdamW(tied.parameters()), {}, {"step": 0})
    meta, source = ckpt.read_meta_from(tmp_path)
    assert meta["aliases"] == {"1.weight": "0.weight"}  # the case being damaged below
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    fresh[1].weight = fresh[0].weight
    load_checkpoint(tmp_path, fresh, None)
    assert torch.equal(fresh[1].weight, tied[0].weight)
    meta["aliases"] = {"1.weight": "2.weight"}
    tensors = load_file(str(source))
    save_file(tensors, str(source), metadata={ckpt.HEADER_KEY: json.dumps(meta)})
    with pytest.raises(EclipError, match=rf"^{re.escape(str(source))}: checkpoint alias '1\.weight' "
                                         r"names no stored weight '2\.weight'$"):
        load_checkpoint(tmp_path, fresh, None)


def test_a_transposed_view_of_a_weight_is_no_alias_of_it(tmp_path):
    # a buffer holding w.t() has w's storage, offset and (square) shape: it was saved as an
    # alias of w and loaded as w itself, silently
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.arange(16.0).reshape(4, 4))
            self.register_buffer("wt", self.w.detach().t())

    m = M()
    save_checkpoint(tmp_path, m, torch.optim.AdamW(m.parameters()), {}, {"step": 0})
    fresh = M()
    with torch.no_grad():
        fresh.w.zero_()
    load_checkpoint(tmp_path, fresh, None)
    assert torch.equal(fresh.w, m.w) and torch.equal(fresh.wt, m.w.t())


@pytest.mark.parametrize("other,reason", [
    (torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)), r'Missing key\(s\) in state_dict: "1\.weight"'),
    (torch.nn.Sequential(torch.nn.Linear(4, 2)), r"size mismatch for 0\.weight"),
])
def test_a_checkpoint_that_does_not_fit_says_which_weight(tmp_path, other, reason):
    # torch's first line only says "Error(s) in loading state_dict for Sequential": the
    # reason given is the line after it, which names the weight
    from eclip.errors import EclipError

    small = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_checkpoint(tmp_path, small, torch.optim.AdamW(small.parameters()), {}, {"step": 0})
    with pytest.raises(EclipError, match=rf"checkpoint does not fit this model \({reason}"):
        load_checkpoint(tmp_path, other, None)


def test_optimizer_groups_without_their_parameters_are_refused(tmp_path):
    # groups that lack their "params" (a checkpoint written or edited by another tool) make
    # torch raise a KeyError: one error naming the file instead
    from safetensors.torch import load_file, save_file

    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), {}, {"step": 0})
    meta = ckpt.read_meta(tmp_path)
    meta["optimizer"]["param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                         for g in meta["optimizer"]["param_groups"]]
    path = tmp_path / ckpt.TENSORS
    save_file(load_file(path), str(path), metadata={ckpt.HEADER_KEY: json.dumps(meta)})
    other = torch.nn.Linear(3, 2)
    with pytest.raises(EclipError, match=rf"^{re.escape(str(path))}: the checkpoint's optimizer state does not "
                                         r"fit this optimizer \(a parameter group without its list of "
                                         r"parameters\)$"):
        load_checkpoint(tmp_path, other, torch.optim.AdamW(other.parameters()))


def edited(out, change) -> None:
    """Rewrite the checkpoint in ``out`` through ``change(meta, tensors)`` (both in place)."""
    from safetensors.torch import load_file, save_file

    from eclip.checkpoint import HEADER_KEY, read_meta

    meta = read_meta(out)
    tensors = load_file(str(out / "checkpoint.safetensors"))
    change(meta, tensors)
    save_file(tensors, str(out / "checkpoint.safetensors"), metadata={HEADER_KEY: json.dumps(meta)})


@pytest.mark.parametrize("change,message", [
    (lambda m, t: m.update(step=float("nan")), "checkpoint metadata has step = NaN, expected a count"),
    (lambda m, t: m.update(step=-5), "checkpoint metadata has step = -5, expected a count"),  # wiped the log
    (lambda m, t: m.pop("trained_s"), "checkpoint metadata lacks 'trained_s', which a resume needs"),
    (lambda m, t: m.update(trained_s=float("inf")), "checkpoint metadata has trained_s = Infinity, expected seconds"),
    (lambda m, t: m.update(samples=None), "checkpoint metadata has samples = null, expected a count"),
    (lambda m, t: m.update(hparams=5), "checkpoint metadata has hparams = 5, expected an object"),
    (lambda m, t: m.update(data_placement="gpu"), "data_placement = \"gpu\", expected auto, device or host"),
    (lambda m, t: m["optimizer"]["scalars"].update({"a.b": 1}), "the checkpoint's optimizer state names 'a.b'"),
    (lambda m, t: t.update({"optim.0.exp_avg": torch.zeros(3)}),  # silently trained on a 3-element buffer
     "the checkpoint's optimizer state exp_avg of parameter 0 has shape [3], the parameter ["),
    (lambda m, t: t.update({"state.data_perm": t["state.data_perm"] * 1000}),
     "the data order (data_perm) is no permutation of this split's"),
    (lambda m, t: t.pop("state.data_perm"), "checkpoint.safetensors: lacks state.data_perm; it cannot be resumed"),
    (lambda m, t: t.update({"state.data_generator": t["state.data_generator"][:10]}),
     "the data generator's state does not fit"),
], ids=["step NaN", "step negative", "no trained_s", "trained_s inf", "samples null", "hparams 5", "placement gpu",
        "scalar of no parameter", "moment of another shape", "perm out of range", "no perm", "short generator"])
def test_a_damaged_checkpoint_is_refused_in_one_line_on_resume(train_cache, tmp_path, capsys, change, message):
    # each once a traceback in the loop, or a run that trained on silently wrong state
    from train_support import SMALL, run

    out = tmp_path / "run"
    assert run(["--data", train_cache, "--out", out, "--steps", 2, *SMALL], capsys)[0] == 0
    edited(out, change)
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert err.startswith("train: error: ") and err.count("\n") == 1


def test_a_missing_step_is_refused_before_the_log_is_trimmed(train_cache, tmp_path, capsys):
    from train_support import SMALL, run

    out = tmp_path / "run"
    assert run(["--data", train_cache, "--out", out, "--steps", 2, *SMALL], capsys)[0] == 0
    rows = (out / "metrics.jsonl").read_text()
    edited(out, lambda m, t: m.pop("step"))
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and "checkpoint metadata lacks 'step', which a resume needs" in err
    assert (out / "metrics.jsonl").read_text() == rows  # was wiped before the refusal


def test_another_optimizers_own_state_shapes_are_its_own(tmp_path):
    # a low-rank optimizer keeps exp_avg projected: the shape check is for torch's optimizers
    class LowRank(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["exp_avg"] = torch.zeros(p.shape[0], 2)

    model = torch.nn.Linear(4, 3)
    opt = LowRank(model.parameters())
    opt.step()
    save_checkpoint(tmp_path, model, opt, {}, {"step": 1})
    model2 = torch.nn.Linear(4, 3)
    opt2 = LowRank(model2.parameters())
    load_checkpoint(tmp_path, model2, opt2)
    assert opt2.state[model2.weight]["exp_avg"].shape == (3, 2)
