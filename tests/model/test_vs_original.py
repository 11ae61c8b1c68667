"""Our Flamingo against the original OpenFlamingo code, run side by side on the same weights.

The original's `open_flamingo/src` is read at test time from the released open-flamingo 2.0.1 that `make test`
installs apart (--no-deps, in .venv/original; its model code equals main's) or from a git mirror of main
(`OF_ORIGINAL_MIRROR`); nothing of it lives in this repo. Our export (`to_openflamingo_state_dict`) is loaded into
the original model, so this also checks the key layout, the media pairing and the perceiver/cross-attention math
against the real thing.
"""

import copy
import types

import pytest
import torch

from of_ds.model import build_labels
from of_ds.model.build import build_flamingo
from of_ds.model.checkpoint_keys import to_openflamingo_state_dict
from of_ds.model.language import DECODER_LAYERS
from of_ds.spec import CrossAttnSpec, PerceiverSpec

from .conftest import encode, lm_config, open_gates, tiny_spec
from .test_build import bare_lm_like
from .test_state import perturb_trainables

def ours_and_original(original, tokenizer_dir: str, family: str):
    """Our tiny Flamingo (open gates, perturbed trainables, the original's perceiver/cross-attention sizes) and the
    original's Flamingo holding the same weights (our export loaded into it). -> (ours, theirs, tokenizer, model spec)"""
    OriginalFlamingo, FlamingoLMMixin, extend_instance = original
    spec = tiny_spec(tokenizer_dir, family, every_n_layers=2)
    spec = spec.model_copy(update={"perceiver": PerceiverSpec(), "cross_attn": CrossAttnSpec(every_n_layers=2)})  # the original's fixed sizes
    torch.manual_seed(0)
    ours, _, tok = build_flamingo(spec)
    open_gates(ours)
    perturb_trainables(ours, 0)

    lm = bare_lm_like(ours, lm_config(tokenizer_dir, family))
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(DECODER_LAYERS[lm.config.model_type])
    clip = types.SimpleNamespace(visual=copy.deepcopy(ours.vision_encoder))  # same frozen tower, tokens before ln_post
    theirs = OriginalFlamingo(clip, lm, ours.eoc_token_id, ours.media_token_id, vis_dim=ours.vis_dim, cross_attn_every_n_layers=2)
    result = theirs.load_state_dict(to_openflamingo_state_dict(ours), strict=False)
    assert result.unexpected_keys == []
    # only frozen LM/vision weights and the original's duplicate registrations are not in the export
    assert not [k for k in result.missing_keys if "perceiver" in k or (".gated_cross_attn_layer." in k)]
    return ours, theirs, tok, spec


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "mpt"])
def test_logits_equal_the_original_model(original, tiny_tokenizer_dir, family):
    ours, theirs, tok, _ = ours_and_original(original, tiny_tokenizer_dir, family)
    ours.eval(), theirs.eval()

    ids, mask = encode(tok, [
        "a cat <image>a photo of a cat<|endofchunk|> the dog<image>a rocket launches<|endofchunk|>",
        "<image>a cup of coffee<|endofchunk|>",
    ])
    labels = build_labels(ids, mask, "mmc4", ours.media_token_id, ours.eoc_token_id, ours.pad_token_id)
    px = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        a = ours(px, ids, mask, labels=labels, num_images=torch.tensor([2, 1]))
        b = theirs(px[:, :, None], ids, mask, labels=labels)
    assert a.logits.shape == b.logits.shape
    assert torch.allclose(a.logits, b.logits, atol=1e-5), (a.logits - b.logits).abs().max()
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
