"""Checkpoints: everything an exact resume needs, written atomically, in files that loading cannot run code from.

`OUTPUT/checkpoints/step-NNNNNNN/` holds the student (save_pretrained, safetensors), `optim.safetensors` (optimizer
and scheduler states), `rng.safetensors` (the python, numpy, torch and CUDA generators) and `state.json` (format
version, step, loader state); with a feature loss, also `feature_head.safetensors`, the state of the feature
projections, which are not part of the student. Each state file holds the state's tensors, and its other values as
JSON in the safetensors header (`write_state`), so nothing is unpickled on load. The checkpoint is written under a
temporary name (`.tmp-step-*`) and renamed into place, so a crash leaves the previous checkpoint intact; a resumed run
removes the staging directories a crash left (`remove_staging`).

Version 1 checkpoints, of older releases, held pickles (`optim.pt`, `rng.pt`, `feature_head.pt`) and are refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2
OPTIMIZER = "optim.safetensors"
RNG = "rng.safetensors"
FEATURE_HEAD = "feature_head.safetensors"
STAGING = ".tmp-step-"


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def save_checkpoint(output: Path, step: int, *, model, optimizer, scheduler, loader_state: dict, keep: int,
                    feature_head: torch.nn.Module | None = None) -> Path:
    """Write the checkpoint of `step` and prune all but the `keep` newest."""
    root = checkpoint_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"{STAGING}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    if feature_head is not None:
        write_state(tmp / FEATURE_HEAD, feature_head.state_dict())
    write_state(tmp / OPTIMIZER, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    write_state(tmp / RNG, _rng_states())
    (tmp / "state.json").write_text(json.dumps({"version": CHECKPOINT_VERSION, "step": step, "loader": loader_state}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    found = sorted(checkpoint_dir(output).glob("step-*"))
    return found[-1] if found else None


def remove_staging(output: Path) -> None:
    """Remove the staging directories of checkpoints whose writing a crash interrupted (call before writing any)."""
    for stale in sorted(checkpoint_dir(output).glob(f"{STAGING}*")):
        log.info("removing %s, a checkpoint whose writing was interrupted", stale)
        shutil.rmtree(stale)


def read_state(path: Path) -> dict:
    """The `state.json` of the checkpoint `path` (version, step, loader state), of this release's format.

    Raises:
        RuntimeError: the checkpoint is of another format version; for version 1 (pickles), the message names the
            ways to go on.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise damaged_checkpoint(path / "state.json", exc) from None
    version = state.get("version") if isinstance(state, dict) else None
    if version == 1:
        raise RuntimeError(f"{path} was written by an older release of student-train, in the pickle format of "
                           "checkpoint version 1, which this release does not load because unpickling a file can run "
                           "code. Resume it with the release that wrote it, or start a new run (a new --output) from "
                           f"its weights with --student {path / 'model'}.")
    if version != CHECKPOINT_VERSION:
        raise RuntimeError(f"{path} has checkpoint version {version}; this release reads {CHECKPOINT_VERSION}.")
    return state


def load_checkpoint(path: Path, *, model, optimizer, scheduler, feature_head: torch.nn.Module | None = None) -> dict:
    """Restore model weights, optimizer, scheduler, RNG states and feature projections in place; returns state.json.

    Raises:
        RuntimeError: the checkpoint is of another format version (see `read_state`).
        ValueError: the checkpoint has feature projections and `feature_head` is None, or the other way round.
    """
    state = read_state(path)
    if (path / FEATURE_HEAD).exists() != (feature_head is not None):
        written, now = ("with", "without") if feature_head is None else ("without", "with")
        raise ValueError(f"{path} was written {written} a feature loss and this run is {now} one; resume with the "
                         "run's --feature-loss options (see its train_config.json).")
    model.load_state_dict(type(model).from_pretrained(path / "model", dtype=torch.float32).state_dict())
    if feature_head is not None:
        feature_head.load_state_dict(read_state_file(path / FEATURE_HEAD))
    optim = read_state_file(path / OPTIMIZER)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    _set_rng_states(read_state_file(path / RNG))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def write_state(path: Path, state) -> None:
    """Write `state`, nested dicts, lists and tuples of tensors and JSON values, as a safetensors file: the tensors,
    and the structure with everything else as JSON in its header. `read_state_file` gives it back, types included."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "")
    save_file(tensors, path, metadata={"structure": json.dumps(structure)})


def read_state_file(path: Path):
    """The state `write_state` wrote to `path`, tensors on the CPU.

    Raises:
        RuntimeError: the file is missing or damaged (not safetensors, or a header that is not such a state); the
            message names it and how to go on.
    """
    try:
        with safe_open(path, "pt") as file:
            structure = json.loads(file.metadata()["structure"])
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        return _decode(structure, tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_checkpoint(path, exc) from None


def damaged_checkpoint(path: Path, exc: Exception) -> RuntimeError:
    """The error for a damaged file of a checkpoint: resume from the checkpoint before it, or start anew."""
    checkpoint = path.parent
    return RuntimeError(f"{path} is damaged ({type(exc).__name__}: {exc}), so the checkpoint {checkpoint} cannot be "
                        f"resumed. Delete {checkpoint} to resume from the checkpoint before it (if --keep-checkpoints "
                        "kept one), or start a new run (a new --output).")


def _encode(value, tensors: dict[str, torch.Tensor], name: str):
    """`value` as JSON: each tensor moved into `tensors` (under its path) and named, each dict, list and tuple tagged
    with its type (dict keys keep theirs: the optimizer's are ints)."""
    if isinstance(value, torch.Tensor):
        assert name not in tensors, name
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[key, _encode(item, tensors, f"{name}/{key}")] for key, item in value.items()]}
    if isinstance(value, list | tuple):
        return {type(value).__name__: [_encode(item, tensors, f"{name}/{i}") for i, item in enumerate(value)]}
    return value  # a JSON value: str, int, float, bool or None


def _decode(value, tensors: dict[str, torch.Tensor]):
    if not isinstance(value, dict):
        return value
    (kind, content), = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _decode(item, tensors) for key, item in content}
    items = [_decode(item, tensors) for item in content]
    return tuple(items) if kind == "tuple" else items


def _rng_states() -> dict:
    numpy = np.random.get_state(legacy=False)
    # numpy's MT19937 key is uint32; int64 holds it exactly in a tensor.
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    states = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy = states["numpy"]
    numpy["state"]["key"] = numpy["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
