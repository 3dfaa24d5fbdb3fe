"""torch.compile(model, backend="sparsegraph"): lowered graphs, eager-equal outputs and gradients."""
import copy
import warnings

import pytest
import torch
import torch._functorch.config
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.backends import compile as sgc
from sparsegraph.models import builtin
from sparsegraph.models.gpt import loss_fn

from .onnx_checks import randomize_batch_norms
from .test_lower import _sparse_wins

SPARSE = "sparsegraph.sparse_linear"
PACKED = "sparsegraph.sparse_linear_packed.default"  # what a frozen graph's CPU products become (pretranspose)


def _count(graph_module, name):
    return sum(1 for n in graph_module.graph.nodes if name in str(n.target))


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """A fresh Dynamo, and no AOTAutograd cache: a hit would skip Inductor, and with it the graphs
    the tests read from `sgc.LOG` (Inductor's own FX graph cache still speeds up the compiles)."""
    torch._dynamo.reset()
    sgc.LOG.clear()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def test_backend_is_registered_by_entry_point():
    assert "sparsegraph" in torch._dynamo.list_backends()


def test_gpt_sparse_wide_matches_eager_with_gradients():
    spec = builtin("gpt-mini", n_layer=2)  # at s = 0.9 attention is wider than the residual stream: graph form only
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32", seed=2,
                       output="graph")
    fast = torch.compile(wide, backend="sparsegraph")
    x = spec.example_inputs[0]
    y = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(0))
    loss_fn(fast(x), y).backward()
    compiled = _grads(wide)
    wide.zero_grad()
    loss_fn(wide(x), y).backward()
    eager = _grads(wide)
    assert compiled.keys() == eager.keys()
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-6), k
    with torch.no_grad():
        assert torch.allclose(fast(x), wide(x), rtol=1e-4, atol=1e-5)
    entry = next(e for e in sgc.LOG if e["compiled"])
    n_sparse = len(wide.plan.sparse_weights)
    assert entry["lowering"]["formats"] == {"bsr": n_sparse}
    fw, bw = entry["compiled"][:2]  # AOT forward and backward graphs, as Inductor received them
    assert _count(fw, SPARSE + ".default") == n_sparse
    assert _count(bw, "sparse_linear_grad_input") == n_sparse and _count(bw, "sparse_linear_grad_values") == n_sparse


def test_resnet_sparse_wide_matches_eager_with_gradients():
    """The module form (your ResNet, MaskedConv2d layers) through Inductor, in training mode."""
    spec = builtin("resnet-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:8", seed=2)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.arange(8) % 10
    eager_model = copy.deepcopy(wide)  # BatchNorm running statistics update in train mode: keep twins
    fast = torch.compile(wide, backend="sparsegraph")
    nn.functional.cross_entropy(fast(x), target).backward()
    nn.functional.cross_entropy(eager_model(x), target).backward()
    compiled, eager = _grads(wide), _grads(eager_model)
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], rtol=1e-3, atol=1e-5), k
    entry = next(e for e in sgc.LOG if e["compiled"])
    convs = [r for r in entry["lowering"]["layers"].values() if r["kind"] == "conv" and r["format"] != "dense"]
    assert convs
    fw, bw = entry["compiled"][:2]
    assert _count(fw, "sparsegraph.sparse_conv2d.default") == len(convs)
    assert _count(bw, "sparse_conv2d_grad_input") >= len(convs) - 1  # the first conv's input needs no gradient
    assert _count(bw, "sparse_conv2d_grad_values") == len(convs)
    wide.eval()
    eager_model.eval()
    with torch.no_grad():
        assert torch.allclose(fast(x), eager_model(x), rtol=1e-4, atol=1e-5)


class _Masked(nn.Module):
    def __init__(self, mask_value=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(512, 512)
        bm = torch.rand(32, 32, generator=g) < 0.1
        mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1).float()
        if mask_value is not None:
            mask = mask * mask_value
        self.register_buffer("fc_mask", mask)

    def forward(self, x):
        return torch.relu(nn.functional.linear(x, self.fc.weight * self.fc_mask, self.fc.bias))


def test_unlowerable_graph_falls_back_with_one_warning():
    model = _Masked(mask_value=0.5)  # weight * 0.5-valued "mask": not a sparsity pattern
    fast = torch.compile(model, backend="sparsegraph")
    x = torch.randn(4, 512)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fast(x)
        out2 = fast(x)
    msgs = [str(r.message) for r in rec if "sparsegraph backend" in str(r.message)]
    assert len(msgs) == 1 and "other than 0 and 1" in msgs[0] and "fc_mask" in msgs[0], msgs
    assert torch.allclose(out, model(x)) and torch.allclose(out2, out)


def test_changed_masks_are_relowered():
    model = _Masked()
    fast = torch.compile(model, backend=sgc.make_backend("cpu", compiler=lambda gm, inputs, record: gm))
    x = torch.randn(64, 512)
    assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert sgc.LOG[-1]["lowering"]["formats"] == {"bsr": 1}
    compiled = len(sgc.LOG)
    with torch.no_grad():  # a dynamic-sparse-training update, in place: another 10% block pattern
        model.fc_mask.copy_(torch.roll(model.fc_mask, 16, 1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = fast(x)
    assert any("masks changed" in str(r.message) for r in rec)
    assert len(sgc.LOG) == compiled + 1 and sgc.LOG[-1]["lowering"]["formats"] == {"bsr": 1}  # re-lowered, sparse
    assert torch.allclose(y, model(x), atol=1e-5)
    assert torch.allclose(fast(x), model(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the module form, every family: Dynamo hands the backend each layer's weight * mask
# ---------------------------------------------------------------------------------------------
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
EAGER = sgc.make_backend("auto", compiler=lambda gm, inputs, record: gm)  # lowered, then run without Inductor


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _check_compiled(model, inputs, backend=EAGER):
    """torch.compile(model) (eval mode) against a copy run eagerly: outputs, every parameter's
    gradient, and every sparse weight lowered in the graphs the backend received."""
    eager = copy.deepcopy(model)
    fast = torch.compile(model, backend=backend)
    a, b = _logits(fast(*inputs)), _logits(eager(*inputs))
    assert torch.allclose(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    compiled, want = _grads(model), _grads(eager)
    assert compiled.keys() == want.keys()
    for k in want:
        assert torch.allclose(compiled[k], want[k], rtol=1e-4, atol=1e-6), k
    records = [r for e in sgc.LOG for r in e["lowering"]["layers"].values()]  # each compilation's choices
    assert all(r["format"] != "dense" for r in records), records
    assert {r["weight"] for r in records} == {w.name for w in sg.plan_of(model).sparse_weights}


@pytest.mark.parametrize("name,transform", [(n, t) if n == "gpt-mini" or t == "sparse_wide" else
                                            pytest.param(n, t, marks=pytest.mark.slow)  # ~35 s: the ResNet folds
                                            for n in ("gpt-mini", "resnet-mini") for t in FAMILIES])
def test_module_form_families_match_eager(monkeypatch, name, transform):
    from sparsegraph.backends import cost_model

    monkeypatch.setattr(cost_model, "load", _sparse_wins)
    spec = builtin("gpt-mini", n_layer=1) if name == "gpt-mini" else builtin("resnet-mini")
    mask = "balanced_block:16" if name == "gpt-mini" else "balanced_block:8"
    model = sg.sparsify(spec.model, spec.example_inputs, transform, 0.75, mask=mask, seed=1).eval()
    randomize_batch_norms(model)
    _check_compiled(model, spec.example_inputs)


def test_module_form_torchvision_resnet18(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from sparsegraph.backends import cost_model

    monkeypatch.setattr(cost_model, "load", _sparse_wins)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = sg.sparsify(torchvision.models.resnet18(num_classes=10), (x,), "sparse_doped", 0.75,
                        mask="balanced_block:16").eval()
    randomize_batch_norms(model)
    _check_compiled(model, (x,))


def test_module_form_hf_gpt2(monkeypatch):
    from sparsegraph.backends import cost_model
    from tests.conftest import hf_model

    monkeypatch.setattr(cost_model, "load", _sparse_wins)
    dense = hf_model("gpt2", n_layer=1, n_embd=128, n_head=4, vocab_size=100, n_positions=32)
    x = torch.randint(0, 100, (2, 16))
    _check_compiled(sg.sparsify(dense, (x,), "sparse_parallel", 0.75, mask="balanced_block:16").eval(), (x,))


# ---------------------------------------------------------------------------------------------
# fused end to end: the lowered graph goes to Inductor, the sparse op stays an extern call and
# the elementwise work around it is fused; inference (frozen or not) and training
# ---------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """LayerNorm, an MLP with GELU, a residual add, a head with softmax: elementwise work around the products."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = x + self.proj(nn.functional.gelu(self.fc(self.ln(x))))
        return torch.softmax(self.head(h), -1)


@pytest.fixture
def block(monkeypatch):
    """A Sparse Wide block (module form, every masked layer lowered) and an input."""
    from sparsegraph.backends import cost_model

    # block-16 BSR beats dense and CSR everywhere (CSR would store the 10-output head more tightly)
    monkeypatch.setattr(cost_model, "load", lambda: cost_model.CostModel(
        c_sparse=0.0, flops_sparse={"10": {"1": {"1": 1e3}, "16": {"1": 1e18}}}, flops_cols={"10": {"1": 1e18}}))
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    wide = sg.sparsify(_Block(), (x,), "sparse_wide", 0.75, mask="balanced_block:16", include_head=True, seed=1)
    return wide.eval(), x


OP_CALL = "torch.ops.sparsegraph.sparse_linear.default("
POINTWISE = ("aten.add", "aten.sub", "aten.mul", "aten.div", "aten.erf", "aten.exp", "aten.rsqrt", "aten.amax",
             "aten.sum", "aten.var_mean")


def _launches(code: str) -> list[str]:
    """What the generated `call()` runs, in order: its C++ kernels and extern calls."""
    body = code[code.index("def call(self, args):"):]
    body = body[:body.index("\n        return ")]
    return [s for s in (ln.strip() for ln in body.splitlines()) if not s.startswith(("assert", "#")) and
            (s.startswith("cpp_fused_") or "extern_kernels." in s or "torch.ops." in s)]


def test_inductor_fuses_the_elementwise_work_around_sparse_ops(block):
    """Masked-dense module form, inference with a dynamic batch: each sparse product is one extern
    call of the op, and LayerNorm, GELU, bias/residual adds and softmax run in a few fused C++
    kernels; another batch size runs the same compiled code."""
    from torch._inductor.utils import run_and_get_code

    wide, x = block
    n_sparse = len(sg.plan_of(wide).sparse_weights)
    fast = torch.compile(wide, backend="sparsegraph", dynamic=True)
    with torch.no_grad():
        y, codes = run_and_get_code(fast, x)
        assert torch.allclose(y, wide(x), rtol=1e-4, atol=1e-5)
        x6 = torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(6))
        assert torch.allclose(fast(x6), wide(x6), rtol=1e-4, atol=1e-5)
    assert len(sgc.LOG) == 1 and sgc.LOG[-1]["lowering"]["formats"] == {"bsr": n_sparse}
    launches = _launches(codes[-1])
    assert sum(OP_CALL in c for c in launches) == n_sparse, launches
    kernels = [c for c in launches if c.startswith("cpp_fused_")]
    others = [c for c in launches if not c.startswith("cpp_fused_") and OP_CALL not in c]
    assert all(c.startswith("extern_kernels.") for c in others), others  # the dense fc's GEMM, no aten fallbacks
    assert any("gelu" in c for c in kernels) and any("layer_norm" in c for c in kernels) and \
        any("softmax" in c for c in kernels), kernels
    graph = sgc.LOG[-1]["compiled"][0]  # what Inductor received
    pointwise = [n for n in graph.graph.nodes if any(str(n.target).startswith(p) for p in POINTWISE)]
    assert 3 * len(kernels) <= len(pointwise), (kernels, [str(n.target) for n in pointwise])


def test_frozen_inference_folds_the_packing_and_follows_weight_updates(block):
    """requires_grad off and no_grad: parameters compiled in as constants (Inductor freezing), so
    `pack(weight * mask)` is folded away; an in-place weight update is seen."""
    wide, x = block
    wide.requires_grad_(False)
    n_sparse = len(sg.plan_of(wide).sparse_weights)
    fast = torch.compile(wide, backend="sparsegraph")
    with torch.no_grad():
        assert torch.allclose(fast(x), wide(x), rtol=1e-4, atol=1e-5)
    entry = sgc.LOG[-1]
    assert entry["frozen"] == len(list(wide.parameters())) + len(list(wide.buffers()))
    frozen = entry["compiled"][0]
    assert entry["pretransposed"] == n_sparse and _count(frozen, PACKED) == n_sparse  # W's blocks as (in, out)
    assert _count(frozen, "aten.index") == 0 and _count(frozen, "constant_pad") == 0  # no packing left per call
    assert _count(frozen, "aten.permute") == _count(frozen, "aten.transpose") == _count(frozen, "aten.clone") == 0
    with torch.no_grad():
        wide.proj.weight.mul_(-1)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y = fast(x)
    assert any("changed" in str(r.message) for r in rec)
    assert torch.allclose(y, wide(x), rtol=1e-4, atol=1e-5)


def test_freezing_leaves_written_buffers_as_inputs():
    """BatchNorm in train mode under no_grad writes its running statistics: they stay graph inputs
    (neither frozen nor watched), the weights are frozen; outputs and statistics follow eager."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).train()
    twin = copy.deepcopy(m)
    fast = torch.compile(m, backend=sgc.make_backend(compiler=lambda gm, inputs, record: gm, freeze=True))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.allclose(fast(x), twin(x), atol=1e-5)
    assert not [r for r in rec if "sparsegraph backend" in str(r.message)]
    assert sgc.LOG[-1]["frozen"] == 4  # conv and BatchNorm weights and biases
    assert torch.equal(m[1].running_mean, twin[1].running_mean) and int(m[1].num_batches_tracked) == 2


def test_pretranspose_rewrites_only_products_of_constant_vector_wide_blocks():
    """`pretranspose` on a hand-built graph: a product whose values are a constant (or computed from
    constants only) with blocks a multiple of the vector width takes them transposed; one with
    values from an input, or with narrow blocks, is left alone. Results unchanged."""
    from sparsegraph.backends import cpu
    from sparsegraph.backends.sparse_linear import SparseWeight

    if cpu.library() is None:
        pytest.skip("no native library")
    lanes = cpu.library().vector_bytes // 4
    root, graph, g = torch.nn.Module(), torch.fx.Graph(), torch.Generator().manual_seed(0)
    x, v_in = graph.placeholder("x"), graph.placeholder("v_in")
    outs, inputs = [], {}
    for i, (block, source) in enumerate([(2 * lanes, "attr"), (2 * lanes, "computed"), (2 * lanes, "input"),
                                         (4, "attr")]):
        w = torch.randn(6 * lanes, 4 * lanes, generator=g) * (torch.rand(6 * lanes, 4 * lanes, generator=g) < 0.5)
        sw = SparseWeight.from_dense(w, block)
        for key in ("values", "crow", "col", "crow_t", "col_t", "perm_t"):
            root.register_buffer(f"w{i}_{key}", getattr(sw, key))
        idx = [graph.get_attr(f"w{i}_{key}") for key in ("crow", "col", "crow_t", "col_t", "perm_t")]
        values = graph.get_attr(f"w{i}_values")
        if source == "computed":
            values = graph.call_function(torch.ops.aten.mul.Tensor, (values, 1.0))
        elif source == "input":
            values, inputs["v_in"] = v_in, sw.values
        outs.append(graph.call_function(torch.ops.sparsegraph.sparse_linear.default,
                                        (x, values, *idx, None, sw.n, sw.k, block, -1, "auto")))
    graph.output(tuple(outs))
    gm = torch.fx.GraphModule(root, graph)
    xin = torch.randn(5, 4 * lanes, generator=g)
    with torch.no_grad():
        want = gm(xin, inputs["v_in"])
        assert sgc.pretranspose(gm) == 2
        got = gm(xin, inputs["v_in"])
    assert _count(gm, PACKED) == 2 and _count(gm, SPARSE + ".default") == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_global_inductor_freezing_lowers_parameters_dynamo_made_attributes(block):
    """With `torch._inductor.config.freezing` on and grad off, Dynamo hands the parameters and
    masks over as graph attributes, not inputs: they are lowered all the same, and watched."""
    wide, x = block
    n_sparse = len(sg.plan_of(wide).sparse_weights)
    fast = torch.compile(wide, backend=sgc.make_backend(compiler=lambda gm, inputs, record: gm))
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        assert torch.allclose(fast(x), wide(x), rtol=1e-4, atol=1e-5)
        entry = sgc.LOG[-1]
        assert entry["lowering"]["formats"] == {"bsr": n_sparse}
        assert entry["frozen"] == len(list(wide.parameters())) + len(list(wide.buffers()))
        assert _count(entry["lowered"], PACKED) == n_sparse == entry["pretransposed"]
        assert not [n for n in entry["lowered"].graph.nodes if n.op == "placeholder" and "mask" in n.name]
        wide.head.weight_mask[0].zero_()  # a mask update (DST would make one): re-lowered, eagerly
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert torch.allclose(fast(x), wide(x), rtol=1e-4, atol=1e-5)
    assert any("changed" in str(r.message) for r in rec)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_frozen_dynamic_batch_is_judged_against_onednn(block, monkeypatch):
    """Inductor freezes a dense fp32 linear layer into MKL's packed sgemm when the batch is static and
    into oneDNN's pre-packed linear when it is dynamic; the backend judges each sparse layer against
    the one that will run. Here sparse beats MKL and loses to oneDNN: a frozen dynamic-batch graph
    keeps every layer dense, a static one (and a dynamic one not frozen) lowers them all."""
    from torch._inductor.utils import run_and_get_code

    from sparsegraph.backends import cost_model

    wide, x = block
    wide.requires_grad_(False)
    n_sparse = len(sg.plan_of(wide).sparse_weights)
    costs = cost_model.CostModel(c_dense=0.0, c_sparse=0.0, flops_dense={"1": 1e16}, flops_dense_packed={"1": 1e20},
                                 flops_sparse={"10": {"1": {"1": 1e3}, "16": {"1": 1e18}}},
                                 flops_cols={"10": {"1": 1e18}})
    monkeypatch.setattr(cost_model, "load", lambda: costs)
    formats, reasons, code = {}, {}, {}
    for dynamic, freeze in ((False, True), (True, True), (True, False)):
        torch._dynamo.reset()
        fast = torch.compile(wide, backend=sgc.make_backend(freeze=freeze), dynamic=dynamic)
        with torch.no_grad():
            y, code[dynamic, freeze] = run_and_get_code(fast, x)
        assert torch.allclose(y, wide(x), rtol=1e-4, atol=1e-5)
        formats[dynamic, freeze] = sgc.LOG[-1]["lowering"]["formats"]
        reasons[dynamic, freeze] = [c["reason"] for c in sgc.LOG[-1]["lowering"]["layers"].values()]
    assert formats[False, True] == formats[True, False] == {"bsr": n_sparse}
    assert formats[True, True] == {"dense": n_sparse} and all("oneDNN" in r for r in reasons[True, True])
    assert "torch.ops.mkldnn._linear_pointwise" in "".join(code[True, True])
    if torch._C.has_mkl:  # the premise: a static batch's frozen dense linear layer runs MKL's packed sgemm
        torch._dynamo.reset()
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            _, dense_code = run_and_get_code(torch.compile(nn.Linear(32, 64).requires_grad_(False), dynamic=False),
                                             x)
        assert "torch.ops.mkl._mkl_linear" in "".join(dense_code)


def _train_twins(model, fast, twin, batches):
    """Forward + backward through `fast` and its eager `twin` at each batch size: equal gradients."""
    for batch in batches:
        xb = torch.randn(batch, 16, 32, generator=torch.Generator().manual_seed(batch))
        model.zero_grad()
        twin.zero_grad()
        fast(xb).log().mean().backward()
        twin(xb).log().mean().backward()
        compiled, eager = _grads(model), _grads(twin)
        assert compiled.keys() == eager.keys()
        for k in eager:
            assert torch.allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-6), k


def test_lowered_module_through_inductor_training_and_inference(block):
    """sg.lower's module form: Dynamo sees the op itself and Inductor keeps it extern; training
    (forward + backward, dynamic=False) and then inference with freezing."""
    wide, x = block
    low = sg.lower(wide).train()
    n_sparse = len(sg.plan_of(wide).sparse_weights)
    twin = copy.deepcopy(low)
    fast = torch.compile(low, backend="sparsegraph", dynamic=False, options={"freezing": True})
    _train_twins(low, fast, twin, (4,))
    assert any(k.endswith("weight_values") for k in _grads(low))
    fw, bw = sgc.LOG[-1]["compiled"][:2]
    assert _count(fw, SPARSE + ".default") == n_sparse and _count(bw, "sparse_linear_grad_values") == n_sparse
    low.eval()
    twin.eval()
    with torch.inference_mode():  # grad off: an inference graph, frozen
        assert torch.allclose(fast(x), twin(x), rtol=1e-4, atol=1e-5)
    assert sgc.LOG[-1]["frozen"] > 0 and _count(sgc.LOG[-1]["compiled"][0], PACKED) == n_sparse


@pytest.mark.slow
def test_masked_module_form_trains_through_inductor_at_changing_batch_sizes(block):
    """Training the masked-dense module form with the default dynamic=None: static first, then
    recompiled with a dynamic batch for a new batch size; gradients reach the dense weights."""
    wide, x = block
    wide.train()
    n_sparse = len(sg.plan_of(wide).sparse_weights)
    _train_twins(wide, torch.compile(wide, backend="sparsegraph"), copy.deepcopy(wide), (4, 6))
    assert [e["lowering"]["formats"] for e in sgc.LOG] == [{"bsr": n_sparse}, {"bsr": n_sparse}]
