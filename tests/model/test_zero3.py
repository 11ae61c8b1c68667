"""The decoupled new-token tables train under DeepSpeed ZeRO-3 on 2 CPU ranks: every weight is used through the module
that owns it, so partitioned weights are gathered where they are read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_zero3_trains_new_token_tables_and_keeps_lm_frozen(tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "facts.json"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    job = Path(__file__).with_name("zero3_job.py")
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", "29517", str(job), tiny_tokenizer_dir, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = json.loads(out.read_text())
    assert runs["llama_chunked_loss"]["losses"] == pytest.approx(runs["llama"]["losses"], rel=1e-5)
    assert runs["llama_quick_gelu"]["silu_in_tower"] == 1 and runs["llama"]["silu_in_tower"] == 0
    assert "mosaic_gpt" in runs
    for family, facts in runs.items():  # llama (untied), opt (tied), llama with the loss in chunks, a QuickGELU tower, MosaicGPT
        assert facts["partitioned"] and facts["tower_partitioned"], family
        if family.startswith(("llama", "mosaic_gpt")):  # no dropout: the first ZeRO-3 loss is the unpartitioned model's (OPT's differs)
            assert facts["losses"][0] == pytest.approx(facts["plain_first_loss"], rel=1e-5), family
        assert facts["table_changed"] and facts["head_changed"], family
        assert facts["frozen_rows"] >= 1 and facts["frozen_rows_unchanged"], family  # <PAD>'s row, as the original
        assert facts["embed_unchanged"] and facts["lm_head_unchanged"], family
        assert all(l == l for l in facts["losses"]) and facts["losses"][-1] < facts["losses"][0], family
        assert facts["export_keys"] > 0
