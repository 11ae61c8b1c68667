"""Shared start-up of the thin scripts in tools/: use the project's venv, import the package from this checkout."""

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _project_python() -> Path | None:
    venv = Path(os.environ.get("VENV") or ".venv")
    venv = venv if venv.is_absolute() else REPO / venv
    python = venv / "bin" / "python"
    return python if python.exists() else None


def run(module: str) -> None:
    """Re-exec under the project venv when started by another interpreter, then exit with `module.main()`."""
    python = _project_python()
    if python is not None and Path(sys.prefix).resolve() != python.parent.parent.resolve():
        os.execv(str(python), [str(python), *sys.argv])
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(importlib.import_module(module).main())
