"""Run by test_zero3.py under `deepspeed --num_gpus 2`: ZeRO-3 training of a tiny Flamingo, facts -> JSON.

argv: TOKENIZER_DIR OUT_JSON
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
    tok_dir, out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    deepspeed.init_distributed(dist_backend="gloo")
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


if __name__ == "__main__":
    main()
