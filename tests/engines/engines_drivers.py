"""Run under torchrun (2 ranks): several step drivers in one launch, each over its modes in turn, each writing into
its own folder. `engines_drivers.py TOK_DIR OUT DRIVER=MODE,MODE ...`, DRIVER one of nan, overflow, sync
(engines_{DRIVER}_driver.py, whose docstrings say what each writes), in the order given: sync last, since it wraps
torch.Tensor's reads for the rest of the process (recording only during its own steps)."""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engines_standin import shutdown_process_group  # noqa: E402

if __name__ == "__main__":
    tok_dir, out = sys.argv[1], Path(sys.argv[2])
    for arg in sys.argv[3:]:
        name, _, modes = arg.partition("=")
        driver = importlib.import_module(f"engines_{name}_driver")
        (out / name).mkdir(parents=True, exist_ok=True)
        for mode in modes.split(","):
            driver.main(tok_dir, str(out / name), mode)
    shutdown_process_group()
