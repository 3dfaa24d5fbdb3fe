"""RigL in compact storage: a Sparse Wide GPT trained as its stored blocks, the blocks moving in place.

The built-in gpt-mini (2 layers) made Sparse Wide at s = 0.9 with balanced 32x32 blocks and lowered by
`sg.lower`: each sparse weight is its nonzero blocks (`weight_values`, int32 BSR indices), and AdamW
keeps its two moments per stored value. RigL drops the weakest blocks of every block-row and regrows
as many where the gradient is largest, rewriting values, optimizer state and indices in place; the
gradient on blocks that are not stored comes from the SDDMM op, so no dense weight is ever formed.
Data: the character corpus (Python's standard-library sources, nothing downloaded).

    python examples/compact_rigl.py                 # 200 steps (about a minute on 2 cores)
    python examples/compact_rigl.py --steps 60 --update-interval 10

Prints the loss, every RigL update, and the bytes of parameters and AdamW state next to those of the
same model trained masked-dense.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.data import char_corpus
from sparsegraph.models import builtin


def state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Parameters and buffers, plus the AdamW state if given (else two moments per parameter), in MB."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if optimizer is None:
        moments = 2 * params
    else:
        moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    return (params + buffers + moments) / 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--update-interval", type=int, default=25)
    p.add_argument("--sparsity", type=float, default=0.9)
    args = p.parse_args()

    torch.manual_seed(0)
    data, gen = char_corpus("train", block_size=64), torch.Generator().manual_seed(0)
    x, _ = data.batch(16, gen)  # (16, 64) tokens: the rows the cost model judges the layers at
    spec = builtin("gpt-mini", n_layer=2)
    wide = sg.sparsify(spec.model, (x,), "sparse_wide", args.sparsity, mask="balanced_block:32")
    model = sg.lower(wide, example_inputs=(x,))
    print(f"Sparse Wide s={args.sparsity} (hidden sparsity used {wide.plan.sparsity_used:.3f}), "
          f"lowered: {model.plan.lowering['formats']}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rigl = sg.dst.RigL(model, opt, total_steps=args.steps, update_interval=args.update_interval)
    print(f"{sum(lay.storage == 'compact' for lay in rigl.layers)} of {len(rigl.layers)} sparse layers compact")
    for step in range(1, args.steps + 1):
        x, y = data.batch(16, gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # (B T, vocab) vs (B T,)
        loss.backward()
        opt.step()
        rigl.step()
        history = sg.plan_of(model).history
        if history and history[-1]["step"] == step:
            moved = sum(rec["changed"] for rec in history[-1]["layers"].values())
            print(f"step {step:4d}  loss {loss.item():.3f}  RigL: drop fraction {history[-1]['drop_fraction']:.3f}, "
                  f"{moved} weights moved to new blocks")
        elif step % args.update_interval == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"parameters + buffers + AdamW state: compact {state_mb(model, opt):.1f} MB, "
          f"masked-dense {state_mb(wide):.1f} MB")


if __name__ == "__main__":
    main()
