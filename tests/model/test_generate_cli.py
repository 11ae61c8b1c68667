"""tools/generate on a .pt checkpoint in both layouts: same caption as model.generate on the same weights."""

import pytest
import torch
import yaml
from PIL import Image

from of_ds.model.checkpoint_keys import to_openflamingo_state_dict
from of_ds.generate_cli import main

from .conftest import build_tiny, open_gates, tiny_spec
from .test_state import perturb_trainables


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    spec = {
        "model": tiny_spec(tiny_tokenizer_dir, "llama").model_dump(mode="json"),
        "data": {"datasets": [{"name": "laion", "kind": "laion", "shards": "unused-{0..1}.tar", "batch_size": 1}]},
    }
    (d / "spec.yaml").write_text(yaml.safe_dump(spec))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    model, processor, tok = build_tiny(tiny_tokenizer_dir, "llama", seed=42)  # spec.run.seed: same frozen weights
    open_gates(model)
    perturb_trainables(model, 1)
    torch.save(model.trainable_state_dict(), d / "ours.pt")
    torch.save(to_openflamingo_state_dict(model), d / "original.pt")
    enc = tok(["<image>a photo of"], return_tensors="pt")
    px = processor(Image.open(d / "red.png").convert("RGB"))[None, None]
    expected = tok.decode(model.generate(px, enc.input_ids, enc.attention_mask, max_new_tokens=4)[0, enc.input_ids.shape[1]:])
    return d, expected


@pytest.mark.parametrize("layout", ["ours", "original"])
def test_generate_cli_captions(setup, layout, capsys):
    d, expected = setup
    rc = main([str(d / f"{layout}.pt"), "--spec", str(d / "spec.yaml"), "--image", str(d / "red.png"),
               "--prompt", "<image>a photo of", "--max-new-tokens", "4", "--num-beams", "1", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_generate_cli_errors(setup, capsys):
    d, _ = setup
    assert main([str(d / "ours.pt"), "--image", str(d / "red.png"), "--prompt", "<image><image>x"]) == 2
    assert "--prompt has 2 <image> but 1 --image" in capsys.readouterr().err
    assert main([str(d / "ours.pt"), "--image", str(d / "red.png")]) == 2
    assert "needs --spec" in capsys.readouterr().err
