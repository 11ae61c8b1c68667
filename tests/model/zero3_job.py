"""Run by test_zero3.py under `deepspeed --num_gpus 2`: ZeRO-3 training of a tiny Flamingo, facts -> JSON.

argv: TOKENIZER_DIR OUT_JSON
  or: original JOBS_JSON OUT_JSON (test_original_checkpoints.py): runs that start from original OpenFlamingo
      checkpoints under our DeepSpeed engine (each job: a run spec), all in this one launch
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deepspeed  # noqa: E402

from model.conftest import build_tiny, encode, open_gates  # noqa: E402
from of_ds.model.checkpoint_keys import to_openflamingo_state_dict  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    deepspeed.init_distributed(dist_backend="gloo")
    if args[0] == "original":
        return original_checkpoint_runs(*args[1:])
    tok_dir, out_path = args
    # untied; tied with activation checkpointing (recomputation re-gathers the partitioned weights)
    facts = {"llama": train_zero3(tok_dir, "llama", False), "opt": train_zero3(tok_dir, "opt", True)}
    # the loss in chunks recomputes the LM head in backward: ZeRO-3 must keep it gathered there
    facts["llama_chunked_loss"] = train_zero3(tok_dir, "llama", False, loss_chunk_tokens=5)
    # a QuickGELU tower, folded (RescaledLinear reads its own partitioned weight in its forward)
    facts["llama_quick_gelu"] = train_zero3(tok_dir, "llama", False, quick_gelu=True)
    # the OpenFlamingo-3B releases' LM (of_ds's MosaicGPT: QK LayerNorm, ALiBi, tied), partitioned and recomputed
    facts["mosaic_gpt"] = train_zero3(tok_dir, "mosaic_gpt", True)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(facts, f)


def train_zero3(tok_dir: str, family: str, checkpointing: bool, loss_chunk_tokens: int = 0, quick_gelu: bool = False) -> dict:
    rank = torch.distributed.get_rank()
    model, _, tok = build_tiny(tok_dir, family, seed=0, quick_gelu=quick_gelu)
    open_gates(model)
    model.set_activation_checkpointing(checkpointing)
    model.set_loss_chunking(loss_chunk_tokens)
    model.train()
    before = {
        "table": model.new_tokens.input.weight.detach().clone(),
        "head": model.new_tokens.output.weight.detach().clone(),
        "embed": model.lang_encoder.get_input_embeddings().weight.detach().clone(),
        "lm_head": model.lang_encoder.get_output_embeddings().weight.detach().clone(),
    }
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a dog", "<image>a cup of coffee<|endofchunk|>"])
    torch.manual_seed(rank)
    px = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():  # the first loss without ZeRO-3, for comparison
        plain_loss = float(model(px, ids, mask, labels=ids, num_images=torch.tensor([2, 1])).loss)
    silu = sum(isinstance(m, torch.nn.SiLU) for m in model.vision_encoder.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 1.0,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0), config=config)  # no decay on the tables, as our param groups
    losses = []
    for _ in range(3):
        loss = engine(px, ids, mask, labels=ids, num_images=torch.tensor([2, 1])).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    m = engine.module
    with deepspeed.zero.GatheredParameters(list(m.parameters()), modifier_rank=None):
        facts = {
            "losses": losses,
            "plain_first_loss": plain_loss,
            "silu_in_tower": silu,
            "tower_partitioned": all(hasattr(p, "ds_id") for p in m.vision_encoder.parameters()),
            "partitioned": hasattr(m.new_tokens.input.weight, "ds_id"),
            "table_changed": not torch.equal(m.new_tokens.input.weight.detach(), before["table"]),
            "head_changed": not torch.equal(m.new_tokens.output.weight.detach(), before["head"]),
            # <PAD> (an input in the padded second row) and any other new id: frozen rows, in both tables
            "frozen_rows_unchanged": all(
                torch.equal(t.weight.detach()[~t.trainable_rows], before[k][~t.trainable_rows].to(t.weight.dtype))
                for t, k in ((m.new_tokens.input, "table"), (m.new_tokens.output, "head"))
            ),
            "frozen_rows": int((~m.new_tokens.input.trainable_rows).sum()),
            "embed_unchanged": torch.equal(m.lang_encoder.get_input_embeddings().weight.detach(), before["embed"]),
            "lm_head_unchanged": torch.equal(m.lang_encoder.get_output_embeddings().weight.detach(), before["lm_head"]),
            "export_keys": len(to_openflamingo_state_dict(m)),
        }
    return facts


def held_moment_equals(param, key: str, expected: torch.Tensor, rank: int, safe_get) -> bool:
    """The optimizer's `key` moment of `param` equals `expected` (ZeRO-3: this rank's partition of it, read without
    the all-gather that gloo lacks)."""
    if not hasattr(param, "ds_id"):
        return torch.allclose(safe_get(param, key).cpu(), expected)
    z3 = param._z3_optimizer
    group, offset, count = z3.grad_position[z3.get_param_id(param)]
    part = z3.optimizer.state[z3.fp32_partitioned_groups_flat[group]][key].narrow(0, offset, count)
    padded = torch.nn.functional.pad(expected.flatten(), (0, param.ds_tensor.ds_numel * torch.distributed.get_world_size() - expected.numel()))
    start = rank * param.ds_tensor.ds_numel
    return torch.allclose(part.cpu(), padded[start:start + count])


def original_checkpoint_runs(jobs_path: str, out_path: str) -> None:
    """Each job: build our model, load the original checkpoint (`checkpoint.resume_from`, with
    `checkpoint.original_optimizer`), train under the spec's ZeRO stage with our loop, save our checkpoint."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engines"))
    from engines_standin import StandInData
    from deepspeed.utils import safe_get_full_optimizer_state
    from pathlib import Path

    from of_ds.model.checkpoint_keys import original_optimizer_state
    from of_ds.runtime import Runtime
    from of_ds.spec import RunSpec
    from of_ds.train.loop import train_loop
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer
    from of_ds.train.untrusted import load_untrusted

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    runtime = Runtime(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)), world_size=world, device=torch.device("cpu"), backend="gloo")
    facts = {}
    with open(jobs_path) as f:
        jobs = json.load(f)
    for name, spec_dict in jobs.items():
        spec = RunSpec.from_dict(spec_dict)
        total = spec.run.max_steps
        plan = resolve_plan(spec, world, data=False).with_steps(total)  # starts from resume_from: weights only
        assert plan.resume.kind == "weights_only" and plan.resume.original
        t = build_trainer(plan, runtime, loader=lambda tok: StandInData(plan.spec, tok, rank=rank))
        spec, engine, data, ck, metrics, state = plan.spec, t.engine, t.data, t.checkpoints, t.metrics, t.state
        path = Path(spec.checkpoint.resume_from)
        carried = original_optimizer_state(engine.module, load_untrusted(path))
        params = dict(engine.module.named_parameters())
        moments_equal = spec.checkpoint.original_optimizer == "carry" and all(  # what the optimizer holds now
            held_moment_equals(params[n], key, carried[n][key], rank, safe_get_full_optimizer_state)
            for n in ("perceiver.latents", "new_tokens.input.weight") for key in ("exp_avg", "exp_avg_sq")
        )
        state = train_loop(engine, data, spec, runtime, ck, metrics, state, total)
        metrics.close()
        facts[name] = {"moments_equal": moments_equal, "steps": state.step,
                       "partitioned": hasattr(params["perceiver.latents"], "ds_id")}
        runtime.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(facts, f)


if __name__ == "__main__":
    main()
