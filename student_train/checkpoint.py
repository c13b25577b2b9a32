"""Checkpoints: everything an exact resume needs, written atomically.

`OUTPUT/checkpoints/step-NNNNNNN/` holds the student (save_pretrained, safetensors), the optimizer and scheduler
states, the RNG states and `state.json` (format version, step, loader state); with a feature loss, also
`feature_head.pt`, the state of the feature projections, which are not part of the student. It is written under a
temporary name and renamed into place, so a crash leaves the previous checkpoint intact.
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

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
FEATURE_HEAD = "feature_head.pt"


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def save_checkpoint(output: Path, step: int, *, model, optimizer, scheduler, loader_state: dict, keep: int,
                    feature_head: torch.nn.Module | None = None) -> Path:
    """Write the checkpoint of `step` and prune all but the `keep` newest."""
    root = checkpoint_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    if feature_head is not None:
        torch.save(feature_head.state_dict(), tmp / FEATURE_HEAD)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    torch.save(_rng_states(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"version": CHECKPOINT_VERSION, "step": step, "loader": loader_state}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    found = sorted(checkpoint_dir(output).glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, feature_head: torch.nn.Module | None = None) -> dict:
    """Restore model weights, optimizer, scheduler, RNG states and feature projections in place; returns state.json.

    Raises:
        ValueError: the checkpoint has feature projections and `feature_head` is None, or the other way round.
    """
    state = json.loads((path / "state.json").read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise RuntimeError(f"{path} has checkpoint version {state.get('version')}; this release reads "
                           f"{CHECKPOINT_VERSION}.")
    if (path / FEATURE_HEAD).exists() != (feature_head is not None):
        written, now = ("with", "without") if feature_head is None else ("without", "with")
        raise ValueError(f"{path} was written {written} a feature loss and this run is {now} one; resume with the "
                         "run's --feature-loss options (see its train_config.json).")
    model.load_state_dict(type(model).from_pretrained(path / "model", dtype=torch.float32).state_dict())
    if feature_head is not None:
        feature_head.load_state_dict(torch.load(path / FEATURE_HEAD, weights_only=True))
    optim = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    _set_rng_states(torch.load(path / "rng.pt", weights_only=False))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
