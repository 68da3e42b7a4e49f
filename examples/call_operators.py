"""visionmoe demo: route a batch of patch tokens to experts, dispatch, run the experts, combine.

Runs on the CPU in seconds (and on CUDA when a GPU is present). Shape letters: B images, N patches per image,
T = B * N tokens, D width, E experts, K experts per token, C capacity.
"""

import math
import time

import torch

import visionmoe
from visionmoe import ops, reference


def main():
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, N, D, F, E, K, capacity_factor = 64, 64, 192, 384, 8, 2, 1.0
    T = B * N
    C = math.ceil(K * T * capacity_factor / E)
    print(f"visionmoe {visionmoe.__version__}: {visionmoe.build_info()}")
    print(f"device {device}: B={B} images x N={N} patches = T={T} tokens, D={D}, E={E} experts, K={K}, C={C}")

    # Patch tokens share a common component, as real images do, so the router prefers some experts.
    tokens = (torch.randn(B, N, D, device=device) + torch.randn(D, device=device)).reshape(T, D)
    router = torch.nn.Linear(D, E, bias=False).to(device)
    experts_in = torch.nn.Parameter(torch.randn(E, D, F, device=device) / math.sqrt(D))
    experts_out = torch.nn.Parameter(torch.randn(E, F, D, device=device) / math.sqrt(F))

    # Softmax token choice: each token's top-K experts, all first choices ahead of any second choice.
    probs = router(tokens).softmax(dim=-1)  # [T, E]
    top_probs, top_experts = probs.topk(K, dim=-1)  # [T, K]
    token_index = torch.arange(T, device=device).repeat(K)  # [K * T], choice-major
    plan = ops.make_plan(token_index, top_experts.t().reshape(-1), top_probs.t().reshape(-1), E, C, num_tokens=T)

    start = time.perf_counter()
    expert_inputs = ops.dispatch(tokens, plan, "padded")  # [E, C, D]
    hidden = torch.nn.functional.gelu(torch.bmm(expert_inputs, experts_in))  # [E, C, F]
    expert_outputs = torch.bmm(hidden, experts_out)  # [E, C, D]
    mixed = ops.combine(expert_outputs, plan, T)  # [T, D]
    mixed.square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    load = plan.expert_load().tolist()
    wanted = plan.expert_counts().tolist()
    print(
        f"assignments: {plan.num_assignments} ({K} per token), dropped by capacity: "
        f"{plan.dropped_fraction().item():.1%}"
    )
    print("expert  wanted  processed  (capacity %d)" % C)
    for e in range(E):
        print(f"{e:6d}  {wanted[e]:6d}  {load[e]:9d}")
    untouched = (ops.combine(torch.ones_like(expert_outputs[..., :1]), plan, T) == 0).sum().item()
    print(f"tokens with no expert (all choices dropped): {untouched} of {T}")
    print(f"dispatch -> experts -> combine, forward and backward: {elapsed * 1e3:.1f} ms")
    print(
        f"output {tuple(mixed.shape)}; router gradient norm {router.weight.grad.norm():.4f}; "
        f"expert gradient norm {experts_in.grad.norm():.4f}"
    )

    with torch.no_grad():
        plan_ref = reference.make_plan(token_index, top_experts.t().reshape(-1), top_probs.t().reshape(-1), E, C)
        expected = reference.combine(expert_outputs, plan_ref, T)
        print(f"max difference from the pure-PyTorch reference: {(mixed - expected).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
