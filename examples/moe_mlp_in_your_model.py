"""Put an MoE MLP into your own model: a small patch transformer of your own design, trained on digits.

    python examples/moe_mlp_in_your_model.py [--steps 300]

``visionmoe.layers.MoEMLP`` takes and returns [B, N, D] like the MLP it replaces, so it drops into any block. Two
things are MoE-specific: the router's auxiliary losses (balance the experts' load; read them with
``visionmoe.layers.aux_losses(model)`` after each forward) and the routing statistics each layer keeps from its last
forward (``layer.last_metrics``: probabilities, per-expert load, dropped fraction).
Shape letters: B images, N patches, D width, E experts.
"""

import argparse

import torch
from torch import nn

from visionmoe.data import create_dataset
from visionmoe.layers import MoEMLP, aux_losses


class PatchMixerBlock(nn.Module):
    """Your own block: attention, then an MoE MLP where a dense MLP would be."""

    def __init__(self, dim: int, num_heads: int, num_experts: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        # Top-2 token choice with capacity factor 1.25 and Batch Priority Routing over the whole batch.
        self.mlp = MoEMLP(dim, 2 * dim, num_experts, router="topk", k=2, capacity_factor=1.25, batch_priority=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyPatchModel(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, num_experts: int = 4, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=8, stride=8)  # 32x32 image -> 4x4 patches
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*(PatchMixerBlock(dim, 4, num_experts) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] -> [B, classes]
        x = self.embed(images).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(x).mean(dim=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, test = create_dataset("digits", "train"), create_dataset("digits", "test")
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    model = TinyPatchModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    step = 0
    while step < args.steps:
        for images, labels in loader:
            task_loss = nn.functional.cross_entropy(model(images), labels)
            router_losses = aux_losses(model)  # summed over the MoE layers, by name
            loss = task_loss + 0.01 * router_losses["importance"] + 0.01 * router_losses["load"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0 or step == args.steps:
                metrics = model.blocks[-1].mlp.last_metrics
                print(
                    f"step {step}: task loss {task_loss.item():.3f}, aux losses "
                    f"{ {name: round(value.item(), 4) for name, value in router_losses.items()} }, last layer's "
                    f"load {metrics.load.tolist()}, dropped {metrics.dropped_fraction.item():.1%}"
                )
            if step == args.steps:
                break

    model.eval()
    with torch.no_grad():
        images, labels = zip(*(test[i] for i in range(len(test))))
        accuracy = (model(torch.stack(images)).argmax(-1) == torch.tensor(labels)).float().mean().item()
    print(f"test accuracy after {args.steps} steps: {accuracy:.3f}")


if __name__ == "__main__":
    main()
