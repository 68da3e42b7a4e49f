"""Routing consistency during training: a tracker that hooks into a model's sparse MoE layers on a fixed probe set
and reports, with :func:`visionmoe.metrics.routing_consistency`, how stable their top-1 routing is. It lives
beside the trainer, not in :mod:`visionmoe.metrics`, because it runs models, while metrics are pure functions of
tensors.

Shape letters: B probe images of N tokens each, E experts (README, "Shape letters").
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..layers import MoEMLP
from ..metrics import routing_consistency


@dataclasses.dataclass
class RoutingSnapshot:
    """The top-1 expert of every probe token in every sparse MoE layer at one point of training.

    Attributes:
        epoch: epochs trained when it was taken (0: at initialisation).
        phase: a label such as "init", "train", "pretrain" or "finetune".
        assignments: layer name -> [B * N] int64, the top-1 expert of each token of the B probe images.
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
        probe_images: [B, Ci, H, W] the fixed probe images (e.g. the first B validation images).
        batch_size: images per forward pass while recording.
    """

    def __init__(self, probe_images: torch.Tensor, batch_size: int = 256):
        if not isinstance(probe_images, torch.Tensor) or probe_images.dim() < 2 or probe_images.shape[0] == 0:
            raise ValueError(
                f"probe_images must be a non-empty [B, ...] batch of images, got "
                f"{tuple(getattr(probe_images, 'shape', ()))}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.probe_images, self.batch_size = probe_images, batch_size
        self.snapshots: List[RoutingSnapshot] = []

    @torch.no_grad()
    def top1_assignments(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Layer name -> [B * N] top-1 expert of each probe token, from ``model`` in eval mode."""
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
            raise ValueError(
                f"the model's MoE layers {sorted(snapshot.assignments)} differ from those recorded "
                f"before {sorted(self.snapshots[0].assignments)}"
            )
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
        return [None] + [
            self._agreement(previous, current) for previous, current in zip(self.snapshots, self.snapshots[1:])
        ]

    def against_final(self) -> List[Dict[str, float]]:
        """Per snapshot, its agreement with the last snapshot, by layer and "mean"."""
        return [self._agreement(snapshot, self.snapshots[-1]) for snapshot in self.snapshots]

    def phase_agreement(self, earlier: str = "pretrain", later: str = "finetune") -> List[Dict[str, float]]:
        """Agreement of the last snapshot of phase ``earlier`` with each snapshot of phase ``later`` (e.g. the
        pre-trained model's routing against each fine-tuning epoch's)."""
        reference = [snapshot for snapshot in self.snapshots if snapshot.phase == earlier]
        compared = [snapshot for snapshot in self.snapshots if snapshot.phase == later]
        if not reference or not compared:
            raise ValueError(
                f"phase_agreement needs snapshots of both phases {earlier!r} and {later!r}; recorded "
                f"phases: {sorted({snapshot.phase for snapshot in self.snapshots})}"
            )
        return [self._agreement(reference[-1], snapshot) for snapshot in compared]

    def summary(self, skip_phases: Sequence[str] = ("init", "pretrain")) -> Dict[str, Optional[float]]:
        """Means over the snapshots not in ``skip_phases`` (by default, leaving out the untrained or pre-trained
        model that training starts from):
        ``adjacent`` over pairs of consecutive such snapshots, ``final`` over those before the last (their
        agreement with it), ``last_adjacent`` the last pair's; None where there is no pair."""
        kept = [snapshot for snapshot in self.snapshots if snapshot.phase not in skip_phases]
        adjacent = [self._agreement(a, b)["mean"] for a, b in zip(kept, kept[1:])]
        final = [self._agreement(snapshot, kept[-1])["mean"] for snapshot in kept[:-1]]
        return {
            "adjacent": sum(adjacent) / len(adjacent) if adjacent else None,
            "last_adjacent": adjacent[-1] if adjacent else None,
            "final": sum(final) / len(final) if final else None,
        }

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
            "pretrain": self._pretrain_column(),
        }

    def _pretrain_column(self) -> List[Optional[Dict[str, float]]]:
        """Per snapshot, a "finetune" snapshot's agreement with the pre-trained routing (the last "pretrain"
        snapshot); None for the others and when no pre-training was recorded."""
        reference = [snapshot for snapshot in self.snapshots if snapshot.phase == "pretrain"]
        return [
            self._agreement(reference[-1], snapshot) if reference and snapshot.phase == "finetune" else None
            for snapshot in self.snapshots
        ]

    def write(self, directory: str | Path, stem: str = "routing_consistency") -> List[Path]:
        """Writes ``<stem>.json`` (:meth:`to_dict`) and ``<stem>.csv`` (one row per snapshot and layer: epoch,
        phase, layer, adjacent, final, and pretrain: the agreement with the pre-trained routing) into
        ``directory``; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        with csv_path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["epoch", "phase", "layer", "adjacent", "final", "pretrain"])
            for epoch, phase, adjacent, final, pretrain in zip(
                data["epochs"], data["phases"], data["adjacent"], data["final"], data["pretrain"]
            ):
                for layer in data["layers"] + ["mean"]:
                    writer.writerow(
                        [
                            epoch,
                            phase,
                            layer,
                            "" if adjacent is None else adjacent[layer],
                            final[layer],
                            "" if pretrain is None else pretrain[layer],
                        ]
                    )
        return [json_path, csv_path]

    def state_dict(self) -> Dict:
        """The snapshots, in types ``torch.load(weights_only=True)`` accepts (for checkpoints)."""
        return {
            "snapshots": [
                {"epoch": s.epoch, "phase": s.phase, "assignments": dict(s.assignments)} for s in self.snapshots
            ]
        }

    def load_state_dict(self, state: Dict) -> None:
        self.snapshots = [RoutingSnapshot(s["epoch"], s["phase"], dict(s["assignments"])) for s in state["snapshots"]]
