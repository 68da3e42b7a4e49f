"""Checkpoints: a directory holding the model in safetensors (``model.safetensors``), everything needed to resume in
``trainer_state.pt`` (optimiser, scheduler, gradient scaler, RNG states, progress), the config in ``config.yaml``,
and ``manifest.json``, which records the optimiser step and the SHA-256 of each of those three files.

Saving is atomic. The files are written into ``<checkpoint>.new`` beside the checkpoint and flushed to the disk;
then the checkpoint is renamed to ``<checkpoint>.old``, ``<checkpoint>.new`` to the checkpoint, and only after both
renames are on the disk is ``<checkpoint>.old`` deleted. Wherever a crash, a full disk or a second Ctrl-C stops a
save, a complete checkpoint remains: before the renames, the previous one in place; between them, the new one in
``<checkpoint>.new`` and the previous one in ``<checkpoint>.old``, which loading falls back to (newest first) and
the next save puts back in place.

Loading checks each file it reads against the manifest, so a partial, corrupt or mixed checkpoint (weights of one
step with the trainer state of another) is refused with an error naming the file. Checkpoints saved before
manifests existed still load their weights (a single file, written atomically, cannot be mixed) but cannot be
resumed: nothing shows that their weights and trainer state belong to the same step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from .config import TrainConfig, load_config, save_config

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE)
MANIFEST_VERSION = 1
# Beside checkpoint directory X: X.new is a save in progress, X.old the previous checkpoint while X.new replaces it.
NEW_SUFFIX, OLD_SUFFIX = ".new", ".old"
# What a save may replace: the files of a checkpoint, and the temporary files of older versions' one-by-one saves.
_REPLACEABLE = {*CHECKPOINT_FILES, MANIFEST_FILE, *(name + ".tmp" for name in CHECKPOINT_FILES)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: partial, corrupt, mixed from two saves, or holding tensors of
    another dtype than the model's. The message names the file."""


def capture_rng_states() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states, in types torch.load(weights_only=True)
    accepts."""
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"kind": numpy_kind, "keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                  "has_gauss": int(numpy_has_gauss), "cached_gaussian": float(numpy_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    """Sets the generators to the states :func:`capture_rng_states` returned."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _sibling(directory: Path, suffix: str) -> Path:
    """``directory`` with ``suffix`` appended to its name, beside it."""
    return directory.with_name(directory.name + suffix)


def _sha256(path: Path) -> str:
    """The SHA-256 of the file ``path``, in hexadecimal."""
    digest = hashlib.sha256()
    with path.open("rb") as file:  # in blocks: hashlib.file_digest needs Python 3.11, the package supports 3.10
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flushes a file's contents, or a directory's entries (the files created or renamed in it), to the disk."""
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open a directory as a file; NTFS journals the renames itself.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_files(directory: Path, model: nn.Module, config: TrainConfig, trainer_state: Dict[str, Any]) -> None:
    """Writes the checkpoint's files and, last, its manifest into the new ``directory`` and flushes them."""
    directory.mkdir()
    step = trainer_state.get("global_step")
    metadata = {"model": config.model, "model_options": json.dumps(config.model_options),
                "global_step": json.dumps(step)}
    save_safetensors_model(model, str(directory / MODEL_FILE), metadata=metadata, force_contiguous=True)
    torch.save(trainer_state, directory / STATE_FILE)
    save_config(config, directory / CONFIG_FILE)
    manifest = {"version": MANIFEST_VERSION, "global_step": step,
                "sha256": {name: _sha256(directory / name) for name in CHECKPOINT_FILES}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for name in (*CHECKPOINT_FILES, MANIFEST_FILE):
        _fsync(directory / name)
    _fsync(directory)


def save_checkpoint(directory: str | Path, model: nn.Module, config: TrainConfig, trainer_state: Dict[str, Any]
                    ) -> Path:
    """Atomically replaces the checkpoint in ``directory`` by ``model.safetensors`` (with the model name, options
    and step in its metadata), ``trainer_state.pt``, ``config.yaml`` and their ``manifest.json`` (see the module
    docstring); returns ``directory``. A directory holding anything else is refused, since it is replaced whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_save(directory)
    if directory.is_dir():
        others = sorted(path.name for path in directory.iterdir() if path.name not in _REPLACEABLE)
        if others:
            raise CheckpointError(f"{str(directory)!r} holds files that are not part of a checkpoint "
                                  f"({', '.join(others[:5])}); a save replaces the whole directory, so move them "
                                  f"out or save elsewhere")
    elif directory.exists():
        raise CheckpointError(f"cannot save a checkpoint to {str(directory)!r}: it is a file")
    staging, previous = _sibling(directory, NEW_SUFFIX), _sibling(directory, OLD_SUFFIX)
    # With the checkpoint back in place, these can only be a save that failed before its swap and the remains of
    # a deletion that did not finish.
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        _write_files(staging, model, config, trainer_state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: do not leave half a checkpoint behind
        raise
    replacing = directory.exists()
    if replacing:
        os.rename(directory, previous)
    os.rename(staging, directory)
    _fsync(directory.parent)
    if replacing:
        shutil.rmtree(previous)
    return directory


def _interrupted_save(directory: Path) -> Optional[Path]:
    """For a checkpoint ``directory`` that is missing because a save stopped between its two renames, the complete
    copy that save left beside it: the new one, else the previous one; None when there is neither."""
    for candidate in (_sibling(directory, NEW_SUFFIX), _sibling(directory, OLD_SUFFIX)):
        if (candidate / MANIFEST_FILE).is_file():
            try:
                verify_checkpoint(candidate, CHECKPOINT_FILES)
            except CheckpointError:
                continue  # a save that had not finished writing, or an old copy half deleted
            return candidate
    return None


def _restore_interrupted_save(directory: Path) -> None:
    """Renames the copy an interrupted save left (see :func:`_interrupted_save`) back to ``directory``."""
    if not directory.exists():
        recovered = _interrupted_save(directory)
        if recovered is not None:
            os.rename(recovered, directory)
            _fsync(directory.parent)


def check_checkpoint_dir(directory: str | Path) -> Path:
    """The checkpoint that ``directory`` names: ``directory`` itself if it holds one, else its ``checkpoint/``
    sub-directory; where an interrupted save left that missing, the complete copy it left beside it (with a
    warning). Raises FileNotFoundError when there is none."""
    directory = Path(directory)
    for candidate in (directory, directory / "checkpoint"):
        if (candidate / MANIFEST_FILE).is_file() or (candidate / MODEL_FILE).is_file():
            return candidate
        if not candidate.exists():
            recovered = _interrupted_save(candidate)
            if recovered is not None:
                warnings.warn(f"{str(candidate)!r} is missing because a save was interrupted; using the complete "
                              f"copy it left in {str(recovered)!r} (the next save puts it back in place)",
                              stacklevel=2)
                return recovered
    raise FileNotFoundError(f"no checkpoint ({MODEL_FILE} and {MANIFEST_FILE}) in {str(directory)!r} "
                            f"or its checkpoint/ sub-directory")


def verify_checkpoint(directory: str | Path, names: Sequence[str] = CHECKPOINT_FILES) -> Optional[Dict[str, Any]]:
    """The manifest of the checkpoint ``directory`` after checking that each of the files ``names`` is there with
    the content the manifest lists; None for a checkpoint without a manifest (saved before manifests existed).
    Raises :class:`CheckpointError` naming the first file that is missing or differs."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        hashes = manifest["sha256"]
        if not isinstance(hashes, dict) or "global_step" not in manifest:
            raise ValueError("no 'sha256' mapping or 'global_step'")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} is corrupt ({error}), so the checkpoint cannot be "
                              f"verified") from error
    for name in names:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing: {str(directory)!r} is a partial "
                                  f"checkpoint")
        if _sha256(file) != hashes.get(name):
            raise CheckpointError(f"checkpoint file {str(file)!r} does not match {str(path)!r}: it is corrupt or "
                                  f"was written by another save than the rest of the checkpoint "
                                  f"(step {manifest['global_step']})")
    return manifest


def _verified_file(directory: str | Path, name: str) -> Path:
    """The path of the file ``name`` of the checkpoint ``directory`` names, checked against its manifest."""
    directory = check_checkpoint_dir(directory)
    verify_checkpoint(directory, (name,))
    return directory / name


def _read_weights(path: Path, tensors: bool = True) -> tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors (none unless ``tensors``) and metadata of the safetensors file ``path``, or a CheckpointError
    naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as file:
            read = {name: file.get_tensor(name) for name in file.keys()} if tensors else {}
            return read, file.metadata() or {}
    except Exception as error:  # safetensors raises its own SafetensorError (not exported) and OSError
        raise CheckpointError(f"cannot read model weights {str(path)!r}: {error}") from error


def load_trainer_state(directory: str | Path) -> Dict[str, Any]:
    """The trainer state of the checkpoint ``directory`` names, after checking that every file of the checkpoint
    matches its manifest and that the state and the weights are of the manifest's step. Raises
    :class:`CheckpointError` for a partial, corrupt or mixed checkpoint and for one without a manifest."""
    directory = check_checkpoint_dir(directory)
    manifest = verify_checkpoint(directory, CHECKPOINT_FILES)
    if manifest is None:
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {MANIFEST_FILE} (it was saved by an older "
                              f"visionmoe), so nothing shows that its weights and trainer state are of the same step "
                              f"and it cannot be resumed; start a new run from its weights with --init-from (the "
                              f"optimiser and schedule start afresh)")
    path = directory / STATE_FILE
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors for a damaged file
        raise CheckpointError(f"cannot read trainer state {str(path)!r}: {error}") from error
    weights_step = json.loads(_read_weights(directory / MODEL_FILE, tensors=False)[1].get("global_step", "null"))
    step = manifest["global_step"]
    if not isinstance(state, dict) or state.get("global_step") != step or weights_step != step:
        found = state.get("global_step") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {str(directory)!r} mixes steps: manifest {step}, trainer state {found}, "
                              f"weights {weights_step}")
    return state


def load_checkpoint_config(directory: str | Path) -> TrainConfig:
    """The training config saved with the checkpoint ``directory`` names."""
    return load_config(_verified_file(directory, CONFIG_FILE))


def _checked_weights(model: nn.Module, directory: str | Path) -> Dict[str, torch.Tensor]:
    """The checkpoint's weights, after checking that they hold the same tensor names as ``model`` and each in the
    model's dtype: copying them into the model would silently convert (an int64 checkpoint truncated to
    float32)."""
    path = _verified_file(directory, MODEL_FILE)
    weights, _ = _read_weights(path)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint {str(path)!r} holds a different model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]} (of {len(missing)} and {len(unexpected)})")
    for name, tensor in weights.items():
        if tensor.dtype != own[name].dtype:
            raise CheckpointError(f"tensor {name!r} in {str(path)!r} is {tensor.dtype}, but the model's is "
                                  f"{own[name].dtype}")
    return weights


def load_model_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Loads ``model.safetensors`` of the checkpoint ``directory`` names into ``model`` and returns it; every
    tensor must match the model's in name, dtype and shape."""
    weights = _checked_weights(model, directory)
    own = model.state_dict()
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"tensor {name!r} of the checkpoint in {str(directory)!r} has shape "
                                  f"{tuple(tensor.shape)}, the model's {tuple(own[name].shape)}")
    model.load_state_dict(weights, strict=True)
    return model


def load_matching_weights(model: nn.Module, directory: str | Path) -> List[str]:
    """Fine-tuning's start: loads the checkpoint's model weights into ``model`` where names and shapes match and
    returns the names left at their fresh initialisation because their shape differs (e.g. a classifier head for
    another number of classes). Names present on one side only, and tensors of another dtype, are an error: they
    mean a different model."""
    weights = _checked_weights(model, directory)
    own = model.state_dict()
    reshaped = sorted(name for name, tensor in weights.items() if tensor.shape != own[name].shape)
    model.load_state_dict({name: tensor for name, tensor in weights.items() if name not in reshaped}, strict=False)
    return reshaped


def load_model(directory: str | Path, map_location: str = "cpu") -> nn.Module:
    """The trained model of a checkpoint, rebuilt by name with its saved options, in eval mode."""
    from ..models import create_model

    config = load_checkpoint_config(directory)
    model = create_model(config.model, **config.model_options).to(map_location)
    return load_model_weights(model, directory).eval()
