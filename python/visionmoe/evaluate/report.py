"""Evaluation of a trained model: accuracy and, for every MoE layer, routing statistics and the
expert-specialisation table (which classes each expert serves, PAPERS.md section 2).

Shape letters: B images, N tokens per image, E experts, L classes (README, "Shape letters").
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..layers import ConvMoE, MoEMLP, SoftMoEMLP
from ..metrics import expert_class_usage

ROUTED_LAYERS = (MoEMLP, SoftMoEMLP, ConvMoE)


@dataclasses.dataclass
class LayerReport:
    """One MoE layer over the whole evaluation set.

    Attributes:
        name: the layer's module name.
        load: [E] assignments (or, for Soft MoE, dispatch mass) each expert processed, summed over batches.
        dropped_fraction: mean fraction of assignments dropped by the capacity.
        unrouted_fraction: mean fraction of tokens that reached no expert.
        class_usage: [E, L] how much of each class each expert served (kept assignments per image for MoE MLPs,
            gate weights for ConvMoE blocks); None for Soft MoE, which has no hard assignment.
    """

    name: str
    load: torch.Tensor
    dropped_fraction: float
    unrouted_fraction: float
    class_usage: torch.Tensor | None


@dataclasses.dataclass
class EvalReport:
    accuracy: float
    loss: float
    num_images: int
    layers: List[LayerReport]

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "num_images": self.num_images,
            "layers": [
                {
                    "name": layer.name,
                    "load": layer.load.tolist(),
                    "dropped_fraction": layer.dropped_fraction,
                    "unrouted_fraction": layer.unrouted_fraction,
                    "class_usage": None if layer.class_usage is None else layer.class_usage.tolist(),
                }
                for layer in self.layers
            ],
        }


def _per_image_assignments(layer: MoEMLP, batch_size: int) -> torch.Tensor:
    """[B, E] kept assignments of each image to each expert in the layer's last forward pass."""
    plan = layer.last_plan
    tokens_per_image = (plan.token_offsets.shape[0] - 1) // batch_size  # routers' plans carry the token view
    counts = torch.zeros(batch_size, layer.num_experts, device=plan.slot.device)
    kept = plan.kept()
    image = torch.div(plan.sorted_token[kept], tokens_per_image, rounding_mode="floor")
    expert = torch.div(plan.sorted_expert[kept], plan.num_groups, rounding_mode="floor")
    return counts.index_put_((image, expert), torch.ones_like(image, dtype=counts.dtype), accumulate=True)


def _gate_weights_per_image(layer: ConvMoE) -> torch.Tensor:
    weights = layer.last_gate_weights  # [B, E] (image gating) or [B, E, H', W'] (location gating)
    return weights if weights.dim() == 2 else weights.flatten(2).mean(-1)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, num_classes: int, *, batch_size: int = 128, device: str | torch.device = "cpu"
) -> EvalReport:
    """Accuracy, mean cross-entropy and per-MoE-layer routing statistics of ``model`` on ``dataset`` (items
    (image, label)), in eval mode, in the dataset's order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = model.to(device).eval()
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, ROUTED_LAYERS)]
    totals = {name: dict(load=None, dropped=0.0, unrouted=0.0, usage=None) for name, _ in layers}
    correct, loss_sum, seen, batches = 0, 0.0, 0, 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        seen += labels.shape[0]
        batches += 1
        for name, layer in layers:
            metrics, total = layer.last_metrics, totals[name]
            load = metrics.load.detach().float()
            total["load"] = load if total["load"] is None else total["load"] + load
            total["dropped"] += float(metrics.dropped_fraction)
            total["unrouted"] += float(metrics.unrouted_fraction)
            if isinstance(layer, MoEMLP):
                per_image = _per_image_assignments(layer, labels.shape[0])
            elif isinstance(layer, ConvMoE):
                per_image = _gate_weights_per_image(layer)
            else:
                continue
            usage = expert_class_usage(per_image.float(), labels, per_image.shape[1], num_classes)
            total["usage"] = usage if total["usage"] is None else total["usage"] + usage
    if seen == 0:
        raise ValueError("the evaluation data set is empty")
    reports = [
        LayerReport(
            name,
            totals[name]["load"].cpu(),
            totals[name]["dropped"] / batches,
            totals[name]["unrouted"] / batches,
            None if totals[name]["usage"] is None else totals[name]["usage"].cpu(),
        )
        for name, _ in layers
    ]
    return EvalReport(accuracy=correct / seen, loss=loss_sum / seen, num_images=seen, layers=reports)
