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
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from ..distributed.checkpoint import (
    expert_tensors,
    load_sharded_weights,
    send_expert_optimizer_shards,
    sharded_experts,
    write_full_safetensors,
)
from ..distributed.data import world
from .config import TrainConfig, load_config, save_config

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE)
MANIFEST_VERSION = 1
# Beside checkpoint directory X: X.new is a save in progress, X.old the previous checkpoint while X.new replaces it.
NEW_SUFFIX, OLD_SUFFIX = ".new", ".old"
# Under expert parallelism, the expert optimiser state of ranks 1 .. S - 1 of rank 0's expert group (see
# visionmoe.distributed.checkpoint); listed in the manifest like the other files.
OPTIMIZER_SHARD_FILE = "optimizer_shard{}.pt"
_SHARD_NAME = re.compile(r"^optimizer_shard[1-9][0-9]*\.pt$")
# What a save may replace: the files of a checkpoint, and the temporary files of older versions' one-by-one saves.
_REPLACEABLE = {*CHECKPOINT_FILES, MANIFEST_FILE, *(name + ".tmp" for name in CHECKPOINT_FILES)}


def _replaceable(name: str) -> bool:
    return name in _REPLACEABLE or bool(_SHARD_NAME.match(name))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: partial, corrupt, mixed from two saves, or holding tensors of
    another dtype than the model's. The message names the file."""


def capture_rng_states() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states, in types torch.load(weights_only=True)
    accepts."""
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "kind": numpy_kind,
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    """Sets the generators to the states :func:`capture_rng_states` returned."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
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


def _weights_metadata(config: TrainConfig, trainer_state: Dict[str, Any]) -> Dict[str, str]:
    return {
        "model": config.model,
        "model_options": json.dumps(config.model_options),
        "global_step": json.dumps(trainer_state.get("global_step")),
    }


def _write_files(directory: Path, model: nn.Module, config: TrainConfig, trainer_state: Dict[str, Any]) -> None:
    """Writes the checkpoint's files and, last, its manifest into the new ``directory`` and flushes them."""
    directory.mkdir()
    save_safetensors_model(
        model, str(directory / MODEL_FILE), metadata=_weights_metadata(config, trainer_state), force_contiguous=True
    )
    _write_state_and_manifest(directory, config, trainer_state, ())


def _write_state_and_manifest(
    directory: Path, config: TrainConfig, trainer_state: Dict[str, Any], shard_files: Sequence[str]
) -> None:
    """Writes the trainer state and config beside the weights (and optimiser shards) already in ``directory``,
    then the manifest of them all, and flushes everything."""
    torch.save(trainer_state, directory / STATE_FILE)
    save_config(config, directory / CONFIG_FILE)
    names = (*CHECKPOINT_FILES, *shard_files)
    manifest = {
        "version": MANIFEST_VERSION,
        "global_step": trainer_state.get("global_step"),
        "sha256": {name: _sha256(directory / name) for name in names},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for name in (*names, MANIFEST_FILE):
        _fsync(directory / name)
    _fsync(directory)


def _prepare_save(directory: Path) -> tuple[Path, Path]:
    """Checks that ``directory`` may be replaced by a checkpoint and clears the way: returns (staging, previous)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_save(directory)
    if directory.is_dir():
        others = sorted(path.name for path in directory.iterdir() if not _replaceable(path.name))
        if others:
            raise CheckpointError(
                f"{str(directory)!r} holds files that are not part of a checkpoint "
                f"({', '.join(others[:5])}); a save replaces the whole directory, so move them "
                f"out or save elsewhere"
            )
    elif directory.exists():
        raise CheckpointError(f"cannot save a checkpoint to {str(directory)!r}: it is a file")
    staging, previous = _sibling(directory, NEW_SUFFIX), _sibling(directory, OLD_SUFFIX)
    # With the checkpoint back in place, these can only be a save that failed before its swap and the remains of
    # a deletion that did not finish.
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    return staging, previous


def _swap_in(directory: Path, staging: Path, previous: Path) -> None:
    """Puts the complete checkpoint ``staging`` in place of ``directory`` (see the module docstring)."""
    replacing = directory.exists()
    if replacing:
        os.rename(directory, previous)
    os.rename(staging, directory)
    _fsync(directory.parent)
    if replacing:
        shutil.rmtree(previous)


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    config: TrainConfig,
    trainer_state: Dict[str, Any],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Path:
    """Atomically replaces the checkpoint in ``directory`` by ``model.safetensors`` (with the model name, options
    and step in its metadata), ``trainer_state.pt``, ``config.yaml`` and their ``manifest.json`` (see the module
    docstring); returns ``directory``. A directory holding anything else is refused, since it is replaced whole.

    In a process group of several ranks every rank calls it and rank 0 writes: the weights with every sharded
    expert tensor gathered to its full shape (the same file one process saves), ``trainer_state`` (rank 0's) and,
    with ``optimizer`` and sharded experts, the expert optimiser state of the other ranks of rank 0's expert group
    as ``optimizer_shard<j>.pt``. An error on rank 0 is raised on every rank."""
    directory = Path(directory)
    if world()[1] > 1:
        return _save_distributed(directory, model, config, trainer_state, optimizer)
    staging, previous = _prepare_save(directory)
    try:
        _write_files(staging, model, config, trainer_state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: do not leave half a checkpoint behind
        raise
    _swap_in(directory, staging, previous)
    return directory


class _FirstError:
    """Runs rank 0's file operations inside collectives, keeping the first error instead of raising it, so that
    rank 0 keeps taking part in the collectives and every rank learns of the error afterwards (:func:`_agree`)."""

    def __init__(self):
        self.error: Optional[BaseException] = None

    def run(self, function, *args) -> None:
        if self.error is None:
            try:
                function(*args)
            except Exception as error:  # reported on every rank by _agree
                self.error = error


def _agree(errors: _FirstError) -> None:
    """Raises, on every rank, rank 0's first error (a CheckpointError naming it), or returns when there was none."""
    import torch.distributed as dist

    message = [None if errors.error is None else f"{type(errors.error).__name__}: {errors.error}"]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        if errors.error is not None:
            raise errors.error
        raise CheckpointError(f"rank 0 failed to save the checkpoint: {message[0]}")


def _save_distributed(
    directory: Path,
    model: nn.Module,
    config: TrainConfig,
    trainer_state: Dict[str, Any],
    optimizer: Optional[torch.optim.Optimizer],
) -> Path:
    rank = world()[0]
    errors = _FirstError()
    paths: Dict[str, Path] = {}
    shard_files: List[str] = []

    def prepare():
        paths["staging"], paths["previous"] = _prepare_save(directory)
        paths["staging"].mkdir()

    if rank == 0:
        errors.run(prepare)
    _agree(errors)
    try:
        file = open(paths["staging"] / MODEL_FILE, "wb") if rank == 0 else None
        try:
            writer = _GuardedFile(file, errors) if rank == 0 else None
            write_full_safetensors(model, writer, _weights_metadata(config, trainer_state))
        finally:
            if file is not None:
                file.close()
        if optimizer is not None:

            def write_shard(index: int, shard: Dict[int, Dict[str, Any]]) -> None:
                name = OPTIMIZER_SHARD_FILE.format(index)
                errors.run(torch.save, shard, paths["staging"] / name)
                shard_files.append(name)

            send_expert_optimizer_shards(model, optimizer, write_shard)
        if rank == 0:
            errors.run(_write_state_and_manifest, paths["staging"], config, trainer_state, shard_files)
            if errors.error is None:
                errors.run(_swap_in, directory, paths["staging"], paths["previous"])
        _agree(errors)
    except BaseException:
        if rank == 0 and "staging" in paths:
            shutil.rmtree(paths["staging"], ignore_errors=True)
        raise
    return directory


class _GuardedFile:
    """A file whose writes stop, keeping the error in ``errors``, after the first one fails (e.g. a full disk)."""

    def __init__(self, file, errors: _FirstError):
        self.file, self.errors = file, errors

    def write(self, data: bytes) -> None:
        self.errors.run(self.file.write, data)


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
                warnings.warn(
                    f"{str(candidate)!r} is missing because a save was interrupted; using the complete "
                    f"copy it left in {str(recovered)!r} (the next save puts it back in place)",
                    stacklevel=2,
                )
                return recovered
    raise FileNotFoundError(
        f"no checkpoint ({MODEL_FILE} and {MANIFEST_FILE}) in {str(directory)!r} or its checkpoint/ sub-directory"
    )


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
        raise CheckpointError(
            f"checkpoint manifest {str(path)!r} is corrupt ({error}), so the checkpoint cannot be verified"
        ) from error
    for name in names:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint file {str(file)!r} is missing: {str(directory)!r} is a partial checkpoint"
            )
        if _sha256(file) != hashes.get(name):
            raise CheckpointError(
                f"checkpoint file {str(file)!r} does not match {str(path)!r}: it is corrupt or "
                f"was written by another save than the rest of the checkpoint "
                f"(step {manifest['global_step']})"
            )
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
    if manifest is not None:
        verify_checkpoint(directory, sorted(name for name in manifest["sha256"] if _SHARD_NAME.match(name)))
    if manifest is None:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has no {MANIFEST_FILE} (it was saved by an older "
            f"visionmoe), so nothing shows that its weights and trainer state are of the same step "
            f"and it cannot be resumed; start a new run from its weights with --init-from (the "
            f"optimiser and schedule start afresh)"
        )
    path = directory / STATE_FILE
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors for a damaged file
        raise CheckpointError(f"cannot read trainer state {str(path)!r}: {error}") from error
    weights_step = json.loads(_read_weights(directory / MODEL_FILE, tensors=False)[1].get("global_step", "null"))
    step = manifest["global_step"]
    if not isinstance(state, dict) or state.get("global_step") != step or weights_step != step:
        found = state.get("global_step") if isinstance(state, dict) else None
        raise CheckpointError(
            f"checkpoint {str(directory)!r} mixes steps: manifest {step}, trainer state {found}, weights {weights_step}"
        )
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
        raise CheckpointError(
            f"the checkpoint {str(path)!r} holds a different model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (of {len(missing)} and {len(unexpected)})"
        )
    for name, tensor in weights.items():
        if tensor.dtype != own[name].dtype:
            raise CheckpointError(
                f"tensor {name!r} in {str(path)!r} is {tensor.dtype}, but the model's is {own[name].dtype}"
            )
    return weights


def load_model_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Loads ``model.safetensors`` of the checkpoint ``directory`` names into ``model`` and returns it; every
    tensor must match the model's in name, dtype and shape."""
    if sharded_experts(model):
        _load_sharded(model, directory, allow_reshaped=False)
        return model
    weights = _checked_weights(model, directory)
    own = model.state_dict()
    experts = expert_tensors(model)
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            if name in experts and tensor.dim() > 0 and tensor.shape[1:] == own[name].shape[1:]:
                raise CheckpointError(
                    f"the checkpoint in {str(directory)!r} holds {tensor.shape[0]} experts in "
                    f"{name!r}, but the model's layer has E={experts[name].num_experts}: a "
                    f"checkpoint cannot change the number of experts"
                )
            raise CheckpointError(
                f"tensor {name!r} of the checkpoint in {str(directory)!r} has shape "
                f"{tuple(tensor.shape)}, the model's {tuple(own[name].shape)}"
            )
    model.load_state_dict(weights, strict=True)
    return model


def _load_sharded(model: nn.Module, directory: str | Path, allow_reshaped: bool) -> List[str]:
    """Loads a checkpoint's full weights into a model with sharded experts, each rank reading its experts' rows."""
    path = _verified_file(directory, MODEL_FILE)
    try:
        return load_sharded_weights(model, str(path), allow_reshaped=allow_reshaped)
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    except Exception as error:  # safetensors' own errors for a damaged file
        raise CheckpointError(f"cannot read model weights {str(path)!r}: {error}") from error


def load_optimizer_shard(directory: str | Path, index: int) -> Dict[int, Dict[str, Any]]:
    """The expert optimiser state of shard ``index`` (>= 1) of a checkpoint saved under expert parallelism."""
    path = _verified_file(directory, OPTIMIZER_SHARD_FILE.format(index))
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read optimiser shard {str(path)!r}: {error}") from error


def load_matching_weights(model: nn.Module, directory: str | Path) -> List[str]:
    """Fine-tuning's start: loads the checkpoint's model weights into ``model`` where names and shapes match and
    returns the names left at their fresh initialisation because their shape differs (e.g. a classifier head for
    another number of classes). Names present on one side only, and tensors of another dtype, are an error: they
    mean a different model."""
    if sharded_experts(model):
        return _load_sharded(model, directory, allow_reshaped=True)
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
