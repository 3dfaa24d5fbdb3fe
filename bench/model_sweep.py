"""Coverage sweep: every Sparse-IFT family on 30+ torchvision and Hugging Face architectures.

    python bench/model_sweep.py                       # every model x 4 families at s = 0.75 (uniform masks)
    python bench/model_sweep.py --only llama mixtral  # a subset
    python bench/model_sweep.py --mask balanced_block:16 --only gpt2 llama

Each case is `sg.checks.check_rewrite` (random init, small configs, CPU): the rewrite runs, the plan's
FLOPs equal FlopCounterMode's count of the original and of the rewritten model (math attention; MoE
grouped matmuls counted), the masks read back by a re-capture give the plan's sparse FLOPs, the sparse
FLOPs are within 0.1% of the original's dense FLOPs, and `sg.fold` computes the same function. The
rewritten model is the module form (the user's own class) wherever sparsegraph builds it, else the graph
form (marked ᵍ in the table, with the reason). Prints a
table (pass, FLOPs ratio, what widened) and writes bench/results/model_sweep.json. A coverage table,
not a timing table: the seconds column is only there to spot outliers.
"""
from __future__ import annotations

import argparse
import gc
import sys
import warnings
from typing import Callable

import torch

import sparsegraph as sg
from sparsegraph.checks import check_rewrite

from common import write_json

FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


def _ids(*shape, vocab=256):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _image(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def hf(arch: str, kind: str = "causal", **cfg):
    """A randomly initialised Hugging Face model from a small config (no download)."""
    import transformers

    config = transformers.AutoConfig.for_model(arch, **cfg)
    config.use_cache = False
    auto = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "masked": transformers.AutoModelForMaskedLM, "image": transformers.AutoModelForImageClassification,
            "base": transformers.AutoModel}[kind]
    return auto.from_config(config).eval()


def tv(name: str, **kw):
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kw).eval()


DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
GQA = dict(DEC, num_key_value_heads=2)

# name -> (source, builder returning (model, example inputs)); small configs, random init
ZOO: dict[str, tuple[str, Callable[[], tuple]]] = {
    # the seven
    "t5": ("transformers", lambda: (hf("t5", "seq2seq", d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                                       num_decoder_layers=2, vocab_size=256), (_ids(2, 12), None, _ids(2, 8)))),
    "bart": ("transformers", lambda: (hf("bart", "seq2seq", d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                         decoder_attention_heads=4, vocab_size=256, max_position_embeddings=64),
                                      (_ids(2, 12), None, _ids(2, 8)))),
    "falcon": ("transformers", lambda: (hf("falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=256), (_ids(2, 12),))),
    "vit_batch1": ("torchvision", lambda: (_tv_vit(), (_image(1, 3, 32, 32),))),
    "llama": ("transformers", lambda: (hf("llama", **GQA), (_ids(2, 12),))),
    "bloom": ("transformers", lambda: (hf("bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=256),
                                       (_ids(2, 12),))),
    "mixtral": ("transformers", lambda: (hf("mixtral", **GQA, num_local_experts=4, num_experts_per_tok=2),
                                         (_ids(2, 12),))),
    # more decoders
    "gpt2": ("transformers", lambda: (hf("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
                                      (_ids(2, 12),))),
    "gpt_neox": ("transformers", lambda: (hf("gpt_neox", **DEC, rotary_pct=0.25), (_ids(2, 12),))),
    "gptj": ("transformers", lambda: (hf("gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=256,
                                         n_positions=64), (_ids(2, 12),))),
    "opt": ("transformers", lambda: (hf("opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=256, word_embed_proj_dim=64,
                                        max_position_embeddings=64), (_ids(2, 12),))),
    "mistral": ("transformers", lambda: (hf("mistral", **GQA), (_ids(2, 12),))),
    "qwen2": ("transformers", lambda: (hf("qwen2", **GQA), (_ids(2, 12),))),
    "qwen3": ("transformers", lambda: (hf("qwen3", **GQA, head_dim=16), (_ids(2, 12),))),
    "phi": ("transformers", lambda: (hf("phi", **DEC, partial_rotary_factor=0.5), (_ids(2, 12),))),
    "gemma": ("transformers", lambda: (hf("gemma", **GQA, head_dim=16), (_ids(2, 12),))),
    "olmo": ("transformers", lambda: (hf("olmo", **DEC), (_ids(2, 12),))),
    "stablelm": ("transformers", lambda: (hf("stablelm", **GQA), (_ids(2, 12),))),
    "qwen2_moe": ("transformers", lambda: (hf("qwen2_moe", **GQA, moe_intermediate_size=64,
                                              shared_expert_intermediate_size=128, num_experts=4,
                                              num_experts_per_tok=2), (_ids(2, 12),))),
    # encoders
    "bert": ("transformers", lambda: (hf("bert", "masked", **DEC), (_ids(2, 12),))),
    "roberta": ("transformers", lambda: (hf("roberta", "masked", **DEC, max_position_embeddings=64),
                                         (_ids(2, 12),))),
    "distilbert": ("transformers", lambda: (hf("distilbert", "masked", dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                               vocab_size=256), (_ids(2, 12),))),
    "albert": ("transformers", lambda: (hf("albert", "masked", embedding_size=32, **DEC), (_ids(2, 12),))),
    "electra": ("transformers", lambda: (hf("electra", "masked", embedding_size=32, **DEC), (_ids(2, 12),))),
    "hf_vit": ("transformers", lambda: (hf("vit", "image", hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                                           num_labels=10), (_image(2, 3, 32, 32),))),
    # torchvision
    "resnet18": ("torchvision", lambda: (tv("resnet18", num_classes=10), (_image(2, 3, 64, 64),))),
    "resnet50": ("torchvision", lambda: (tv("resnet50", num_classes=10), (_image(2, 3, 64, 64),))),
    "resnext50_32x4d": ("torchvision", lambda: (tv("resnext50_32x4d", num_classes=10), (_image(2, 3, 64, 64),))),
    "mobilenet_v2": ("torchvision", lambda: (tv("mobilenet_v2", num_classes=10), (_image(2, 3, 64, 64),))),
    "mobilenet_v3_small": ("torchvision", lambda: (tv("mobilenet_v3_small", num_classes=10),
                                                   (_image(2, 3, 64, 64),))),
    "efficientnet_b0": ("torchvision", lambda: (tv("efficientnet_b0", num_classes=10), (_image(2, 3, 64, 64),))),
    "regnet_y_400mf": ("torchvision", lambda: (tv("regnet_y_400mf", num_classes=10), (_image(2, 3, 64, 64),))),
    "shufflenet_v2_x0_5": ("torchvision", lambda: (tv("shufflenet_v2_x0_5", num_classes=10),
                                                   (_image(2, 3, 64, 64),))),
    "squeezenet1_1": ("torchvision", lambda: (tv("squeezenet1_1", num_classes=10), (_image(2, 3, 64, 64),))),
    "densenet121": ("torchvision", lambda: (tv("densenet121", num_classes=10), (_image(2, 3, 64, 64),))),
    "convnext_tiny": ("torchvision", lambda: (_tv_convnext(), (_image(2, 3, 64, 64),))),
    "swin_t": ("torchvision", lambda: (_tv_swin(), (_image(2, 3, 32, 32),))),
    "vit": ("torchvision", lambda: (_tv_vit(), (_image(2, 3, 32, 32),))),
}


def _tv_vit():
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10).eval()


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=10).eval()


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10).eval()


def run(names: list[str], families: tuple[str, ...], sparsity: float, mask: str, recapture: bool) -> list[dict]:
    rows = []
    for name in names:
        source, build = ZOO[name]
        torch.manual_seed(0)
        try:
            model, x = build()
            g = sg.capture(model, x)
        except Exception as e:  # noqa: BLE001 - reported as a row per family
            for family in families:
                rows.append({"model": name, "source": source, "transform": family, "ok": False,
                             "error": f"build/capture: {type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                print(f"{name:20s} {family:18s} FAIL {rows[-1]['error']}", flush=True)
            continue
        for family in families:
            row = check_rewrite(model, x, family, sparsity, mask, graph=g, recapture=recapture)
            plan = row.pop("plan", None)
            row.pop("traceback", None)
            row.update(model=name, source=source)
            if plan is not None:
                row["experts"] = sum(1 for w in plan.sparse_weights if w.batch_axes)
                row["tables"] = [t["name"] for t in plan.tables]
                row["iso_notes"] = [n for n in plan.notes if n.startswith("iso-FLOP")]
            rows.append(row)
            status = "ok" if row["ok"] else f"FAIL {row['error']}"
            print(f"{name:20s} {family:18s} ratio {row.get('ratio', float('nan')):.5f}  {status}  "
                  f"{' '.join(row.get('widened', []))}  ({row['seconds']:.1f}s)", flush=True)
        del model, g
        gc.collect()
    return rows


def summary(rows: list[dict], families: tuple[str, ...]) -> str:
    """The README's table: per model, pass per family, and what Sparse Wide widened."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["transform"]): r for r in rows}
    short = {"sparse_wide": "Wide", "sparse_parallel": "Parallel", "sparse_factorized": "Factorized",
             "sparse_doped": "Doped"}
    lines = ["| model | source | " + " | ".join(short[f] for f in families) + " | Sparse Wide widened |",
             "|---|---|" + "---:|" * len(families) + "---|"]
    for m in models:
        cells = []
        for f in families:
            r = by.get((m, f))
            if r is None:
                cells.append("")
            elif r["ok"]:
                cells.append(f"✓ {r['ratio']:.4f}" + ("ᵍ" if r.get("form") == "graph" else ""))
            else:
                cells.append(f"✗ {r['ratio']:.4f}" if "ratio" in r else "✗")
        wide = by.get((m, "sparse_wide"), {})
        what = ", ".join(wide.get("widened", [])[:6]) or "—"
        if wide.get("experts"):
            what += f"; {wide['experts']} expert weights"
        if wide.get("tables"):
            what += "; RoPE recomputed"
        lines.append(f"| {m} | {by[(m, families[0])]['source'] if (m, families[0]) in by else ''} | "
                     + " | ".join(cells) + f" | {what} |")
    ok = sum(r["ok"] for r in rows)
    lines.append("")
    lines.append(f"**{ok} / {len(rows)} cases pass every check.**")
    graph = [r for r in rows if r.get("form") == "graph"]
    if graph:  # the module form declined these (check_rewrite then checks the graph form)
        lines.append("")
        lines.append(f"ᵍ {len(graph)} cases were checked as the graph form, where the module form has no swap "
                     "for the layer: " + "; ".join(sorted({r["module_error"].split(": ", 2)[-1].split(";")[0]
                                                          for r in graph})) + ".")
    failures = [r for r in rows if not r["ok"]]
    if failures:
        lines.append("")
        lines.append("| failing case | cause |")
        lines.append("|---|---|")
        for r in failures:
            cause = r["error"]
            if cause == "check failed: iso" and r.get("iso_notes"):  # the plan's own account of why
                cause = r["iso_notes"][0].removeprefix("iso-FLOP: ")
            lines.append(f"| {r['model']} {short.get(r['transform'], r['transform'])} | {cause} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(ZOO), help="models to run (default: all)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--mask", default="uniform")
    p.add_argument("--no-recapture", action="store_true", help="skip reading the masks back (faster)")
    p.add_argument("--output", default="model_sweep", help="name of the JSON file in bench/results")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = args.only or list(ZOO)
    families = tuple(args.families)
    rows = run(names, families, args.sparsity, args.mask, not args.no_recapture)
    table = summary(rows, families)
    print()
    print(table)
    path = write_json(args.output, rows, sparsity=args.sparsity, mask=args.mask, summary=table)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
