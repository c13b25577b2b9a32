"""Fingerprints that tie a store to the teacher and tokenizer that made it.

Both phases compute them the same way: the build records them in the manifest, training compares the
student's tokenizer against them before it reads a single target. `storage/FORMAT.md` ("Fingerprints") defines
each exactly, so that a third party can recompute them; a change here makes existing builds unresumable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Keys of a model config that change with the software, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLED_BYTES = 1 << 20


def _sha256_json(value) -> str:
    """SHA-256 of `json.dumps(value, sort_keys=True, default=str)` in UTF-8 (default separators, ASCII escapes)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(config_dict: dict) -> str:
    """SHA-256 of a model config (transformers' full `to_dict()`) without its volatile keys."""
    return _sha256_json({k: v for k, v in config_dict.items() if k not in VOLATILE_CONFIG_KEYS})


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides token ids: the vocabulary (added tokens included) as [token, id] pairs sorted by
    token, and the special tokens map (`default=str` turns any non-JSON value, such as an AddedToken, into its
    string)."""
    return _sha256_json({"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map})


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """SHA-256 over each weight file's name, size, first and last MiB: cheap at any model size, and it tells
    apart two checkpoints of the same shape (retrained weights change the sampled bytes).

    The files are those directly in `model_dir` with a suffix of WEIGHT_SUFFIXES, in name order; for each, the
    digest takes `f"{name}:{size}:"`, the first SAMPLED_BYTES and the bytes from `max(size - SAMPLED_BYTES, 0)`
    on. None when `model_dir` is not a local directory.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with open(file, "rb") as f:
            digest.update(f.read(SAMPLED_BYTES))
            f.seek(max(size - SAMPLED_BYTES, 0))
            digest.update(f.read(SAMPLED_BYTES))
    return digest.hexdigest()
