"""Sparse Wide GPTs under `torch.compile(backend="sparsegraph")` against the dense original, eager and compiled.

    python bench/compiled.py                       # gpt-mini and HF GPT-2, s = 0.75 and 0.9, inference + training
    python bench/compiled.py --quick               # s = 0.75 only, fewer rounds, no training rows
    python bench/compiled.py --models gpt-mini --sparsity 0.75 --threads 1
    python bench/compiled.py --quick --threads 1 --keep-heap   # freed memory kept (cpu.keep_heap)

Models: the built-in gpt-mini (4 layers, d 128, input 16 x 128 tokens) and a Hugging Face GPT-2
built from its config (2 layers, d 512, 8 heads, vocab 2048, 128 positions, `use_cache=False`,
random init, no download; dropout off, like gpt-mini's, so training losses compare; input
8 x 128), made Sparse Wide with balanced block-32 masks.
Inference rows, all in eval mode under `torch.inference_mode()`:

  dense eager                    the original
  dense inductor                 torch.compile(original) (backend "inductor")
  dense inductor, frozen         the same with Inductor freezing (weights as constants, pre-packed for MKL)
  sparse lowered eager           sg.lower(wide): sparse layers call `sparsegraph::sparse_linear`
  sparse masked, sparsegraph     torch.compile(wide, backend="sparsegraph") on the masked-dense model
  sparse masked, sparsegraph, frozen     the same with options={"freezing": True}
  sparse lowered, sparsegraph    torch.compile(sg.lower(wide), backend="sparsegraph")
  sparse lowered, sparsegraph, frozen
  ..., frozen, dynamic           the frozen dense and masked rows compiled with dynamic=True: Inductor
                                 then runs dense fp32 linear layers through oneDNN, not MKL (much faster
                                 where MKL leaves AVX-512 idle), and the backend lowers a layer only if it
                                 beats that

Training rows (forward + backward of a cross-entropy loss, train mode; no optimizer step): dense
eager and inductor, Sparse Wide masked-dense eager and through the sparsegraph backend, lowered
eager and through the backend. Each row gives ms, the ratio to dense eager and to the faster dense
compiled row (iso-FLOP: the goal is 1.0x), and the largest difference of its logits from its
eager reference (the dense or the masked-dense model); the dense eager rows also give their GFLOP/s
(FlopCounterMode's count of the forward, or forward and backward) and its fraction of the machine's
FMA peak. Times are medians of interleaved rounds (`common.medians`); the machine line comes first;
results go to bench/results/compiled*.json.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.backends import compile as sgc
from sparsegraph.checks import call_flops
from sparsegraph.models import builtin

import common

MASK = "balanced_block:32"
FROZEN = {"freezing": True}


def gpt_mini():
    spec = builtin("gpt-mini")
    x = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0))
    return spec.model.eval(), spec.example_inputs, x, 256


def hf_gpt2():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=2048, n_positions=128,
                                  use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))
    return model, (x[:2],), x, 2048


MODELS = {"gpt-mini": gpt_mini, "hf-gpt2": hf_gpt2}


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def compiled(model, backend: str, options: dict | None = None, dynamic: bool | None = None):
    """torch.compile of a copy of `model` (each variant compiles its own: Dynamo's cache is per code
    object). Inductor's own freezing is a global switch read while Dynamo traces, so the frozen
    dense variant runs every call inside it."""
    model = copy.deepcopy(model)
    if backend == "inductor" and options:
        fn = torch.compile(model, backend="inductor", options=options, dynamic=dynamic)  # its own cache entry

        def call(*a):
            with torch._inductor.config.patch(options):
                return fn(*a)
        return call
    return torch.compile(model, backend=backend, options=options, dynamic=dynamic)


def inference_variants(dense, wide, low) -> dict[str, tuple]:
    """name -> (callable model, eager reference model)."""
    return {"dense eager": (dense, dense),
            "dense inductor": (compiled(dense, "inductor"), dense),
            "dense inductor, frozen": (compiled(dense, "inductor", FROZEN), dense),
            "dense inductor, frozen, dynamic": (compiled(dense, "inductor", FROZEN, dynamic=True), dense),
            "sparse lowered eager": (low, wide),
            "sparse masked, sparsegraph": (compiled(wide, "sparsegraph"), wide),
            "sparse masked, sparsegraph, frozen": (compiled(wide, "sparsegraph", FROZEN), wide),
            "sparse lowered, sparsegraph": (compiled(low, "sparsegraph"), wide),
            "sparse lowered, sparsegraph, frozen": (compiled(low, "sparsegraph", FROZEN), wide),
            "sparse masked, sparsegraph, frozen, dynamic": (compiled(wide, "sparsegraph", FROZEN, dynamic=True),
                                                             wide)}


def training_variants(dense, wide, low) -> dict[str, tuple]:
    return {"train: dense eager": (dense, dense),
            "train: dense inductor": (compiled(dense, "inductor"), dense),
            "train: sparse masked eager": (wide, wide),
            "train: sparse masked, sparsegraph": (compiled(wide, "sparsegraph"), wide),
            "train: sparse lowered eager": (low, wide),
            "train: sparse lowered, sparsegraph": (compiled(low, "sparsegraph"), wide)}


def warm(fns: dict, log) -> dict:
    """Call each once (compiling it) and report the time (compilation is paid once, not timed)
    and, for the sparsegraph backend, what it lowered and how many tensors it froze."""
    out = {}
    for k, f in fns.items():
        sgc.LOG.clear()
        t = time.perf_counter()
        out[k] = f()
        note = "".join(f"; lowered {e['lowering']['formats'] or 'nothing'}, {e['frozen']} frozen" for e in sgc.LOG)
        log(f"  {k}: first call {time.perf_counter() - t:.1f}s{note}")
    return out


def step(model, x, y, vocab):
    """Forward + backward of a cross-entropy loss; returns the logits (what `max_err` compares)."""
    def run():
        for p in model.parameters() if isinstance(model, torch.nn.Module) else ():
            p.grad = None
        out = logits(model(x))
        F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1)).backward()
        return out.detach()
    return run


def rows_of(times: dict, errors: dict, base_keys: tuple[str, str], meta: dict, flop: int) -> list[dict]:
    """One row per variant; the dense eager row also gets its GFLOP/s for `flop` per call."""
    eager, comp = base_keys
    best_compiled = min(times[k] for k in times if k.startswith(comp))
    rate = common.dense_rate(flop, times[eager], common.machine())
    return [{**meta, "variant": k, "ms": round(t * 1e3, 3), "x_dense_eager": round(t / times[eager], 3),
             "x_dense_compiled": round(t / best_compiled, 3), "max_err": errors[k], **(rate if k == eager else {})}
            for k, t in times.items()]


def run(name: str, sparsity: float, rounds: int, train: bool, log) -> list[dict]:
    dense, example, x, vocab = MODELS[name]()
    wide = sg.sparsify(dense, example, "sparse_wide", sparsity, mask=MASK, seed=0).eval()
    low = sg.lower(wide, example_inputs=(x,)).eval()
    log(f"{name} s={sparsity}: hidden sparsity {wide.plan.sparsity_used:.3f}, lowered {low.plan.lowering['formats']}")
    meta = {"model": name, "input": "x".join(map(str, x.shape)), "sparsity": sparsity}
    out = []
    variants = inference_variants(dense, wide, low)  # built outside inference mode, as a user would
    with torch.inference_mode():
        fns = {k: (lambda m=m: logits(m(x))) for k, (m, _) in variants.items()}
        first = warm(fns, log)
        ref = {k: logits(r(x)) for k, (_, r) in variants.items()}
        errors = {k: float((first[k] - ref[k]).abs().max()) for k in variants}
        times = common.medians(fns, rounds=rounds)
    flop = call_flops(fns["dense eager"])
    out += rows_of(times, errors, ("dense eager", "dense inductor"), {**meta, "mode": "inference"}, flop)
    if train:
        for m in (dense, wide, low):
            m.train()
        y = torch.randint(0, vocab, x.shape, generator=torch.Generator().manual_seed(1))
        variants = training_variants(dense, wide, low)
        fns = {k: step(m, x, y, vocab) for k, (m, _) in variants.items()}
        first = warm(fns, log)
        errors = {k: float((first[k] - step(r, x, y, vocab)()).abs().max()) for k, (_, r) in variants.items()}
        times = common.medians(fns, rounds=max(3, rounds // 2))
        flop = call_flops(fns["train: dense eager"])
        out += rows_of(times, errors, ("train: dense eager", "train: dense inductor"), {**meta, "mode": "train"}, flop)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sparsity", type=float, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, --quick 5)")
    p.add_argument("--quick", action="store_true", help="s = 0.75 only, 5 rounds, no training rows")
    p.add_argument("--no-train", action="store_true", help="inference rows only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    common.add_keep_heap(p)
    args = p.parse_args()
    heap_kept = common.keep_heap(p, args)
    # every variant compiles the same forward (one code object): raise Dynamo's recompile limit,
    # and fail rather than fall back to eager silently should it still be hit
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if args.threads:
        torch.set_num_threads(args.threads)
    print(common.describe(), flush=True)
    sparsities = args.sparsity or ([0.75] if args.quick else [0.75, 0.9])
    rounds = args.rounds or (5 if args.quick else 15)
    train = not (args.quick or args.no_train)
    rows = []
    with warnings.catch_warnings():
        for category in (UserWarning, FutureWarning, DeprecationWarning):  # the backend's own are RuntimeWarnings
            warnings.simplefilter("ignore", category)
        for name in args.models:
            for s in sparsities:
                torch._dynamo.reset()
                got = run(name, s, rounds, train, lambda m: print(m, flush=True))
                rows += got
                common.print_table(f"{name} s={s}, input {got[0]['input']} (ms; x = ratio)", got,
                                   ["mode", "variant", "ms", "x_dense_eager", "x_dense_compiled", "max_err",
                                    "gflops", "peak_frac"])
    out = "compiled" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "") \
        + heap_kept
    print("wrote", common.write_json(out, rows, heap_kept=args.keep_heap, rounds=rounds,
                                     timing="median of interleaved rounds",
                                     threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
