"""The content hash that decides whether a finished stage can be reused.

hash = sha256 of a canonical JSON of
  - the command and its resolved config, minus keys that do not change the result (output_dir,
    resume_from_checkpoint, the progress bar), with stage references written as `stage:<name>`;
  - the hash of every referenced stage (so a change upstream reruns everything that reads it);
  - the content of local inputs: data files (or data dirs), local reward-function and judge modules, and a
    size+mtime fingerprint of local model dirs that are not pipeline stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from posttrain.pipeline.spec import CALLABLE_KEYS, Stage

IGNORED_KEYS = ("output_dir", "resume_from_checkpoint", "disable_tqdm")
CONTENT_HASH_LIMIT = 64 * 2**20  # bigger files (model weights) are fingerprinted by size and mtime


def file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"size={stat.st_size},mtime={stat.st_mtime_ns}"
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_digest(path: Path) -> str:
    """A file's content hash; a directory's hash over its files' relative names and digests."""
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{child.relative_to(path)}={file_digest(child)}\n".encode())
    return h.hexdigest()


def _reward_module_file(spec: str) -> Path | None:
    """The source file behind `path/file.py:fn` or `package.module:fn`, when it can be found."""
    module, sep, _ = spec.rpartition(":")
    if not sep:
        return None
    if module.endswith(".py"):
        return Path(module) if Path(module).is_file() else None
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def local_inputs(stage: Stage) -> dict[str, str]:
    """Digests of the local files and dirs a stage reads (stage references excluded)."""
    digests: dict[str, str] = {}
    values = dataclasses.asdict(stage.config)
    for key, value in values.items():
        if key in IGNORED_KEYS or key in stage.references:
            continue
        module_file = _reward_module_file(value) if key in CALLABLE_KEYS and isinstance(value, str) else None
        if module_file is not None:
            digests[key] = file_digest(module_file)
        elif isinstance(value, str) and value and Path(value).exists():
            digests[key] = path_digest(Path(value))
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                name = f"{key}[{i}]"
                if name in stage.references or not isinstance(entry, str):
                    continue
                module_file = _reward_module_file(entry)
                if module_file is not None:
                    digests[name] = file_digest(module_file)
                elif entry and Path(entry).exists():
                    digests[name] = path_digest(Path(entry))
    return digests


def hash_payload(stage: Stage, upstream_hashes: dict[str, str]) -> dict[str, Any]:
    """What the stage hash covers, as plain JSON values (also recorded in stage.json so the plan
    can say what changed)."""
    config = {k: v for k, v in dataclasses.asdict(stage.config).items() if k not in IGNORED_KEYS}
    for ref_key, target in stage.references.items():
        key, _, index = ref_key.partition("[")
        if index:
            config[key][int(index.rstrip("]"))] = f"stage:{target}"
        else:
            config[key] = f"stage:{target}"
    payload = {
        "command": stage.command,
        "config": config,
        "upstream": {name: upstream_hashes[name] for name in stage.upstream},
        "inputs": local_inputs(stage),
    }
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def payload_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def describe_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between two recorded hash payloads, for the plan's status column."""
    if old is None:
        return "changed"
    for part in ("command", "config", "upstream", "inputs"):
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            return f"{part if part != 'config' else 'key'} {', '.join(keys[:3])} changed"
        return f"{part} changed"
    return "changed"
