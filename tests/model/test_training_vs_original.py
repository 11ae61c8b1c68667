"""Our training steps against the original OpenFlamingo trainer, from the same weights and batches: its real
`train_utils.train_one_epoch` (the released 2.0.1 or main, as `test_vs_original.py` reads its model) with the
AdamW groups and constant-with-warmup schedule of its train.py, beside `train_loop` + `build_engine` (ddp, fp32).
Losses, gradient norms and final trainable weights agree to fp32 rounding. Deliberate differences are kept out: the
original also clips each micro-step's partial gradient sum (its bug B4); its linear/cosine horizon counts micro-steps
(B5; the constant schedule has none); it freezes an untied LM's whole output head (we train the new tokens' rows);
an epoch's partial accumulation window (none here)."""

import contextlib
import math
import types

import pytest
import torch
from transformers import get_constant_schedule_with_warmup

from of_ds.engines import build_engine
from of_ds.model import build_labels
from of_ds.model.checkpoint_keys import to_openflamingo_state_dict
from of_ds.runtime import Runtime
from of_ds.spec import RunSpec
from of_ds.train.checkpoint import TrainState
from of_ds.train.loop import train_loop

from .conftest import encode
from .test_vs_original import ours_and_original

GA, STEPS, LR, WARMUP, WD = 2, 4, 1e-2, 2, 0.1  # lr 1e-2: a difference in one update shows in the next losses
WEIGHTS = {"laion": 0.2, "mmc4": 1.0}
CAPS = ["a photo of a cat", "a cup of coffee on a table", "the dog runs", "a rocket launches into the blue sky",
        "a red sofa", "an astronaut stands next to a flag", "a motorcycle parked by the street", "a wooden table"]


@pytest.fixture(scope="module")
def train_one_epoch(original, original_tree):
    """The original's `train_one_epoch`, from its train_utils.py (a self-contained module)."""
    path = original_tree / "open_flamingo/train/train_utils.py"
    module = types.ModuleType("open_flamingo_train_utils")
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module.train_one_epoch


class Batches(list):
    """A loader for either trainer: the original reads `num_batches`, our loop `steps_per_epoch` and `set_epoch`."""

    num_batches = steps_per_epoch = property(len)

    def set_epoch(self, epoch):
        pass


def micro_batches(model, tok, n):
    """n micro-steps of LAION (3 padded captions) and MMC4 (2 padded documents of 3 and 1-2 images, with unlabelled
    text before the first image and after every chunk), in our loader's format."""
    g, eos, out = torch.Generator().manual_seed(0), tok.eos_token, []
    for i in range(n):
        c = CAPS[i:] + CAPS[:i]
        ids, mask = encode(tok, [f"<image>{x}<|endofchunk|>{eos}" for x in (c[0], f"{c[0]} {c[1]}", c[2])])
        laion = dict(pixel_values=torch.randn(3, 1, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask, num_images=torch.ones(3, dtype=torch.long))
        counts = torch.tensor([3, 1 + i % 2])
        ids, mask = encode(tok, [c[d] + "".join(f"<image>{c[d + j + 1]}<|endofchunk|>{c[j]} " for j in range(int(k))) + eos
                                 for d, k in enumerate(counts)])
        px = torch.randn(2, 3, 3, 32, 32, generator=g) * (torch.arange(3) < counts[:, None])[..., None, None, None]
        mmc4 = dict(pixel_values=px, input_ids=ids, attention_mask=mask, num_images=counts)
        for kind, b in (("laion", laion), ("mmc4", mmc4)):
            b["labels"] = build_labels(b["input_ids"], b["attention_mask"], kind, model.media_token_id, model.eoc_token_id, model.pad_token_id)
        out.append({"laion": laion, "mmc4": mmc4})
    assert all((b[k]["attention_mask"] == 0).any() for b in out for k in b)  # every micro-batch has padding
    return Batches(out)


class DDPLike(torch.nn.Module):
    """What train_one_epoch gets in place of DDP (it reaches the model as `.module`); records each forward's loss."""

    def __init__(self, model):
        super().__init__()
        self.module, self.losses = model, []

    def forward(self, **kw):
        out = self.module(**kw)
        self.losses.append(float(out[0].detach()))
        return out


def run_original(train_one_epoch, theirs, tok, batches, monkeypatch):
    model = DDPLike(theirs)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params if "gated_cross_attn" in n], "weight_decay": WD},
                                   {"params": [p for n, p in params if "gated_cross_attn" not in n], "weight_decay": 0.0}], lr=LR)
    # B4: it calls clip_grad_norm_(params, 1.0) after every micro-step. After one that does not step the optimizer
    # the clip only measures here, so both clip the accumulated gradient to 1.0 once per step (clipping does happen)
    clip, norms = torch.nn.utils.clip_grad_norm_, []

    def clip_at_steps(params, max_norm, **kw):
        norms.append(clip(params, max_norm if len(norms) % GA == GA - 1 else math.inf, **kw))
        return norms[-1]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_at_steps)
    args = types.SimpleNamespace(num_epochs=1, precision="fp32", fsdp=False, rank=0, gradient_accumulation_steps=GA, freeze_lm_embeddings=False,
                                 loss_multiplier_laion=WEIGHTS["laion"], loss_multiplier_mmc4=WEIGHTS["mmc4"], report_to_wandb=False, logging_steps=10**9)
    laion = Batches((b["laion"]["pixel_values"][:, 0], (b["laion"]["input_ids"], b["laion"]["attention_mask"])) for b in batches)
    mmc4 = Batches((b["mmc4"]["pixel_values"], list(zip(b["mmc4"]["input_ids"][:, None], b["mmc4"]["attention_mask"][:, None]))) for b in batches)
    train_one_epoch(args=args, model=model, epoch=0, laion_loader=laion, mmc4_loader=mmc4, tokenizer=tok, optimizer=optimizer,
                    lr_scheduler=get_constant_schedule_with_warmup(optimizer, num_warmup_steps=WARMUP), device_id="cpu", wandb=None)
    monkeypatch.undo()
    return list(zip(model.losses[::2], model.losses[1::2])), [float(n) for n in norms[GA - 1::GA]]  # forwards: LAION, MMC4, ...


def run_ours(model_spec, ours, batches):
    datasets = [dict(name=k, kind=k, shards="/nonexistent/{0..1}.tar", batch_size=len(batches[0][k]["input_ids"]), loss_weight=w, max_images=3)
                for k, w in WEIGHTS.items()]
    spec = RunSpec.from_dict({
        "model": model_spec.model_dump(), "data": {"datasets": datasets}, "run": {"epochs": 1}, "engine": {"kind": "ddp", "precision": "fp32"},
        "optim": {"lr": LR, "schedule": "constant", "warmup_steps": WARMUP, "weight_decay": WD, "grad_clip": 1.0, "grad_accum_steps": GA},
    })
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")  # no process group
    losses, norms = [], []  # per micro-step (dataset losses), per step (gradient norm before clipping)
    hooks = types.SimpleNamespace(  # the loop's metrics and checkpoint manager: record, never log or save
        data_wait_timer=contextlib.nullcontext, should_log=lambda step: False, should_save=lambda step, total: False,
        observe=lambda batch, loss: losses.append((float(loss["laion"]), float(loss["mmc4"]))),
        step=lambda step, stats, state, drops, force=False: norms.append(float(stats.grad_norm)), settle_totals=lambda state: None)
    assert train_loop(build_engine(ours, spec, runtime, STEPS), batches, spec, runtime, hooks, hooks, TrainState(), STEPS).step == STEPS
    return losses, norms


@pytest.mark.parametrize("family", ["mpt", "llama"])  # tied, untied (MPT: no dropout, so train mode is deterministic)
def test_training_steps_equal_the_original_trainer(original, train_one_epoch, tiny_tokenizer_dir, family, monkeypatch):
    ours, theirs, tok, spec = ours_and_original(original, tiny_tokenizer_dir, family)
    theirs.requires_grad_(False)  # the original factory's freezing (freeze_lm_embeddings=False)
    for part in (theirs.perceiver, theirs.lang_encoder.gated_cross_attn_layers, theirs.lang_encoder.get_input_embeddings()):
        part.requires_grad_(True)
    if not ours.new_tokens.tied:
        ours.new_tokens.output.weight.requires_grad_(False)  # the original trains no row of an untied head
    before = {k: v.clone() for k, v in to_openflamingo_state_dict(ours).items()}  # on the CPU it holds views

    batches = micro_batches(ours, tok, GA * STEPS)
    theirs_losses, theirs_norms = run_original(train_one_epoch, theirs, tok, batches, monkeypatch)
    ours_losses, ours_norms = run_ours(spec, ours, batches)

    # measured: losses (per micro-step and dataset) differ by at most 9.5e-7, gradient norms by 1.2e-7 relative
    assert len(ours_losses) == len(theirs_losses) == GA * STEPS and len(ours_norms) == len(theirs_norms) == STEPS
    assert torch.allclose(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=0, atol=1e-5), (ours_losses, theirs_losses)
    assert torch.allclose(torch.tensor(ours_norms), torch.tensor(theirs_norms), rtol=1e-5), (ours_norms, theirs_norms)
    after, theirs_sd = to_openflamingo_state_dict(ours), theirs.state_dict()
    for key, value in after.items():  # perceiver, cross-attention blocks, the embedding (and head) with the new rows
        rel = float((value - theirs_sd[key]).abs().max() / theirs_sd[key].abs().max())
        assert rel < 5e-5, (key, rel)  # measured: at most 1.1e-5 (llama's last to_kv; every weight moved ~2.5e-2)
    assert {k for k in after if not torch.equal(after[k], before[k])} == {k for k in after if not k.endswith("lm_head.weight")}
    embed, pad = next(k for k in after if k.endswith(("embed_tokens.weight", "wte.weight"))), ours.pad_token_id
    assert torch.equal(after[embed][pad], before[embed][pad]) and torch.equal(theirs_sd[embed][pad], before[embed][pad])
