"""Pretrained towers: a tiny random-init Hugging Face encoder saved to a local directory (no
network, no downloaded weights) used as the text tower end to end; timm where it imports."""

import json
import re
import shutil
import sys

import pytest
import torch

from eclip import train
from eclip.data.cache import load_cache
from eclip.errors import EclipError
from eclip.model import build_model, model_config
from eclip.pretrained import HFTextTower, TimmImageTower, count_flops, parse_spec, retokenize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, small_cache):
    """A 1-layer, 32-wide BERT and a WordPiece tokenizer trained on the cache's captions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    records = [json.loads(line) for line in (small_cache / "records.jsonl").read_text().splitlines()]
    texts = [c for r in records for c in r["captions"]]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    out = tmp_path_factory.mktemp("hf") / "tiny-bert"
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(out)
    return out


def test_retokenize_uses_the_models_tokenizer(small_cache, hf_dir):
    cache = load_cache(small_cache)
    rc = retokenize(cache, f"hf:{hf_dir}")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    records = [json.loads(line) for line in (small_cache / "records.jsonl").read_text().splitlines()]
    captions = [c for r in records for c in r["captions"]]
    phrases = [p for r in records for p in r["phrases"]]
    for i in (0, 7, len(captions) - 1):
        ids = tok(captions[i])["input_ids"]
        n = int(rc.lengths[i])
        assert (rc.tokens[i, :n] - 1).tolist() == ids and n == len(ids)
        assert not rc.tokens[i, n:].any()  # 0 pads, as everywhere else
    for i in (0, len(phrases) - 1):
        n = int(rc.region_lengths[i])
        assert (rc.region_tokens[i, :n] - 1).tolist() == tok(phrases[i])["input_ids"]
    assert rc.vocab_size == len(tok) + 1 and rc.tokens.shape == cache.tokens.shape
    assert torch.equal(rc.caption_image, cache.caption_image) and rc.images is cache.images
    assert cache.tokens.max() < cache.vocab_size  # the original is untouched


def test_hf_tower_loads_the_saved_weights_and_honours_the_mask(hf_dir):
    cfg = model_config("tiny", image_size=64, vocab_size=300, context_length=16, **{"text.pretrained": f"hf:{hf_dir}",
                                                                                    "expert.enabled": False})
    model = build_model(cfg)
    saved = transformers.BertModel.from_pretrained(hf_dir)
    assert isinstance(model.text, HFTextTower) and model.text_proj.in_features == 32
    assert torch.equal(model.text.model.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)
    model.eval()
    tokens = torch.tensor([[3, 10, 11, 4, 0, 0], [3, 12, 4, 0, 0, 0]])
    mask = tokens != 0
    emb = model.encode_text(tokens, mask)
    assert emb.shape == (2, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the tower sees HF ids (shifted back by one), and padding does not leak into the result
    ref = saved(input_ids=(tokens - 1).clamp_min(0), attention_mask=mask.long()).last_hidden_state[:, 0]
    assert torch.allclose(model.text(tokens, mask), ref, atol=1e-6)
    noisy = tokens.clone()
    noisy[0, 5] = 0
    noisy[1, 4:] = 0
    assert torch.allclose(model.encode_text(noisy, mask), emb, atol=1e-6)


def test_an_hf_tower_trains_with_dropout_and_keeps_its_position_tables_undecayed(hf_dir):
    # from_pretrained returns the model in eval mode, and the tower once kept it so: no
    # dropout in training, whatever the top-level mode said
    cfg = model_config("tiny", image_size=64, vocab_size=300, context_length=16, **{"text.pretrained": f"hf:{hf_dir}",
                                                                                    "expert.enabled": False})
    model = build_model(cfg)
    assert all(m.training for m in model.modules())
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in model.param_groups(0.1))
    assert {"text.model.embeddings.position_embeddings.weight",
            "text.model.embeddings.token_type_embeddings.weight"} <= no_decay
    assert "text.model.embeddings.word_embeddings.weight" in decay  # the token table decays, as ours


def test_train_end_to_end_with_an_hf_text_tower(small_cache, hf_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "4", "--device", "cpu",
                       "--text-tower", f"hf:{hf_dir}", "--batch_size=16"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["val_mean_rank"] is not None
    assert result["hparams"]["text_tower"] == f"hf:{hf_dir}"
    from safetensors.torch import load_file

    keys = load_file(str(out / "checkpoint.safetensors"))
    assert any(k.startswith("model.text.model.embeddings.") for k in keys)
    # resume rebuilds the same tower and continues
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "6", "--device", "cpu",
                       "--text-tower", f"hf:{hf_dir}", "--batch_size=16", "--resume"]) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 6


def test_bad_tower_specs_are_one_line_errors(small_cache, tmp_path, capsys):
    with pytest.raises(EclipError, match=r"image_tower: expected timm:NAME"):
        parse_spec("resnet50", "timm")
    with pytest.raises(EclipError, match=r"text_tower: expected hf:NAME"):
        parse_spec("hf:", "hf")
    assert parse_spec("timm:vit_small_patch16_224@w.safetensors", "timm") == ("vit_small_patch16_224", "w.safetensors")
    missing = tmp_path / "no-such-model"
    assert train.main(["--data", str(small_cache), "--out", str(tmp_path / "r"), "--steps", "1", "--device", "cpu",
                       "--text-tower", f"hf:{missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: error: text_tower: could not load the tokenizer of")


def test_records_that_do_not_match_the_cache_are_refused(small_cache, hf_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    lines = (copy / "records.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["phrases"] = first["phrases"][1:]  # as an older cache whose center-crop dropped a box
    (copy / "records.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["sizes"]  # an older cache recorded no file sizes (which would catch this edit first)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EclipError, match=r"records.jsonl: .* do not match the cache's .*eclip.prepare --force"):
        retokenize(load_cache(copy), f"hf:{hf_dir}")


def test_records_that_are_not_text_are_one_error_naming_the_file(small_cache, hf_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    data = (copy / "records.jsonl").read_bytes()
    (copy / "records.jsonl").write_bytes(b"\xff\xfe" + data[2:])  # the same size: the cache's own check passes
    with pytest.raises(EclipError, match=r"records\.jsonl: unreadable \('utf-8' codec can't decode.*eclip\.prepare$"):
        retokenize(load_cache(copy), f"hf:{hf_dir}")


def test_timm_image_tower_random_init():
    try:
        import timm  # noqa: F401
    except Exception:  # not installed, or without a working torchvision (the CI machines)
        pytest.skip("timm does not import here (it needs torchvision)")
    cfg = model_config("tiny", image_size=64, vocab_size=300, context_length=16,
                       **{"vision.pretrained": "timm:vit_tiny_patch16_224@random", "expert.enabled": False})
    model = build_model(cfg)
    emb = model.encode_image(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert emb.shape == (2, 128) and model.image_proj.in_features == model.vision.width


def test_a_short_position_table_caps_the_caption_length(small_cache, hf_dir, tmp_path):
    short = tmp_path / "short-bert"
    src = transformers.AutoTokenizer.from_pretrained(hf_dir)
    src.save_pretrained(short)
    cfg = transformers.BertConfig(vocab_size=len(src), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(short)
    cache = load_cache(small_cache)
    assert cache.context_length > 16
    rc = retokenize(cache, f"hf:{short}")
    assert rc.tokens.shape[1] == 16 and int(rc.lengths.max()) <= 16
    out = tmp_path / "run"
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "2", "--device", "cpu",
                       "--text-tower", f"hf:{short}", "--batch_size=16"]) == 0


def test_the_loop_refuses_a_tower_hparams_do_not_name(small_cache, hf_dir, tmp_path, capsys):
    # the loop tokenizes by HPARAMS["text_tower"]; a tower the recipe sets another way would get
    # the cache's own ids
    line = '    cfg = model_config(HPARAMS["preset"]'  # build_model, once its overrides are set
    template = train.TEMPLATE.read_text()
    assert line in template
    recipe = tmp_path / "recipe.py"
    recipe.write_text(template.replace(line, f'    overrides["text.pretrained"] = "hf:{hf_dir}"\n{line}'))
    assert train.main(["--data", str(small_cache), "--out", str(tmp_path / "r"), "--steps", "1", "--device", "cpu",
                       "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HPARAMS['text_tower'] is '' but the model's text tower is 'hf:" in err[0]


def test_resume_refuses_another_tower(small_cache, hf_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "2", "--device", "cpu",
                       "--batch_size=16"]) == 0
    capsys.readouterr()
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "4", "--device", "cpu",
                       "--batch_size=16", "--text-tower", f"hf:{hf_dir}", "--resume"]) == 2
    assert "checkpoint has text_tower '', this run 'hf:" in capsys.readouterr().err


class FakeTimm:
    """A stand-in for the ``timm`` module where the real one cannot import (CI: no
    torchvision beside the CPU wheel). It builds a small conv backbone with timm's surface
    (``num_features``, ``pretrained_cfg``, ``num_classes=0``) and, like timm, loads a
    ``pretrained_cfg_overlay`` file when ``pretrained=True``: what is under test is our
    adapter and the wiring through model, loop, checkpoint and MFU, not timm."""

    def __init__(self):
        self.calls = []

    def create_model(self, name, pretrained=False, num_classes=None, pretrained_cfg_overlay=None, **kwargs):
        self.calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes,
                               overlay=pretrained_cfg_overlay, **kwargs))
        if name == "needs_no_img_size" and "img_size" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'img_size'")
        if name == "broken":
            raise RuntimeError("Unknown model (broken)\nsecond line")
        assert num_classes == 0
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 8, stride=8), torch.nn.GELU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        net.num_features = 24
        net.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
        if pretrained:
            from safetensors.torch import load_file

            net.load_state_dict(load_file(pretrained_cfg_overlay["file"]))
        return net


@pytest.fixture
def fake_timm(monkeypatch):
    fake = FakeTimm()
    monkeypatch.setitem(sys.modules, "timm", fake)
    return fake


def test_timm_adapter_loads_local_weights_and_uses_their_normalisation(fake_timm, tmp_path):
    from safetensors.torch import save_file

    weights = {k: torch.full_like(v, 0.01 * (i + 1)) for i, (k, v) in
               enumerate(fake_timm.create_model("x", num_classes=0).state_dict().items())}
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    cfg = model_config("tiny", image_size=32, vocab_size=300, context_length=16,
                       **{"vision.pretrained": f"timm:fake_vit@{path}", "expert.enabled": False})
    model = build_model(cfg)
    call = fake_timm.calls[-1]
    assert call["pretrained"] is True and call["overlay"] == {"file": str(path)} and call["img_size"] == 32
    for k, v in model.vision.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert model.vision.width == 24 and model.image_proj.in_features == 24
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    want = model.vision.model((x.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1))
                              / torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
    torch.testing.assert_close(model.vision(model.normalize_images(x)), want, atol=1e-6, rtol=1e-6)
    # conv 8×8 stride 8 on 32 px: 16 positions × 24 × (3·64) MACs → 2·73,728 FLOPs
    assert model.vision.flops() == 2 * 16 * 24 * 3 * 64
    fake_timm.calls.clear()
    TimmImageTower("timm:needs_no_img_size@random", 32)
    assert [c.get("img_size") for c in fake_timm.calls] == [32, None]  # retried without img_size
    assert fake_timm.calls[-1]["pretrained"] is False
    with pytest.raises(EclipError, match=r"^image_tower: timm could not build 'broken' \(RuntimeError: Unknown model "
                                         r"\(broken\)\)$"):
        TimmImageTower("timm:broken@random", 32)


def test_train_end_to_end_with_a_timm_image_tower(fake_timm, small_cache, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(small_cache), "--out", str(out), "--log-every", "2", "--model.text.width=32",
            "--model.text.depth=1", "--model.embed_dim=32", "--batch_size=32"]
    tower = ["--image-tower", "timm:fake_vit@random"]
    assert train.main([*base, *tower, "--steps", "4"]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["hparams"]["image_tower"] == "timm:fake_vit@random"
    assert result["params"] < 100_000  # the fake backbone replaced the preset's ViT
    assert train.main([*base, *tower, "--steps", "6", "--resume"]) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 6
    rc = train.main([*base, "--steps", "8", "--resume"])  # resumed without the tower: refused
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint has image_tower 'timm:fake_vit@random', this run ''" in err, err


def test_timm_weights_must_be_safetensors(tmp_path):
    with pytest.raises(EclipError, match=r"weights.pt: weights must be a .safetensors file"):
        TimmImageTower(f"timm:resnet18@{tmp_path / 'weights.pt'}", 64)


def test_flops_of_a_pretrained_tower_are_counted(hf_dir):
    tower = HFTextTower(f"hf:{hf_dir}", "cls")
    ids = torch.ones(1, 12, dtype=torch.long)
    assert tower.flops(12) == count_flops(lambda t: tower(t, t != 0), ids) > 0
    # 2 FLOPs per multiply-add: at least the attention and MLP matmuls of one 32-wide layer
    assert tower.flops(12) >= 2 * 12 * (4 * 32 * 32 + 2 * 32 * 64)
    assert tower.flops(24) > tower.flops(12)


def test_retokenize_a_subset_reads_the_records_of_its_images(small_cache, hf_dir):
    cache = load_cache(small_cache)
    rows = cache.split_images("val")  # not the first rows: the records must be picked, not taken in order
    whole, sub = retokenize(cache, f"hf:{hf_dir}"), retokenize(cache.subset(rows), f"hf:{hf_dir}")
    cap = torch.isin(cache.caption_image, rows)
    reg = torch.isin(cache.region_image, rows)
    assert torch.equal(sub.tokens, whole.tokens[cap]) and torch.equal(sub.lengths, whole.lengths[cap])
    assert torch.equal(sub.region_tokens, whole.region_tokens[reg]) and sub.vocab_size == whole.vocab_size


def test_a_clip_text_half_pools_its_own_end_of_text_state(tmp_path):
    # CLIP's text transformer is causal: with text.pool = "cls" the first token's state saw
    # nothing of the caption, and every caption got the same embedding. The tower now takes
    # the model's pooled output (the end-of-text state) for a dual encoder's text half.
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    out = tmp_path / "tiny-clip"
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(out)
    tower = HFTextTower(f"hf:{out}", "cls").eval()
    # ids stored shifted by one (0 pads): <bos> a b <eos>, and <bos> c <eos>
    tokens = torch.tensor([[99, 11, 12, 100, 0, 0], [99, 13, 100, 0, 0, 0]])
    with torch.no_grad():
        got = tower(tokens, tokens != 0)
        hidden = tower.model(input_ids=(tokens - 1).clamp_min(0), attention_mask=(tokens != 0).long()).last_hidden_state
    assert got.shape == (2, 32) and (got[0] - got[1]).abs().max() > 1e-3  # two captions, two embeddings
    assert torch.allclose(hidden[0, 0], hidden[1, 0])  # what "cls" read before: the same for both
    mean = HFTextTower(f"hf:{out}", "mean").eval()
    with torch.no_grad():
        assert torch.allclose(mean(tokens, tokens != 0)[1], hidden[1, :3].mean(0), atol=1e-6)


def test_a_roberta_position_table_leaves_out_its_padding_offset(tmp_path):
    # RoBERTa-style models number positions from pad_token_id + 1: a table of 514 takes 512 tokens
    from eclip.pretrained import max_text_length

    for model_type, pad, expected in (("roberta", 1, 14), ("xlm-roberta", 1, 14), ("bert", 0, 16)):
        d = tmp_path / model_type
        d.mkdir()
        cfg = transformers.AutoConfig.for_model(model_type, max_position_embeddings=16, pad_token_id=pad)
        cfg.save_pretrained(d)
        assert max_text_length(f"hf:{d}") == expected, model_type


def test_an_hf_tower_with_pickled_weights_only_is_refused(hf_dir, tmp_path):
    # weights load from safetensors only: a pytorch_model.bin is a pickle, which runs code when loaded
    pickled = tmp_path / "pickled-bert"
    shutil.copytree(hf_dir, pickled)
    model = transformers.AutoModel.from_pretrained(hf_dir)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    with pytest.raises(EclipError, match="text_tower: could not load"):
        HFTextTower(f"hf:{pickled}", "cls")


def test_only_a_timm_spec_names_weights_after_an_at_sign():
    # an HF directory may hold an "@" (user@host mounts, versioned folders): it is all name
    assert parse_spec("hf:models/bert@v2", "hf") == ("models/bert@v2", None)
    assert parse_spec("timm:vit_tiny@random", "timm") == ("vit_tiny", "random")


def test_a_missing_timm_weights_file_is_named_before_timm_is_imported(fake_timm, tmp_path):
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(EclipError, match=rf"^image_tower: {re.escape(str(missing))}: weights file not found$"):
        TimmImageTower(f"timm:fake_vit@{missing}", 32)
    assert fake_timm.calls == []  # refused before any model was built


def test_hf_mean_pool_of_a_caption_without_tokens_is_zero_not_nan(hf_dir):
    # an empty caption (all padding) divides by a count of 0: clamped to 1, its mean is 0
    tower = HFTextTower(f"hf:{hf_dir}", "mean").eval()
    tokens = torch.tensor([[3, 10, 4, 0], [0, 0, 0, 0]])
    mask = tokens != 0
    with torch.no_grad():
        out = tower(tokens, mask)
        hidden = tower.model(input_ids=(tokens - 1).clamp_min(0), attention_mask=mask.long()).last_hidden_state
    assert torch.equal(out[1], torch.zeros(32))
    torch.testing.assert_close(out[0], hidden[0, :3].mean(0), atol=1e-6, rtol=0)


def test_an_encoder_decoder_checkpoint_gives_its_encoder(tmp_path):
    # a T5-like model needs decoder inputs to run whole; the tower keeps its encoder only
    torch.manual_seed(0)
    out = tmp_path / "tiny-t5"
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5Model(cfg).save_pretrained(out)
    tower = HFTextTower(f"hf:{out}", "mean").eval()
    assert tower.width == 16 and not getattr(tower.model.config, "is_decoder", False)
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = tokens != 0
    encoder = transformers.T5EncoderModel.from_pretrained(out).eval()
    with torch.no_grad():
        got = tower(tokens, mask)
        hidden = encoder(input_ids=(tokens - 1).clamp_min(0), attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(got[1], hidden[1, :2].mean(0), atol=1e-6, rtol=0)


def _hf_config_dir(path, hf_dir, tokenizer_max, positions):
    """A tokenizer (of ``hf_dir``) and a BERT config only: retokenize reads no weights."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok.model_max_length = tokenizer_max
    tok.save_pretrained(path)
    transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=positions).save_pretrained(path)
    return f"hf:{path}"


@pytest.mark.parametrize("tokenizer_max,positions,length", [
    (64, 4, 4),  # the position table is the shorter: captions and phrases both fit it
    (6, 64, 6),  # the tokenizer's own maximum is the shorter
])
def test_captions_and_phrases_fit_the_shorter_of_tokenizer_and_position_table(
        small_cache, hf_dir, tmp_path, tokenizer_max, positions, length):
    cache = load_cache(small_cache)
    assert cache.tokens.shape[1] > length and cache.region_tokens.shape[1] > length
    rc = retokenize(cache, _hf_config_dir(tmp_path / "m", hf_dir, tokenizer_max, positions))
    # phrases too: the expert path encodes them with the same position table
    assert rc.tokens.shape[1] == rc.region_tokens.shape[1] == length
    assert int(rc.lengths.max()) == int(rc.region_lengths.max()) == length  # truncated, not dropped


@pytest.mark.parametrize("tokenizer_max,positions", [(64, 3), (3, 64)])
def test_a_model_too_short_for_captions_is_refused(small_cache, hf_dir, tmp_path, tokenizer_max, positions):
    spec = _hf_config_dir(tmp_path / "m", hf_dir, tokenizer_max, positions)
    with pytest.raises(EclipError, match=r"^text_tower: hf:.* takes at most 3 tokens; too short for captions$"):
        retokenize(load_cache(small_cache), spec)


def test_a_dual_encoder_config_gives_its_text_position_table(tmp_path):
    # CLIP's config keeps max_position_embeddings under text_config
    from eclip.pretrained import max_text_length

    transformers.CLIPConfig(text_config=dict(max_position_embeddings=16)).save_pretrained(tmp_path)
    assert max_text_length(f"hf:{tmp_path}") == 16


@pytest.mark.parametrize("change", [('"captions"', '"captionz"'), ('"phrases": ["a ', '"phrases": [7,"')])
def test_records_without_their_captions_are_one_error_naming_the_file(small_cache, hf_dir, tmp_path, change):
    # valid JSON with a damaged record (a key or an item changed) was a KeyError or a
    # TypeError traceback from the tokenizer; the cache's size check does not see it
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    text = (copy / "records.jsonl").read_text()
    assert change[0] in text and len(change[0]) == len(change[1])  # the same size
    (copy / "records.jsonl").write_text(text.replace(*change, 1))
    with pytest.raises(EclipError, match=r"records.jsonl: unreadable \(record 1 has no list of captions and "
                                         r"phrases\); rebuild the cache with python -m eclip.prepare"):
        retokenize(load_cache(copy), f"hf:{hf_dir}")


@pytest.mark.parametrize("isolate", [False, True])
def test_an_isolated_run_may_not_name_a_tokenizer_in_a_folder_it_writes(small_cache, hf_dir, tmp_path, monkeypatch,
                                                                        isolate):
    # the harness tokenizes the held-out captions outside the sandbox, with the tokenizer of
    # the tower the checkpoint names: in an isolated run, never one from a folder a recipe
    # may have written (its run directory, the only local folder its processes see)
    from eclip import harness, sandbox

    if isolate and (why := sandbox.probe()):
        pytest.skip(f"no sandbox on this machine: {why}")
    out = tmp_path / "run"
    shutil.copytree(hf_dir, out / "tower")  # as an earlier run in this directory could have left it
    template = train.TEMPLATE.read_text()
    assert '"text_tower": "",' in template
    recipe = tmp_path / "recipe.py"
    recipe.write_text(template.replace('"text_tower": "",', f'"text_tower": "hf:{out / "tower"}",'))
    monkeypatch.chdir(train.TEMPLATE.parents[1])
    rc = harness.main(["run", "--recipe", str(recipe), "--data", str(small_cache), "--budget-s", "3", "--out", str(out),
                       "--device", "cpu", *["--isolate"] * isolate])
    r = json.loads((out / "result.json").read_text())
    assert r["hparams"]["text_tower"] == f"hf:{out / 'tower'}" and r["steps"] >= 1  # trained with it either way
    if isolate:
        assert rc == 1 and r["status"] == "error" and r["val_mean_rank"] is None
        assert r["reason"] == (f"text_tower 'hf:{out / 'tower'}': with --isolate a text tower comes from the Hugging "
                               "Face hub cache (a model id), not a local folder")
    else:
        assert rc == 0 and r["status"] == "ok" and r["val_mean_rank"] >= 1
