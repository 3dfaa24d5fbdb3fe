"""Capture: torch.export main path, symbolic_trace / Dynamo graphs, canonical trainable modules."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.capture import BatchNorm, trace
from sparsegraph.models import builtin


def test_trace_resnet_matches_original_in_train_and_eval_at_any_batch():
    spec = builtin("resnet-mini")
    model = spec.model
    gm = trace(model, spec.example_inputs)
    assert any(isinstance(m, BatchNorm) for m in gm.modules())
    x = torch.randn(5, 1, 16, 16)  # a batch size the capture never saw
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x))
    model.train(), gm.train()
    torch.testing.assert_close(gm(x), model(x))  # batch statistics, running stats updated alike
    for (n1, b1), (n2, b2) in zip(sorted(model.named_buffers()), sorted(gm.named_buffers())):
        assert n1 == n2
        torch.testing.assert_close(b1, b2)


def test_trace_keeps_parameter_names_and_gradients_flow():
    spec = builtin("gpt-mini", n_layer=2)
    gm = trace(spec.model, spec.example_inputs)
    assert set(dict(spec.model.named_parameters())) == set(dict(gm.named_parameters()))
    idx = torch.randint(0, 256, (3, 17))
    torch.testing.assert_close(gm(idx), spec.model(idx))
    gm(idx).sum().backward()
    assert all(p.grad is not None for p in gm.parameters())


def test_modelgraph_has_kinds_shapes_weights_and_backpointers():
    spec = builtin("gpt-mini", n_layer=1)
    g = sg.capture(spec.model, spec.example_inputs)
    kinds = {op.kind for op in g}
    assert {"linear", "embedding", "norm", "attention", "reshape", "permute", "split"} <= kinds
    qkv = next(op for op in g if op.module == "h.0.attn.c_attn")
    assert g.values[qkv.ref("weight")].param == "h.0.attn.c_attn.weight"
    assert g.shape(qkv.outputs[0]) == (2, 64, 384)
    assert g.values[qkv.outputs[0]].symbolic == (True, True, False)  # batch and sequence stay dynamic
    assert isinstance(qkv.source, fx.Node) and qkv.source.graph is g.source.graph
    assert all(g.nx.has_edge(g.producer(i).name, qkv.name) for i in qkv.inputs if g.producer(i))


def test_symbolic_trace_and_dynamo_graphs_are_accepted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(2, 3, 8, 8)
    ref = sg.analyze(model, (x,))
    via_fx = sg.analyze(sg.capture(fx.symbolic_trace(model), (x,)))
    assert via_fx.dense_flops == ref.dense_flops
    assert [r.weight for r in via_fx.layers] == [r.weight for r in ref.layers]

    seen = {}

    def backend(gm, example_inputs):
        seen["graph"] = sg.capture(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x)
    assert sg.analyze(seen["graph"]).dense_flops == ref.dense_flops


def test_symbolic_trace_fallback_when_export_fails(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def broken(*a, **k):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.warns(UserWarning, match="symbolic_trace"):
        gm = trace(model, (torch.randn(3, 4),))
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))


class NumpyInside(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 2)


def test_uncapturable_module_is_one_clear_error():
    with pytest.raises(sg.CaptureError, match=r"cannot capture NumpyInside: torch.export.*symbolic_trace"):
        sg.capture(NumpyInside(), (torch.randn(2, 3),))


def test_capture_without_inputs_is_an_error():
    with pytest.raises(sg.CaptureError, match="example inputs are required"):
        sg.capture(nn.Linear(2, 2))


@pytest.mark.parametrize("make_inputs, message", [
    (lambda: (torch.randn(2, 1, 16, 16), torch.randn(3)),
     r"^ResNet.forward\(x\) does not take the example inputs \(float32\[2, 1, 16, 16\], float32\[3\]\): "
     r"too many positional arguments$"),
    (lambda: (torch.randn(2, 3, 16, 16),),
     r"^ResNet does not run on its example inputs \(float32\[2, 3, 16, 16\]\): RuntimeError: Given groups=1, "
     r"weight of size \[16, 1, 3, 3\], expected input\[2, 3, 16, 16\] to have 1 channels.* \(at resnet.py:\d+\)$"),
])
def test_wrong_example_inputs_are_named_before_tracing(make_inputs, message):
    """What is wrong is said in terms of the inputs (count against forward's signature, shapes and
    dtypes with the model's own error and where), not in torch.export's words; the model is unchanged."""
    spec = builtin("resnet-mini")
    spec.model.train()
    spec.model.layers[0].eval()  # a mixed train/eval state survives the check
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    with pytest.raises(sg.CaptureError, match=message):
        sg.capture(spec.model, make_inputs())
    assert spec.model.training and not spec.model.layers[0].training and spec.model.layers[1].training
    assert all(torch.equal(v, spec.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 64), r"ValueError: expected token ids of shape \(batch, sequence\), got shape \(2, 3, 64\)"),
    ((1, 500), r"ValueError: sequence length 500 is longer than the context of 128 tokens"),
])
def test_gpt_inputs_it_cannot_run_are_refused(shape, message):
    spec = builtin("gpt-mini", n_layer=1)
    with pytest.raises(sg.CaptureError, match=rf"^gpt-mini does not run on its example inputs "
                                              rf"\(int64\[{', '.join(map(str, shape))}\]\): {message}"):
        sg.capture(spec.model, (torch.zeros(shape, dtype=torch.long),), name="gpt-mini")
    with pytest.raises(sg.SparsegraphError, match="does not run on its example inputs"):
        sg.sparsify(spec.model, (torch.zeros(shape, dtype=torch.long),), "sparse_wide", 0.5)


def test_getitem_of_multi_output_ops_become_aliases():
    spec = builtin("gpt-mini", n_layer=1)
    g = sg.capture(spec.model, spec.example_inputs)
    split = next(op for op in g if op.op == "split")
    assert len(split.outputs) == 3
    aliases = [op for op in g if op.op == "alias" and op.inputs[0] in split.outputs]
    assert len(aliases) == 3 and all(op.source.target is operator.getitem for op in aliases)


def test_dynamo_graph_parameters_keep_their_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = {}

    def backend(gm, example_inputs):
        seen["graph"] = sg.capture(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randn(3, 4))
    g = seen["graph"]
    assert set(g.params) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert [r.role for r in sg.analyze(g).layers] == ["stem", "head"]


def test_tied_weights_are_one_parameter_under_their_first_name():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Embedding(16, 8)
            self.enc, self.dec = torch.nn.Embedding(16, 8), torch.nn.Embedding(16, 8)
            self.mid = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 16, bias=False)
            self.enc.weight = self.dec.weight = self.head.weight = self.shared.weight

        def forward(self, a, b):  # the graph reads the tied weight as head.weight, enc.weight, dec.weight
            return self.head(self.mid(self.enc(a) + self.dec(b)))

    ids = torch.randint(0, 16, (2, 5))
    g = sg.capture(Tied(), (ids, ids))
    assert "shared.weight" in g.params and not any(v.kind == "const" for v in g.values.values())
    report = sg.analyze(g)
    roles = {(r.name, r.kind): r.role for r in report.layers}
    assert roles[("mid", "linear")] == "hidden"  # the tied embeddings are the stem, not the linear after them
    assert {r.weight for r in report.layers if r.kind == "embedding"} == {"shared.weight"}


def test_x_at_weight_transposed_is_a_linear_layer():
    class FalconLinear(torch.nn.Linear):  # transformers' Falcon: input @ self.weight.T (aten.numpy_T)
        def forward(self, x):
            return x @ self.weight.T

    m = torch.nn.Sequential(torch.nn.Linear(4, 8), FalconLinear(8, 8, bias=False), torch.nn.Linear(8, 2))
    x = (torch.randn(3, 4),)
    g = sg.capture(m, x)
    assert [op.op for op in g if op.op in ("linear", "matmul")] == ["linear", "linear", "linear"]
    assert not any("numpy_T" in op.target for op in g)
    torch.testing.assert_close(g.source(*x), m(*x))
    plan = sg.sparsify(m, x, "sparse_factorized", 0.5).plan
    assert plan.weight("1.u.weight").sparse  # the middle layer is found and rewritten
