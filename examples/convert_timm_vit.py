"""Convert a timm-style Vision Transformer to a V-MoE without rewriting it: ``visionmoe.convert.moeify``.

    python examples/convert_timm_vit.py [--steps 100]

moeify replaces ``model.blocks[i].mlp`` (fc1 -> GELU -> fc2, as timm's Mlp) in chosen blocks by MoEMLP layers whose
experts all start as copies of the dense MLP (sparse upcycling). With the options used here (each token's combine
weights renormalised to sum to 1, no assignment dropped) every token gets exactly the dense MLP's output, so the
converted model computes what the dense one did, up to float rounding, until training makes the experts differ.
With timm installed (it is not a visionmoe dependency) this script converts ``timm.create_model(
"vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)``, randomly initialised; without it, visionmoe's
own dense ``vit_tiny_32``, which has the same block layout. It then fine-tunes the converted model for a few steps
on digits.
"""

import argparse

import torch

from visionmoe.convert import moeify
from visionmoe.data import create_dataset
from visionmoe.layers import MoEMLP, aux_losses
from visionmoe.models import create_model

# V-MoE's B/16 experts and routing, 8 experts and top-2 token choice, with two changes that make the conversion
# exact: V-MoE combines the two experts' outputs with the raw probabilities, so an MoE layer of identical experts
# would output (p1 + p2) * MLP(x), while renormalised weights sum to 1; and V-MoE's capacity (factor 1.05) drops
# assignments beyond each expert's capacity, which a fresh, unbalanced router does, while dropless routing
# drops none.
MOE_OPTIONS = dict(num_experts=8, router="topk", k=2, renormalize=True, capacity_factor=None)


def dense_vit() -> torch.nn.Module:
    try:
        import timm
    except ImportError:
        print("timm is not installed: converting visionmoe's own dense vit_tiny_32 (same .blocks[i].mlp layout)")
        return create_model("vit_tiny_32", num_classes=10, depth=6, embed_dim=96, patch_size=8)
    print("converting timm's vit_tiny_patch16_224 (32x32 input, 8x8 patches)")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = dense_vit()
    images = torch.stack([create_dataset("digits", "test")[i][0] for i in range(16)])
    model.eval()
    with torch.no_grad():
        dense_logits = model(images)

    # V-MoE's placement: every other block of the last half.
    moeify(model, **MOE_OPTIONS)
    replaced = [name for name, module in model.named_modules() if isinstance(module, MoEMLP)]
    print(f"MoE layers: {', '.join(replaced)}")
    with torch.no_grad():
        moe_logits = model(images)
    # The upcycled experts are identical and each token's weights sum to 1: only float rounding changes the output.
    print(f"largest change of the logits right after conversion: {(moe_logits - dense_logits).abs().max():.2e}")

    model.train()
    loader = torch.utils.data.DataLoader(create_dataset("digits", "train"), batch_size=64, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0
    while step < args.steps:
        for batch, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            loss = loss + 0.005 * sum(aux_losses(model).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps:
                break
    print(f"fine-tuned {args.steps} steps; final loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
