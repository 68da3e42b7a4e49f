"""Reports on what a trained MoE model does with its experts, and how stable its routing is during training.

Shape letters: E experts; N images (expert_class_usage); P probe images of N tokens each (routing consistency).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["RoutingConsistencyTracker", "RoutingSnapshot", "expert_class_usage", "routing_consistency"]


def expert_class_usage(assignments: torch.Tensor, labels: torch.Tensor, num_experts: int,
                       num_classes: int) -> torch.Tensor:
    """Which classes each expert serves: the expert-specialisation table of Pavlitska et al. (PAPERS.md
    section 2; the paper's class-wise expert weight allocation).

    Args:
        assignments: either [N] integer, the expert each image went to (e.g. the argmax of the gate weights),
            giving counts; or [N, E] floating-point per-image expert weights (e.g. ``ConvMoE.last_gate_weights``
            of image gating, or location gating's weights averaged over H' x W'), giving the summed weight each
            class sends to each expert.
        labels: [N] integer class of each image, in [0, num_classes).
        num_experts: E. num_classes: the number of classes.

    Returns:
        [E, num_classes] float: ``usage[e, c]`` = number (or summed weight) of class-c images routed to expert e.
        Normalise rows to read an expert's class mix, columns to read how a class spreads over experts.
    """
    if num_experts < 1 or num_classes < 1:
        raise ValueError(f"num_experts and num_classes must be >= 1, got {num_experts} and {num_classes}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} "
                         f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if not isinstance(assignments, torch.Tensor):
        raise ValueError(f"assignments must be a tensor, got {type(assignments).__name__}")
    if assignments.shape[0] != labels.shape[0]:
        raise ValueError(f"assignments and labels must describe the same N images, got {assignments.shape[0]} "
                         f"and {labels.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes) = [0, {num_classes})")
    if assignments.is_floating_point():
        if assignments.dim() != 2 or assignments.shape[1] != num_experts:
            raise ValueError(f"floating-point assignments must have shape [N, E] with E = {num_experts}, got "
                             f"{tuple(assignments.shape)}")
        weights = assignments
    else:
        if assignments.dim() != 1 or assignments.dtype == torch.bool:
            raise ValueError(f"integer assignments must have shape [N], got {tuple(assignments.shape)} "
                             f"({assignments.dtype})")
        if assignments.numel() and (assignments.min() < 0 or assignments.max() >= num_experts):
            raise ValueError(f"assignments must lie in [0, num_experts) = [0, {num_experts})")
        weights = torch.nn.functional.one_hot(assignments, num_experts).to(torch.float32)
    class_one_hot = torch.nn.functional.one_hot(labels.to(weights.device), num_classes).to(weights.dtype)
    return weights.transpose(0, 1) @ class_one_hot


def routing_consistency(assign_a: torch.Tensor, assign_b: torch.Tensor) -> float:
    """The fraction of tokens whose top-1 expert is the same in two routings (TGR-MoE's routing consistency,
    PAPERS.md section 4): e.g. the same probe tokens at two epochs, or before and after fine-tuning.

    Args:
        assign_a, assign_b: integer tensors of the same shape (e.g. [T]), the top-1 expert of each token.

    Returns:
        a float in [0, 1].
    """
    for name, value in (("assign_a", assign_a), ("assign_b", assign_b)):
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of expert indices, got "
                             f"{getattr(value, 'dtype', type(value).__name__)}")
    if assign_a.shape != assign_b.shape:
        raise ValueError(f"assign_a and assign_b must describe the same tokens, got shapes {tuple(assign_a.shape)} "
                         f"and {tuple(assign_b.shape)}")
    if assign_a.numel() == 0:
        raise ValueError("assign_a and assign_b are empty: there are no tokens to compare")
    return (assign_a == assign_b.to(assign_a.device)).float().mean().item()


@dataclasses.dataclass
class RoutingSnapshot:
    """The top-1 expert of every probe token in every sparse MoE layer at one point of training.

    Attributes:
        epoch: epochs trained when it was taken (0: at initialisation).
        phase: a label such as "init", "train", "pretrain" or "finetune".
        assignments: layer name -> [P * N] int64, the top-1 expert of each token of the P probe images.
    """

    epoch: int
    phase: str
    assignments: Dict[str, torch.Tensor]


class RoutingConsistencyTracker:
    """Records, on a fixed probe set, each sparse MoE layer's top-1 expert per token, and reports how stable the
    routing is: agreement between adjacent snapshots (epochs), agreement of each snapshot with the final one,
    and agreement between the end of one phase and the snapshots of another (pre-training vs fine-tuning).

    The top-1 expert of a token is the argmax of its router logits in eval mode (no noise), so it does not
    depend on capacity drops or on the other images of a batch.

    Args:
        probe_images: [P, C, H, W] the fixed probe images (e.g. the first P validation images).
        batch_size: images per forward pass while recording.
    """

    def __init__(self, probe_images: torch.Tensor, batch_size: int = 256):
        if not isinstance(probe_images, torch.Tensor) or probe_images.dim() < 2 or probe_images.shape[0] == 0:
            raise ValueError(f"probe_images must be a non-empty [P, ...] batch of images, got "
                             f"{tuple(getattr(probe_images, 'shape', ()))}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.probe_images, self.batch_size = probe_images, batch_size
        self.snapshots: List[RoutingSnapshot] = []

    @torch.no_grad()
    def top1_assignments(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Layer name -> [P * N] top-1 expert of each probe token, from ``model`` in eval mode."""
        from .layers import MoEMLP

        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MoEMLP)]
        if not layers:
            raise ValueError("the model has no sparse MoE layers (MoEMLP) whose routing could be tracked")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        chunks: Dict[str, List[torch.Tensor]] = {name: [] for name, _ in layers}
        try:
            for images in self.probe_images.split(self.batch_size):
                model(images.to(device))
                for name, layer in layers:
                    chunks[name].append(layer.last_metrics.logits.argmax(dim=-1).reshape(-1).cpu())
        finally:
            model.train(was_training)
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def record(self, model: torch.nn.Module, epoch: int, phase: str = "train") -> RoutingSnapshot:
        """Takes and keeps a snapshot of ``model``'s routing of the probe set."""
        snapshot = RoutingSnapshot(epoch, phase, self.top1_assignments(model))
        if self.snapshots and snapshot.assignments.keys() != self.snapshots[0].assignments.keys():
            raise ValueError(f"the model's MoE layers {sorted(snapshot.assignments)} differ from those recorded "
                             f"before {sorted(self.snapshots[0].assignments)}")
        self.snapshots.append(snapshot)
        return snapshot

    @property
    def layers(self) -> List[str]:
        return list(self.snapshots[0].assignments) if self.snapshots else []

    @staticmethod
    def _agreement(a: RoutingSnapshot, b: RoutingSnapshot) -> Dict[str, float]:
        per_layer = {name: routing_consistency(a.assignments[name], b.assignments[name]) for name in a.assignments}
        per_layer["mean"] = sum(per_layer.values()) / len(per_layer)
        return per_layer

    def adjacent(self) -> List[Optional[Dict[str, float]]]:
        """Per snapshot, its agreement with the previous snapshot by layer (and their "mean"); None for the
        first."""
        return [None] + [self._agreement(previous, current)
                         for previous, current in zip(self.snapshots, self.snapshots[1:])]

    def against_final(self) -> List[Dict[str, float]]:
        """Per snapshot, its agreement with the last snapshot, by layer and "mean"."""
        return [self._agreement(snapshot, self.snapshots[-1]) for snapshot in self.snapshots]

    def phase_agreement(self, earlier: str = "pretrain", later: str = "finetune") -> List[Dict[str, float]]:
        """Agreement of the last snapshot of phase ``earlier`` with each snapshot of phase ``later`` (e.g. the
        pre-trained model's routing against each fine-tuning epoch's)."""
        reference = [snapshot for snapshot in self.snapshots if snapshot.phase == earlier]
        compared = [snapshot for snapshot in self.snapshots if snapshot.phase == later]
        if not reference or not compared:
            raise ValueError(f"phase_agreement needs snapshots of both phases {earlier!r} and {later!r}; recorded "
                             f"phases: {sorted({snapshot.phase for snapshot in self.snapshots})}")
        return [self._agreement(reference[-1], snapshot) for snapshot in compared]

    def summary(self, skip_phases: Sequence[str] = ("init",)) -> Dict[str, Optional[float]]:
        """Means over the snapshots not in ``skip_phases`` (by default, leaving out the untrained model):
        ``adjacent`` over pairs of consecutive such snapshots, ``final`` over those before the last (their
        agreement with it), ``last_adjacent`` the last pair's; None where there is no pair."""
        kept = [snapshot for snapshot in self.snapshots if snapshot.phase not in skip_phases]
        adjacent = [self._agreement(a, b)["mean"] for a, b in zip(kept, kept[1:])]
        final = [self._agreement(snapshot, kept[-1])["mean"] for snapshot in kept[:-1]]
        return {"adjacent": sum(adjacent) / len(adjacent) if adjacent else None,
                "last_adjacent": adjacent[-1] if adjacent else None,
                "final": sum(final) / len(final) if final else None}

    def to_dict(self) -> Dict:
        """The curves as JSON-ready lists, one entry per snapshot."""
        return {
            "probe_images": int(self.probe_images.shape[0]),
            "layers": self.layers,
            "epochs": [snapshot.epoch for snapshot in self.snapshots],
            "phases": [snapshot.phase for snapshot in self.snapshots],
            "adjacent": self.adjacent(),
            "final": self.against_final() if self.snapshots else [],
            "summary": self.summary() if self.snapshots else {},
        }

    def write(self, directory: str | Path, stem: str = "routing_consistency") -> List[Path]:
        """Writes ``<stem>.json`` (:meth:`to_dict`) and ``<stem>.csv`` (one row per snapshot and layer: epoch,
        phase, layer, adjacent, final) into ``directory``; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        with csv_path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["epoch", "phase", "layer", "adjacent", "final"])
            for epoch, phase, adjacent, final in zip(data["epochs"], data["phases"], data["adjacent"],
                                                     data["final"]):
                for layer in data["layers"] + ["mean"]:
                    writer.writerow([epoch, phase, layer, "" if adjacent is None else adjacent[layer], final[layer]])
        return [json_path, csv_path]

    def state_dict(self) -> Dict:
        """The snapshots, in types ``torch.load(weights_only=True)`` accepts (for checkpoints)."""
        return {"snapshots": [{"epoch": s.epoch, "phase": s.phase, "assignments": dict(s.assignments)}
                              for s in self.snapshots]}

    def load_state_dict(self, state: Dict) -> None:
        self.snapshots = [RoutingSnapshot(s["epoch"], s["phase"], dict(s["assignments"])) for s in state["snapshots"]]
