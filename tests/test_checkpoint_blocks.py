"""sg.checkpoint_blocks: the same gradients with each block recomputed in backward, fewer saved activations."""
import copy

import pytest
import torch
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.models import builtin


def _compact_gpt():
    torch.manual_seed(0)
    spec = builtin("gpt-mini", n_layer=3, n_embd=64, n_head=2)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:16", seed=0)
    return sg.lower(wide).train(), spec.example_inputs[0]


def _step(model, x):
    """Gradients of one forward and backward, and the bytes autograd saved for backward in forward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    (out.logits if hasattr(out, "logits") else out).float().square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, sum(saved)


def _count_calls(modules):
    calls = []
    for m in modules:
        m.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_compact_gpt_same_gradients_blocks_recomputed_fewer_saved_bytes():
    low, x = _compact_gpt()
    ckpt = sg.checkpoint_blocks(copy.deepcopy(low))
    assert sg.checkpoint_blocks(ckpt) is ckpt  # a second call changes nothing
    plain_grads, plain_saved = _step(low, x)
    calls = _count_calls([block.ln_1 for block in ckpt.h])
    grads, saved = _step(ckpt, x)
    assert len(calls) == 2 * len(ckpt.h)  # each block's forward again in backward, once
    assert grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name
    assert saved < plain_saved / 2, (saved, plain_saved)  # only the blocks' inputs stay for backward


def test_hugging_face_gpt2_and_explicit_blocks():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, use_cache=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    plain_grads, plain_saved = _step(model, x)
    for explicit in (False, True):
        ckpt = copy.deepcopy(model)
        h = ckpt.transformer.h
        sg.checkpoint_blocks(ckpt, blocks=[h[1]] if explicit else None)  # found by itself: transformer.h
        first, second = _count_calls([h[0].ln_1]), _count_calls([h[1].ln_1])
        grads, saved = _step(ckpt, x)
        assert (len(first), len(second)) == ((1, 2) if explicit else (2, 2))
        for name, g in plain_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name
        assert saved < plain_saved


def test_a_model_without_blocks_is_named():
    with pytest.raises(ValueError, match=r"Linear: no ModuleList of blocks to checkpoint; pass blocks="):
        sg.checkpoint_blocks(nn.Linear(2, 2))
