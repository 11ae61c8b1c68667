"""Preflight: every path a run spec names, checked before any process group, model or run directory exists.

`preflight(spec, world_size)` raises `PreflightError` (a `SpecError`: one line per problem, each naming the dotted
field and the path) listing every problem at once, and writes nothing. It checks:
- `data.datasets.<name>.shards` (and `val_shards` when validation is on): local shards exist and are tar files, patterns expand to names; remote shards
  (`s3://`, `http(s)://`) are not looked at, and for a `pipe:` command only that its program is on PATH;
- `model.tokenizer`, `model.lm.name_or_path`, `model.vision.pretrained`: a local path exists; a hub name (or an
  open_clip tag) is in the cache when `model.offline` is set (without it, it would be downloaded);
- `run.output_dir`: the run directory exists or can be created, and is writable; `engine.nvme_path` likewise;
- `checkpoint.resume_from`: a checkpoint file, or a folder holding a complete checkpoint;
- `engine.deepspeed_config`: resolves against the spec (`of_ds.engines.deepspeed_config`).
Paths under `run.demo_data` are skipped until the demo data is complete (`DONE` and every part): the run generates them.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import tarfile
from pathlib import Path
from typing import Optional

from .spec import RunSpec, SpecError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"
_TAR_CHECKS = 8  # shards opened to check they are tar files (every one is checked to exist)
_SHOWN = 3  # names shown per problem


class PreflightError(SpecError):
    def __init__(self, problems: list[str]):
        super().__init__(problems)
        n = len(problems)
        head = f"preflight: {n} problem{'s' if n != 1 else ''} with what the spec names (nothing was started or written):"
        self.args = ("\n".join([head] + [f"  - {p}" for p in problems]),)

    def __str__(self) -> str:
        return self.args[0]


def preflight(spec: RunSpec, world_size: int = 1) -> None:
    problems = preflight_problems(spec, world_size)
    if problems:
        raise PreflightError(problems)


def preflight_problems(spec: RunSpec, world_size: int = 1) -> list[str]:
    demo = _pending_demo_dir(spec)
    problems: list[str] = []
    for d in spec.data.datasets:
        problems += _shard_problems(f"data.datasets.{d.name}.shards", d.shards, demo)
        if d.val_shards is not None and spec.logging.eval_every_n_steps:
            problems += _shard_problems(f"data.datasets.{d.name}.val_shards", d.val_shards, demo)
    problems += _model_problems(spec, demo)
    problems += _writable_problems("run.output_dir", spec.run.run_dir, spec.run.output_dir)
    e = spec.engine
    if e.nvme_path and "nvme" in (e.offload_optimizer, e.offload_param):
        problems += _writable_problems("engine.nvme_path", Path(e.nvme_path), e.nvme_path)
    problems += _resume_problems(spec)
    if e.kind == "deepspeed":
        from .engines.deepspeed_config import resolve_deepspeed_config

        try:
            resolve_deepspeed_config(spec, world_size)
        except SpecError as err:
            problems += err.problems
    return problems


# ----------------------------------------------------------------------------------------------------------- helpers
def _shown(names: list[str]) -> str:
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _pending_demo_dir(spec: RunSpec) -> Optional[Path]:
    """The demo data folder while it is still to be generated (paths under it are the run's to make)."""
    from .demo import demo_data_complete

    d = spec.run.demo_data
    if d and not demo_data_complete(d):
        return Path(d).resolve()
    return None


def _under(path: str, folder: Optional[Path]) -> bool:
    return folder is not None and Path(os.path.abspath(os.path.expanduser(path))).is_relative_to(folder)


def _shard_problems(field: str, shards, demo: Optional[Path]) -> list[str]:
    from braceexpand import braceexpand

    patterns = [shards] if isinstance(shards, str) else list(shards)
    problems: list[str] = []
    missing, dirs, local, programs = [], [], [], set()
    total = 0
    for pattern in patterns:
        if not str(pattern).strip():
            problems.append(f"{field}: an empty pattern ('{pattern}') names no shard")
            continue
        for url in braceexpand(pattern):
            total += 1
            if url.startswith("pipe:"):
                words = shlex.split(url[len("pipe:"):]) if url[len("pipe:"):].strip() else []
                if not words:
                    problems.append(f"{field}: '{url}' is a pipe: with no command")
                elif shutil.which(words[0]) is None and words[0] not in programs:
                    programs.add(words[0])
                    problems.append(f"{field}: the program of '{url}' ({words[0]}) is not on PATH")
                continue
            if "://" in url:  # s3://, http(s)://: read remotely, not checked here
                continue
            if _under(url, demo):
                continue
            path = os.path.expanduser(url)
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    missing.append(url)
                local += [f for f in found if os.path.isfile(f)]
            elif os.path.isfile(path):
                local.append(path)
            elif os.path.isdir(path):
                dirs.append(url)
            else:
                missing.append(url)
    if missing:
        problems.append(f"{field}: {len(missing)} of {total} shard(s) not found: {_shown(missing)}")
    if dirs:
        problems.append(f"{field}: {len(dirs)} shard(s) are directories, not tar files: {_shown(dirs)}")
    not_tar = [p for p in local[:_TAR_CHECKS] if not _is_tar(p)]
    if not_tar:
        problems.append(f"{field}: not a tar file: {_shown(not_tar)}")
    return problems


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _looks_local(value: str) -> bool:
    """A path rather than a hub name: absolute or relative path syntax, something there, or a folder it sits in
    (`demo_data/tokenzer` where `demo_data/` exists is a typo'd path, not a hub repo)."""
    if value.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(value):
        return True
    if os.path.exists(value):
        return True
    parent = os.path.dirname(value)
    return bool(parent) and os.path.isdir(parent)


def _hub_cached(repo: str, filenames: tuple[str, ...], cache_dir: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str):
                return True
        except Exception:  # noqa: BLE001 - a malformed name is simply not cached
            return False
    return False


def _hf_problems(field: str, value: str, files: tuple[str, ...], cache_dir, offline: bool, demo) -> list[str]:
    if _under(value, demo):
        return []
    if _looks_local(value):
        path = Path(os.path.expanduser(value))
        if not path.exists():
            return [f"{field}: not found: {value}"]
        if not path.is_dir():
            return [f"{field}: {value} is a file; give the folder that holds its files ({', '.join(files)})"]
        return []
    if offline and not _hub_cached(value, files, cache_dir):
        where = f" ({cache_dir})" if cache_dir else ""
        return [f"{field}: '{value}' is not a local path and not in the HF cache{where}, and model.offline is set"]
    return []


def _model_problems(spec: RunSpec, demo: Optional[Path]) -> list[str]:
    m = spec.model
    problems: list[str] = []
    tok_field = "model.tokenizer" if m.tokenizer else "model.lm.name_or_path"
    tok = m.tokenizer or m.lm.name_or_path
    if tok:
        problems += _hf_problems(tok_field, tok, ("tokenizer_config.json", "tokenizer.json"), m.lm.cache_dir, m.offline, demo)
    if m.lm.config is None and m.lm.name_or_path and not (tok_field == "model.lm.name_or_path" and problems):
        problems += _hf_problems("model.lm.name_or_path", m.lm.name_or_path, ("config.json",), m.lm.cache_dir, m.offline, demo)
    problems += _vision_problems(m, demo)
    return problems


def _vision_problems(m, demo: Optional[Path]) -> list[str]:
    v = m.vision
    value = v.pretrained
    if not value or _under(value, demo):
        return []
    path = Path(os.path.expanduser(value))
    if path.is_file():
        return []
    if path.exists():
        return [f"model.vision.pretrained: {value} is a directory; give the weights file"]
    if "/" in value or os.sep in value or value.startswith("~"):  # a path: open_clip's tags have no slash
        return [f"model.vision.pretrained: not found: {value}"]
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(v.name)
    if value not in tags:
        known = f" (its tags: {', '.join(tags)})" if tags else ""
        return [f"model.vision.pretrained: not found: {value} is neither a file nor a pretrained tag of {v.name}{known}"]
    if m.offline and not _open_clip_cached(v.name, value, v.cache_dir):
        return [f"model.vision.pretrained: {v.name} '{value}' weights are not in the cache, and model.offline is set"]
    return []


def _open_clip_cached(name: str, tag: str, cache_dir: Optional[str]) -> bool:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    hub = cfg.get("hf_hub") or ""
    if hub:  # "org/model/" (open_clip's default file names) or "org/model/file"
        repo, filename = os.path.split(hub)
        names = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        if _hub_cached(repo, names, cache_dir):
            return True
    url = cfg.get("url") or ""
    root = cache_dir or os.path.expanduser("~/.cache/clip")
    return bool(url) and os.path.isfile(os.path.join(root, os.path.basename(url)))


def _writable_problems(field: str, target: Path, value: str) -> list[str]:
    """`target` exists as a writable folder, or its nearest existing ancestor is one (it can be created)."""
    p = Path(os.path.abspath(os.path.expanduser(str(target))))
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return [f"{field}: {value}: {p} is a file, not a directory"]
    if not os.access(p, os.W_OK | os.X_OK):
        return [f"{field}: {value}: {p} is not writable"]
    return []


def _resume_problems(spec: RunSpec) -> list[str]:
    src = spec.checkpoint.resume_from
    if not src:
        return []
    path = Path(src)
    if not path.exists():
        return [f"checkpoint.resume_from: not found: {src}"]
    if path.is_dir():
        from .train.checkpoint import find_checkpoint

        try:
            find_checkpoint(path)
        except FileNotFoundError:
            return [f"checkpoint.resume_from: {src}: no complete checkpoint (a step-*/ folder with COMPLETE) here or under checkpoints/"]
    return []
