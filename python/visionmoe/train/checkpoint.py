"""Checkpoints: the model in safetensors (``model.safetensors``), everything needed to resume in
``trainer_state.pt`` (optimiser, scheduler, gradient scaler, RNG states, progress), the config in ``config.yaml``."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from .config import TrainConfig, load_config, save_config

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"


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
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _atomic_write(path: Path, write) -> None:
    """Writes through a temporary file so that an interrupted save never leaves a truncated ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def save_checkpoint(directory: str | Path, model: nn.Module, config: TrainConfig, trainer_state: Dict[str, Any]
                    ) -> Path:
    """Writes ``model.safetensors`` (with the model name and options in its metadata), ``trainer_state.pt`` and
    ``config.yaml`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"model": config.model, "model_options": json.dumps(config.model_options)}
    _atomic_write(directory / MODEL_FILE,
                  lambda path: save_safetensors_model(model, str(path), metadata=metadata, force_contiguous=True))
    _atomic_write(directory / STATE_FILE, lambda path: torch.save(trainer_state, path))
    _atomic_write(directory / CONFIG_FILE, lambda path: save_config(config, path))
    return directory


def check_checkpoint_dir(directory: str | Path) -> Path:
    """``directory`` if it holds a checkpoint, else its ``checkpoint/`` sub-directory if that does; else an error."""
    directory = Path(directory)
    for candidate in (directory, directory / "checkpoint"):
        if (candidate / MODEL_FILE).is_file() and (candidate / STATE_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint ({MODEL_FILE} and {STATE_FILE}) in {str(directory)!r} "
                            f"or its checkpoint/ sub-directory")


def load_trainer_state(directory: str | Path) -> Dict[str, Any]:
    return torch.load(check_checkpoint_dir(directory) / STATE_FILE, weights_only=True)


def load_checkpoint_config(directory: str | Path) -> TrainConfig:
    return load_config(check_checkpoint_dir(directory) / CONFIG_FILE)


def load_model_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Loads ``model.safetensors`` of the checkpoint in ``directory`` into ``model`` (strictly) and returns it."""
    load_safetensors_model(model, str(check_checkpoint_dir(directory) / MODEL_FILE), strict=True)
    return model


def load_matching_weights(model: nn.Module, directory: str | Path) -> List[str]:
    """Fine-tuning's start: loads the checkpoint's model weights into ``model`` where names and shapes match and
    returns the names left at their fresh initialisation because their shape differs (e.g. a classifier head for
    another number of classes). Names present on one side only are an error: they mean a different model."""
    from safetensors.torch import load_file

    weights = load_file(str(check_checkpoint_dir(directory) / MODEL_FILE))
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"the checkpoint in {str(directory)!r} holds a different model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (of {len(missing)} and {len(unexpected)})")
    reshaped = sorted(name for name, tensor in weights.items() if tensor.shape != own[name].shape)
    model.load_state_dict({name: tensor for name, tensor in weights.items() if name not in reshaped}, strict=False)
    return reshaped


def load_model(directory: str | Path, map_location: str = "cpu") -> nn.Module:
    """The trained model of a checkpoint, rebuilt by name with its saved options, in eval mode."""
    from ..models import create_model

    config = load_checkpoint_config(directory)
    model = create_model(config.model, **config.model_options).to(map_location)
    return load_model_weights(model, directory).eval()
