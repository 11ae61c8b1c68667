"""Building: LM families, decoder-layer discovery, logits at init, the trainable set, meta builds, image processor."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from of_ds.model import count_parameters, image_processor_config
from of_ds.model.build import build_flamingo
from of_ds.model.language import DECODER_LAYERS, find_decoder_layers_path

from .conftest import LM_CONFIGS, MAIN_FAMILIES, base_vocab, build_tiny, encode, lm_config, tiny_spec

TEXTS = ["a photo of a cat sitting on a red sofa", "the dog runs"]


def bare_lm_like(model, cfg: dict):
    """A plain HF LM with the Flamingo's LM weights (the wrapper's `.decoder_layer.` level removed), built as of_ds
    builds LMs (so with the same attention kernel: SDPA against eager is `test_mpt_attention.py`'s business)."""
    from of_ds.model.language import build_language_model
    from of_ds.spec import LMSpec

    lm = build_language_model(LMSpec(name_or_path=None, config=dict(cfg)), offline=True).eval()
    sd = {
        k.replace(".decoder_layer.", "."): v
        for k, v in model.lang_encoder.state_dict().items()
        if ".gated_cross_attn_layer." not in k
    }
    lm.load_state_dict(sd, strict=True)
    return lm


@pytest.mark.parametrize("family", list(LM_CONFIGS))
def test_logits_at_init_equal_bare_lm(tiny_tokenizer_dir, family):
    model, _, tok = build_tiny(tiny_tokenizer_dir, family, every_n_layers=1)
    assert len(model.cross_attention_blocks()) == LM_CONFIGS[family].get("num_hidden_layers", LM_CONFIGS[family].get("n_layer", LM_CONFIGS[family].get("n_layers")))
    ids, mask = encode(tok, TEXTS)
    real = mask.bool()
    assert not model.new_tokens.is_new(ids[real]).any() and not real.all()
    px = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        ours = model(px, ids, mask).logits[real]
        bare_ids = ids.masked_fill(~real, 0)  # the bare LM has no <PAD> row; right padding never reaches real tokens
        bare = bare_lm_like(model, lm_config(tiny_tokenizer_dir, family))(input_ids=bare_ids, attention_mask=mask).logits[real]
    assert ours.shape[-1] == len(tok)
    shared = base_vocab(tiny_tokenizer_dir)
    # exact: gates are 0, so every block is the identity; new ids only change their own columns
    assert torch.equal(ours[..., :shared], bare[..., :shared])
    if bare.shape[-1] >= len(tok):  # new ids live in padding rows: their columns start as the LM's own
        # computed by their own 3-row matmul, whose rounding may differ from the LM's full one by an ULP (AMD EPYC)
        torch.testing.assert_close(ours, bare[..., : len(tok)], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", list(LM_CONFIGS))
def test_decoder_layer_discovery(family):
    cfg = dict(LM_CONFIGS[family], vocab_size=100)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    path = find_decoder_layers_path(lm)
    assert path == DECODER_LAYERS[lm.config.model_type]
    layers = lm.get_submodule(path)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == lm.config.num_hidden_layers


def test_discovery_failure_names_the_spec_field(tiny_tokenizer_dir):
    cfg = AutoConfig.for_model("bloom", vocab_size=400, hidden_size=32, n_layer=2, n_head=4)
    lm = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"model\.lm\.decoder_layers_attr"):
        find_decoder_layers_path(lm)
    with pytest.raises(ValueError, match=r"model\.lm\.decoder_layers_attr 'transformer\.nope'"):
        find_decoder_layers_path(lm, "transformer.nope")
    assert find_decoder_layers_path(lm, "transformer.h") == "transformer.h"
    spec = tiny_spec(tiny_tokenizer_dir, "llama")
    spec = spec.updated({"lm.config": dict(model_type="bloom", vocab_size=400, hidden_size=32, n_layer=2, n_head=4)})
    with pytest.raises(ValueError, match=r"model\.lm\.decoder_layers_attr"):
        build_flamingo(spec)
    spec = spec.updated({"lm.decoder_layers_attr": "transformer.h"})
    model, _, tok = build_flamingo(spec)
    ids, mask = encode(tok, ["<image>a cat"])
    assert model(torch.randn(1, 1, 3, 32, 32), ids, mask).logits.shape == (1, ids.shape[1], len(tok))


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", MAIN_FAMILIES)
@pytest.mark.parametrize("freeze", [False, True])
def test_trainable_set(tiny_tokenizer_dir, family, freeze):
    model, _, tok = build_tiny(tiny_tokenizer_dir, family, freeze_lm_embeddings=freeze)
    names = trainable_names(model)
    perceiver = {n for n, _ in model.named_parameters() if n.startswith("perceiver.")}
    xattn = {n for n, _ in model.named_parameters() if ".gated_cross_attn_layer." in n}
    tables = {"new_tokens.input.weight"} | ({"new_tokens.output.weight"} if not model.new_tokens.tied else set())
    assert perceiver and xattn
    assert names == perceiver | xattn | (set() if freeze else tables)
    lm = model.lang_encoder
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert model.new_tokens.tied == tied == (family in ("gpt2", "opt"))
    if tied:  # one shared table, as the LM ties its own matrices
        assert model.new_tokens.output.weight is model.new_tokens.input.weight
    # gradients reach exactly the trainable set, and the new rows get them through both tables
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|>", "<image>a dog<|endofchunk|>"])
    assert (ids == model.pad_token_id).any()  # <PAD> is an input too
    model.train()
    out = model(torch.randn(2, 1, 3, 32, 32), ids, mask, labels=ids)
    out.loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got <= names
    assert not any(n.startswith("vision_encoder.") for n in got)
    if not freeze:
        assert "new_tokens.input.weight" in got
        nt = model.new_tokens
        media, eoc = nt.slot_of_id[model.media_token_id], nt.slot_of_id[model.eoc_token_id]
        assert nt.input.weight.grad[media].abs().sum() > 0  # <image> is an input
        assert nt.output.weight.grad[eoc].abs().sum() > 0  # <|endofchunk|> is a target
        # only those two rows learn, as the original's gradient mask: <PAD> (an input here, and a logit in every
        # softmax) and any other new id keep their initial rows
        frozen = torch.ones(len(nt.new_ids), dtype=torch.bool)
        frozen[media], frozen[eoc] = False, False
        assert model.pad_token_id in nt.new_ids[frozen].tolist()
        assert torch.count_nonzero(nt.input.weight.grad[frozen]) == torch.count_nonzero(nt.output.weight.grad[frozen]) == 0


def test_token_ids_and_tables(tiny_tokenizer_dir):
    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama")
    assert tok.convert_ids_to_tokens([model.media_token_id, model.eoc_token_id]) == ["<image>", "<|endofchunk|>"]
    assert model.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.token_ids.new == tuple(range(base_vocab(tiny_tokenizer_dir), len(tok)))
    assert model.new_tokens._appended
    model2, _, _ = build_tiny(tiny_tokenizer_dir, "gpt_neox")  # 16 spare rows: the new ids are padding rows
    emb = model2.lang_encoder.get_input_embeddings().weight
    assert torch.equal(model2.new_tokens.input.weight, emb[list(model2.token_ids.new)])


def test_meta_build_counts_like_real(tiny_tokenizer_dir):
    real, _, _ = build_tiny(tiny_tokenizer_dir, "llama")
    meta, _, _ = build_flamingo(tiny_spec(tiny_tokenizer_dir, "llama"), meta=True)
    assert next(meta.parameters()).device.type == "meta"
    assert count_parameters(meta) == count_parameters(real)
    assert count_parameters(real)["trainable"] == sum(p.numel() for n, p in real.named_parameters() if p.requires_grad)


def test_image_processor_config(tiny_tokenizer_dir):
    model, processor, _ = build_tiny(tiny_tokenizer_dir, "llama")
    cfg = image_processor_config(model)
    assert cfg.image_size == (32, 32) and cfg.interpolation == "bicubic" and cfg.resize_mode == "shortest"
    from PIL import Image

    img = Image.new("RGB", (64, 48), (255, 0, 0))
    x = processor(img)
    assert x.shape == (3, 32, 32)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


def test_vision_tokens_are_pre_ln_post(tiny_tokenizer_dir):
    """Patch tokens are taken before ln_post, as open_clip < 2.23 gave OpenFlamingo's released checkpoints."""
    model, _, _ = build_tiny(tiny_tokenizer_dir, "llama")
    visual = model.vision_encoder
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = visual(x)[1]
        h = visual.transformer(visual._embeds(x))
    assert tokens.shape == (2, 4, 24)
    assert torch.allclose(tokens, h[:, 1:], atol=1e-6)


def test_bad_vision_specs(tiny_tokenizer_dir):
    spec = tiny_spec(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match=r"model\.vision\.config"):
        build_flamingo(spec.updated({"vision.config": {"vision_cfg": {}}}))
    spec = spec.updated({"vision.config": None, "vision.name": "no-such-model"})
    with pytest.raises(ValueError, match=r"model\.vision\.name"):
        build_flamingo(spec)


def test_local_lm_path_and_vision_checkpoint(tiny_tokenizer_dir, tmp_path):
    """model.lm.name_or_path as a local dir and model.vision.pretrained as a local file load those exact weights."""
    import open_clip

    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama")
    lm = bare_lm_like(model, lm_config(tiny_tokenizer_dir, "llama"))
    lm.save_pretrained(tmp_path / "lm")
    clip = open_clip.create_model("test-vit-tiny", pretrained=None)
    clip.visual.load_state_dict(model.vision_encoder.state_dict())
    torch.save(clip.state_dict(), tmp_path / "vit.pt")

    spec = tiny_spec(tiny_tokenizer_dir, "llama")
    spec = spec.updated({"lm.config": None, "lm.name_or_path": str(tmp_path / "lm"), "vision.pretrained": str(tmp_path / "vit.pt")})
    torch.manual_seed(123)  # different init: only the loaded weights can make the frozen parts equal
    loaded, _, _ = build_flamingo(spec)
    frozen = lambda m: {k: v for k, v in m.state_dict().items() if k.startswith(("vision_encoder.", "lang_encoder.")) and ".gated_cross_attn_layer." not in k}  # noqa: E731
    a, b = frozen(model), frozen(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in b.values() if v.is_floating_point())
    spec = spec.updated({"vision.pretrained": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match=r"model\.vision\.pretrained"):
        build_flamingo(spec)
