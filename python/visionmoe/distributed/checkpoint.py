"""Checkpoints independent of the world size, for models whose experts are sharded over expert-parallel groups
(:meth:`visionmoe.layers.moe_mlp.ExpertMLPs.shard_`).

- Weights: :func:`write_full_safetensors` writes, from rank 0, a safetensors file with the same keys and full
  shapes as a one-process model's. It streams: the header is built from the shapes alone, then each tensor is
  gathered over its expert-parallel group (one tensor at a time, never the whole model) and appended.
  :func:`load_sharded_weights` reads each rank's rows of each expert tensor from such a file (safetensors reads
  slices without loading the rest), and refuses a file holding another number of experts.
- Optimiser state: AdamW's state is elementwise, so an expert parameter's state tensors are sharded along dim 0
  like the parameter. A checkpoint keeps rank 0's optimiser state dict (its expert entries are shard 0) and the
  expert entries of the other ranks of rank 0's expert-parallel group as shards 1 .. S - 1
  (:func:`expert_optimizer_shard`); :func:`reshard_optimizer_state` builds any rank's state for any world size
  from them by concatenating and slicing rows. A one-process checkpoint is the case S = 1.

The trainer's atomic write and manifest (visionmoe.train.checkpoint) wrap these.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..layers.moe_mlp import ExpertMLPs

EXPERT_PARAMETERS = ("w1", "b1", "w2", "b2")

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel wrappers (whose state dict keys carry a ``module.`` prefix)."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def expert_tensors(model: nn.Module, sharded_only: bool = False) -> Dict[str, ExpertMLPs]:
    """The state dict keys of every expert tensor of ``model`` (unwrapped; only the sharded ones with
    ``sharded_only``), each with its ExpertMLPs."""
    found = {}
    for prefix, module in unwrap(model).named_modules():
        if isinstance(module, ExpertMLPs) and (module.expert_group is not None or not sharded_only):
            for name in EXPERT_PARAMETERS:
                found[f"{prefix}.{name}" if prefix else name] = module
    return found


def sharded_experts(model: nn.Module) -> Dict[str, ExpertMLPs]:
    """The state dict keys of every sharded expert tensor of ``model`` (unwrapped), each with its ExpertMLPs."""
    return expert_tensors(model, sharded_only=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _full_shape(tensor: torch.Tensor, experts: Optional[ExpertMLPs]) -> Tuple[int, ...]:
    return tuple(tensor.shape) if experts is None else (experts.num_experts,) + tuple(tensor.shape[1:])


def _gather_rows(tensor: torch.Tensor, experts: ExpertMLPs, destination: int = 0) -> Optional[torch.Tensor]:
    """The full [E, ...] tensor on global rank ``destination`` from the [E / S, ...] shards of its expert group; None
    on the other ranks. Only the group holding ``destination`` communicates: the other expert-data-parallel
    replicas hold the same rows."""
    group = experts.expert_group
    members = dist.get_process_group_ranks(group)
    if destination not in members:
        return None
    local = tensor.detach().contiguous()
    if _rank() == destination:
        pieces = [torch.empty_like(local) for _ in members]
        dist.gather(local, pieces, dst=destination, group=group)
        return torch.cat(pieces)
    dist.gather(local, None, dst=destination, group=group)
    return None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_full_safetensors(
    model: nn.Module, file: Optional[BinaryIO], metadata: Optional[Dict[str, str]] = None
) -> None:
    """Writes ``model``'s state dict, with every sharded expert tensor gathered to its full [E, ...] shape, as a
    safetensors file into ``file`` on rank 0 (every rank calls this; ``file`` is ignored elsewhere). The keys are
    the unwrapped model's, so the file is the one a one-process model would save. One tensor is gathered at a
    time, so rank 0 holds at most one full expert tensor besides its own shards."""
    model = unwrap(model)
    experts = sharded_experts(model)
    state = model.state_dict()
    names = sorted(state)
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        tensor = state[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
        shape = _full_shape(tensor, experts.get(name))
        size = tensor.element_size()
        for extent in shape:
            size *= extent
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    writing = _rank() == 0
    if writing:
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
    for name in names:
        tensor = state[name]
        if name in experts:
            tensor = _gather_rows(tensor, experts[name])
        if writing:
            file.write(_tensor_bytes(tensor))


def load_sharded_weights(model: nn.Module, path: str, allow_reshaped: bool = False) -> List[str]:
    """Copies the weights of the safetensors file ``path`` (full tensors, as :func:`write_full_safetensors` or a
    one-process save writes them) into ``model``, each sharded expert tensor from its rows
    [first_expert, first_expert + num_local_experts) only. Returns the names left as they were because their shape
    differs, which only ``allow_reshaped`` (fine-tuning) permits; the number of experts must always match.
    Raises ValueError naming the tensor and the file for other keys, dtypes or shapes."""
    from safetensors import safe_open

    model = unwrap(model)
    experts = sharded_experts(model)
    own = model.state_dict()
    reshaped = []
    with safe_open(path, framework="pt") as file:
        keys = set(file.keys())
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint {path!r} holds a different model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} (of {len(missing)} and {len(unexpected)})"
            )
        for name, layer in experts.items():  # the number of experts first: other tensors (the router) follow E
            shape = tuple(file.get_slice(name).get_shape())
            if not shape or shape[0] != layer.num_experts:
                raise ValueError(
                    f"the checkpoint {path!r} holds {shape[0] if shape else 'no'} experts in {name!r}, "
                    f"but the model's layer has E={layer.num_experts}: a checkpoint cannot change the "
                    f"number of experts"
                )
        for name, target in own.items():
            stored = file.get_slice(name)
            shape = tuple(stored.get_shape())
            layer = experts.get(name)
            expected = _full_shape(target, layer)
            if shape != expected:
                if allow_reshaped and layer is None:
                    reshaped.append(name)
                    continue
                raise ValueError(
                    f"tensor {name!r} of the checkpoint {path!r} has shape {shape}, the model's {expected}"
                )
            if layer is not None:
                tensor = stored[layer.first_expert : layer.first_expert + layer.num_local_experts]
            else:
                tensor = file.get_tensor(name)
            if tensor.dtype != target.dtype:
                raise ValueError(f"tensor {name!r} in {path!r} is {tensor.dtype}, but the model's is {target.dtype}")
            with torch.no_grad():
                target.copy_(tensor)
    return sorted(reshaped)


def _parameter_indices(optimizer: torch.optim.Optimizer) -> Dict[int, int]:
    """id(parameter) -> its index in ``optimizer.state_dict()``."""
    indices, index = {}, 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            indices.setdefault(id(parameter), index)
            index += 1
    return indices


def expert_parameter_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[int, Tuple[str, ExpertMLPs]]:
    """Optimiser state index -> (state dict key, ExpertMLPs) of every expert parameter ``optimizer`` updates (an
    unsharded ExpertMLPs holds all E experts, from first_expert 0)."""
    model = unwrap(model)
    experts = expert_tensors(model)
    indices = _parameter_indices(optimizer)
    found = {}
    for name, parameter in model.named_parameters():
        if name in experts and id(parameter) in indices:
            found[indices[id(parameter)]] = (name, experts[name])
    return found


def expert_layout(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """What a checkpoint records about its expert sharding: the number of shards S of rank 0's expert group (1
    without sharding) and, per sharded parameter's optimiser index, its key and E."""
    params = expert_parameter_indices(model, optimizer)
    shards = {
        1 if layer.expert_group is None else dist.get_world_size(layer.expert_group) for _, layer in params.values()
    }
    if len(shards) > 1:
        raise ValueError(f"the model's expert layers are sharded over groups of different sizes {sorted(shards)}")
    return {
        "shards": shards.pop() if shards else 1,
        "params": {index: {"name": name, "num_experts": layer.num_experts} for index, (name, layer) in params.items()},
    }


def expert_optimizer_shard(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[int, Dict[str, Any]]:
    """This rank's optimiser state of its expert parameters, by optimiser index."""
    state = optimizer.state_dict()["state"]
    return {index: state[index] for index in expert_parameter_indices(model, optimizer) if index in state}


def send_expert_optimizer_shards(
    model: nn.Module, optimizer: torch.optim.Optimizer, write: Callable[[int, Dict[int, Dict[str, Any]]], None]
) -> int:
    """Hands the expert optimiser shards of ranks 1 .. S - 1 of rank 0's expert group, one at a time, to
    ``write(shard_index, shard)`` on rank 0 (every rank calls this; only that group communicates). Returns S."""
    params = expert_parameter_indices(model, optimizer)
    groups = [layer.expert_group for _, layer in params.values() if layer.expert_group is not None]
    if not groups:
        return 1
    group = groups[0]
    members = dist.get_process_group_ranks(group)
    if 0 not in members:
        return len(members)
    rank = _rank()
    for shard_index, member in enumerate(members[1:], start=1):
        if rank == member:
            dist.send_object_list([expert_optimizer_shard(model, optimizer)], dst=0, group=group)
        elif rank == 0:
            received: List[Any] = [None]
            dist.recv_object_list(received, src=member, group=group)
            write(shard_index, received[0])
    return len(members)


def reshard_optimizer_state(
    state_dict: Dict[str, Any],
    layout: Optional[Dict[str, Any]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    load_shard: Callable[[int], Dict[int, Dict[str, Any]]],
) -> Dict[str, Any]:
    """The optimiser state dict for this rank from a checkpoint's: ``state_dict`` is rank 0's at save time (its
    expert entries are shard 0 of ``layout['shards']``; None or 1 shard means full tensors) and ``load_shard(j)``
    returns shard j's expert entries. Each local expert parameter's state tensors are its rows
    [first_expert, first_expert + num_local_experts) of the concatenated shards; other entries (AdamW's step
    count) are shard 0's. Raises ValueError when the checkpoint's E differs from the model's."""
    saved_shards = int(layout["shards"]) if layout else 1
    params = expert_parameter_indices(model, optimizer)
    state = dict(state_dict["state"])
    saved_params = (layout or {}).get("params", {})
    loaded: Dict[int, Dict[int, Dict[str, Any]]] = {}

    def shard(j: int) -> Dict[int, Dict[str, Any]]:
        if j == 0:
            return state_dict["state"]
        if j not in loaded:
            loaded[j] = load_shard(j)
        return loaded[j]

    for index, (name, layer) in params.items():
        saved = saved_params.get(index)
        if saved is not None and (saved["name"] != name or saved["num_experts"] != layer.num_experts):
            raise ValueError(
                f"the checkpoint's optimiser state of parameter {index} is for {saved['name']!r} with "
                f"E={saved['num_experts']}, this model's is {name!r} with E={layer.num_experts}: a "
                f"checkpoint cannot change the number of experts"
            )
        if index not in state:
            continue
        first, count = layer.first_expert, layer.num_local_experts
        entry = {}
        for key, value in state[index].items():
            if not (isinstance(value, torch.Tensor) and value.dim() > 0):
                entry[key] = value
                continue
            rows = value.shape[0]
            if rows * saved_shards != layer.num_experts:
                raise ValueError(
                    f"the checkpoint's optimiser state {key!r} of {name!r} covers "
                    f"{rows * saved_shards} experts, but the model's layer has E={layer.num_experts}: "
                    f"a checkpoint cannot change the number of experts"
                )
            pieces = [shard(j)[index][key] for j in range(first // rows, (first + count - 1) // rows + 1)]
            offset = first - (first // rows) * rows
            entry[key] = torch.cat(pieces)[offset : offset + count].clone()
        state[index] = entry
    return {"state": state, "param_groups": state_dict["param_groups"]}
