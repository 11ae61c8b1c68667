"""of_ds's MosaicGPT against the reference MosaicGPT code (`reference_lms.mosaic_gpt_reference`), at tiny sizes:
weights written in the release's hub layout load through `build_language_model` without remote code, and the
logits, one training step's gradients and KV-cache decoding equal the reference's in fp32."""

import copy

import pytest
import torch

from of_ds.model.language import build_language_model
from of_ds.model.mosaic_gpt import CACHE_FIELD
from of_ds.model.releases import MPT_1B
from of_ds.spec import LMSpec

from .reference_lms import mosaic_gpt_reference, write_hub_release

TINY = dict(d_model=32, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=120)
# the 3B releases' settings (ALiBi, QK LayerNorm, no biases), and variants that exercise the other code paths
VARIANTS = {
    "release": {},
    "learned_positions_biases": dict(alibi=False, attn_qk_ln=False, no_bias=False),
    "clip_scale": dict(attn_clip_qkv=0.5, softmax_scale=0.3, mlp_ratio=2),
}


def release_config(variant: str) -> dict:
    """MPT_1B's config.json (every published field, remote-code auto_map included) at tiny sizes."""
    return {**copy.deepcopy(MPT_1B), **TINY, **VARIANTS[variant]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(reference model, our model loaded from the reference's weights in the hub layout, key map)."""
    config = release_config(request.param)
    torch.manual_seed(0)
    ref, key_map = mosaic_gpt_reference(config)
    theirs = ref.state_dict()
    ours_sd = {k: theirs[v] for k, v in key_map.items()}
    folder = write_hub_release(tmp_path_factory.mktemp(request.param), config, ours_sd)
    # trust_remote_code as the original's spec had it: of_ds builds mosaic_gpt natively all the same
    lm = build_language_model(LMSpec(name_or_path=str(folder), trust_remote_code=True), offline=True)
    return ref, lm.eval(), key_map


def batch(seed: int = 1, b: int = 3, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 8:] = False  # right padding, as training batches are
    mask[b - 1, 5:] = False
    return ids, mask


def test_release_loads_natively_with_the_release_keys(pair):
    ref, lm, key_map = pair
    assert type(lm).__name__ == "MosaicGPTForCausalLM"
    assert lm.lm_head.weight is lm.transformer.wte.weight  # logits through the embedding, as MosaicGPT's
    ours = {k for k in lm.state_dict() if k != "lm_head.weight"}
    assert ours == set(key_map)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logits_equal_the_reference(pair, attention):
    ref, lm, _ = pair
    lm.config._attn_implementation = attention
    try:
        ids, mask = batch()
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            got = lm(ids, attention_mask=mask.long()).logits
    finally:
        lm.config._attn_implementation = "sdpa"
    real = mask[..., None].expand_as(want)  # padded positions' outputs are not used by either
    assert (got - want)[real].abs().max() < 1e-5 * want.abs().max()


def test_one_training_step_gradients_equal_the_reference(pair):
    ref, lm, key_map = pair
    ids, mask = batch(seed=2)
    labels = ids.masked_fill(~mask, -100)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    ref.train(), lm.train()
    try:
        ref.zero_grad(), lm.zero_grad()
        loss_of(ref(ids, attention_mask=mask).logits).backward()
        loss_of(lm(ids, attention_mask=mask.long()).logits).backward()
    finally:
        ref.eval(), lm.eval()
    ref_params, our_params = dict(ref.named_parameters()), dict(lm.named_parameters())
    for ours, theirs in key_map.items():
        g, want = our_params[ours].grad, ref_params[theirs].grad
        assert (g - want).abs().max() <= 1e-5 * want.abs().max() + 1e-9, ours


def test_kv_cache_decoding_equals_the_reference(pair):
    """Greedy decoding one token at a time through each model's own cache, from a left-padded prompt."""
    ref, lm, _ = pair
    ids, _ = batch(seed=3, b=2, length=7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False  # left padding, as generation prompts are
    ref_ids, our_ids = ids, ids
    ref_past, our_cache = None, None
    ref_mask = our_mask = mask
    with torch.no_grad():
        for step in range(5):
            r = ref(ref_ids if step == 0 else ref_ids[:, -1:], attention_mask=ref_mask, past_key_values=ref_past, use_cache=True)
            o = lm(our_ids if step == 0 else our_ids[:, -1:], attention_mask=our_mask.long(), past_key_values=our_cache, use_cache=True)
            want, got = r.logits[:, -1], o.logits[:, -1]
            assert (got - want).abs().max() < 1e-5 * want.abs().max(), step
            ref_past, our_cache = r.past_key_values, getattr(o, CACHE_FIELD)
            nxt = want.argmax(-1, keepdim=True)
            ref_ids, our_ids = torch.cat([ref_ids, nxt], 1), torch.cat([our_ids, nxt], 1)
            ref_mask = our_mask = torch.cat([ref_mask, torch.ones_like(nxt, dtype=torch.bool)], 1)


def test_settings_it_does_not_implement_are_refused_by_name(tmp_path):
    for field, value in (("prefix_lm", True), ("attn_uses_sequence_id", True), ("logit_scale", 0.5)):
        config = {**release_config("release"), field: value}
        with pytest.raises(ValueError, match=field):
            build_language_model(LMSpec(name_or_path=None, config=config), offline=True)
