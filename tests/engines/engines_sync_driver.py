"""Under torchrun (2 ranks, through engines_drivers.py): train_loop for 4 steps, logging only at the last, and record every call that
would make the host wait for the device on a GPU (`item`, `bool`, `float`, `int`, `tolist`, `nonzero`, `cpu`,
`numpy` on a tensor) during step 3, a step that neither logs nor saves. Writes OUT/{KIND}-rank{R}.json: the
calling sites, `file:function`, with counts.

KIND is ENGINE:PRECISION[:mpt][:fused], e.g. deepspeed:bf16 (ZeRO-2) or ddp:bf16:mpt (the recipes' LM family;
default: the stand-in's tiny llama); `fused` sets engine.fuse_datasets. On a CPU every tensor is a host tensor, so the sites that
read the loader's host tensors on purpose (`num_images`, the attention-mask token count) are reported too; the test
names them."""

import collections
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from engines_standin import StandInData, tiny_spec_dict  # noqa: E402

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero", "cpu", "numpy")
sites: collections.Counter = collections.Counter()
recording = [False]


def instrument() -> None:
    if getattr(torch.Tensor, "_of_ds_instrumented", False):
        return
    torch.Tensor._of_ds_instrumented = True
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, __name=name, __original=original, **kwargs):
            if recording[0]:
                frame = traceback.extract_stack(limit=2)[0]
                sites[f"{Path(frame.filename).name}:{frame.name}:{__name}"] += 1
            return __original(self, *args, **kwargs)

        setattr(torch.Tensor, name, wrapped)


def main(tok_dir: str, out: str, kind: str) -> None:
    from of_ds.runtime import build_runtime
    from of_ds.spec import RunSpec
    from of_ds.train.checkpoint import CheckpointManager, TrainState
    from of_ds.train.loop import train_loop
    from of_ds.train.metrics import Metrics
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer
    from of_ds.train.stop import StopFlag

    engine_kind, precision, *flags = kind.split(":")
    d = tiny_spec_dict(tok_dir, out, engine={"kind": engine_kind, "precision": precision, "zero_stage": 2, "fuse_datasets": "fused" in flags})
    if "mpt" in flags:
        d["model"]["lm"]["config"] = {"model_type": "mpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64}
    d["logging"]["every_n_steps"] = 10
    d["checkpoint"]["every_n_steps"] = 100
    spec = RunSpec.from_dict(d)
    rt = build_runtime(spec.engine)
    trainer = build_trainer(resolve_plan(spec, rt.world_size, data=False, run_dir=False).with_steps(4), rt, data=False)
    engine, tok = trainer.engine, trainer.tokenizer
    forward, calls = engine.forward, [0]

    def counted_forward(*args, **kwargs):
        calls[0] += 1
        recording[0] = calls[0] == 3  # from step 3's forward to step 4's
        return forward(*args, **kwargs)

    engine.forward = counted_forward
    sites.clear()
    instrument()
    run_dir = Path(out) / f"run-{kind.replace(':', '-')}"
    ck = CheckpointManager(run_dir / "ckpt", 1, 100, rt)
    # with the signal flag that run() passes: its exchange rides on the step's all-reduce, read without a tensor read
    state = train_loop(engine, StandInData(spec, tok, rank=rt.rank), spec, rt, ck, Metrics(spec, rt, run_dir, 4), TrainState(), 4, StopFlag())
    assert state.step == 4 and calls[0] == 4
    recording[0] = False
    Path(out, f"{kind.replace(':', '-')}-rank{rt.rank}.json").write_text(json.dumps(dict(sites)))
