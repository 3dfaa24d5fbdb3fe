"""SμPar / μP / SP: microsoft `mup` as the oracle for μP, hand-computed multipliers, the coordinate
check, the attention-scale rewrite, round trips of every multiplier, bad input."""
import copy
import math

import mup
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.cli import main
from sparsegraph.models.gpt import GPT
from sparsegraph.models.resnet import ResNet
from sparsegraph.passes.supar_module import ScaledAttention, forward_sites

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# models: each has a twin built for mup (same parameter names, MuReadout / MuSharedReadout head)
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Two hidden width-h layers between a fixed input and a fixed output (fc1 stem, fc2 hidden, out head)."""

    def __init__(self, h=64, d_in=32, d_out=10, readout=nn.Linear):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(d_in, h), nn.Linear(h, h), readout(h, d_out)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))  # (B, d_out)


class MupGPT(GPT):
    """The built-in GPT with mup's tied readout (its weight is wte.weight, so the names are the same)."""

    def __init__(self, **cfg):
        super().__init__(**cfg)
        self.lm_head = mup.MuSharedReadout(self.wte.weight, bias=False)

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def mup_resnet(widths):
    m = ResNet(widths, (1, 1, 1), 10, 1)
    m.fc = mup.MuReadout(widths[-1], 10)
    return m


GPT_CFG = dict(n_layer=1, n_head=2, vocab_size=64, block_size=16)
CASES = {  # name: (dense base for sparsegraph, mup base, mup target at width 2, example input)
    "mlp": (lambda: MLP(64), lambda: MLP(64, readout=mup.MuReadout), lambda: MLP(128, readout=mup.MuReadout),
            lambda: torch.randn(4, 32)),
    "gpt": (lambda: GPT(n_embd=32, **GPT_CFG), lambda: MupGPT(n_embd=32, **GPT_CFG),
            lambda: MupGPT(n_embd=64, **GPT_CFG), lambda: torch.randint(0, 64, (2, 16))),
    "resnet": (lambda: ResNet((8, 16, 32), (1, 1, 1), 10, 1), lambda: mup_resnet((8, 16, 32)),
               lambda: mup_resnet((16, 32, 64)), lambda: torch.randn(2, 1, 16, 16)),
}


def wide_dense(case, parameterization="mup", **kw):
    dense, _, _, x = CASES[case]
    m = sg.sparsify(dense(), (x(),), "sparse_wide", 0.0, width=2.0)
    return sg.supar.annotate(m, parameterization, **kw)


def mup_model(case):
    _, base, target, _ = CASES[case]
    t = target()
    mup.set_base_shapes(t, base())
    return t


def per_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


# ---------------------------------------------------------------------------------------------
# μP = mup, exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer, mu_opt", [("adam", mup.MuAdam), ("adamw", mup.MuAdamW), ("sgd", mup.MuSGD)])
def test_learning_rates_and_weight_decay_equal_mup(case, optimizer, mu_opt):
    lr, wd = 3e-3, 0.1
    ours = wide_dense(case)
    theirs = mup_model(case)
    assert {n: tuple(p.shape) for n, p in ours.named_parameters() if not n.startswith("sparsegraph")} == \
        {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    expect = per_name(theirs, mu_opt(theirs.parameters(), lr=lr, weight_decay=wd).param_groups)
    got = {n: (g["lr"], g["weight_decay"])
           for g in sg.supar.param_groups(ours, lr, wd, optimizer, decay_1d=True) for n in g["names"]}
    assert got == expect  # bit for bit, every parameter (mup decays biases and norm gains too)
    scaled = {n for n, (a, b) in got.items() if a != lr}
    assert scaled, "width 2 must change some learning rates"


@pytest.mark.parametrize("case", ["mlp", "resnet"])
def test_init_std_matches_mup_within_sampling_error(case):
    torch.manual_seed(0)
    ours = sg.supar.init_(wide_dense(case))
    theirs = mup_model(case)  # PyTorch default init + set_base_shapes' rescaling
    for name, p in theirs.named_parameters():
        a, b = ours.get_parameter(name).detach(), p.detach()
        if b.std() == 0:  # norms: ones / zeros exactly
            assert torch.equal(a, b), name
            continue
        n = b.numel()
        se = b.std() * math.sqrt(0.8 / n) / 2  # std error of a uniform sample's std (excess kurtosis -1.2)
        assert abs(float(a.std() - b.std())) < 5 * math.sqrt(2) * float(se), (name, float(a.std()), float(b.std()))


def test_wide_gpt_forward_multipliers_match_mup_readout():
    """MuSharedReadout computes ln_f(x) / width_mult @ W^T; the annotated graph does the same."""
    torch.manual_seed(0)
    ours = wide_dense("gpt", alpha_out=1.0)
    theirs = MupGPT(n_embd=64, **GPT_CFG)
    mup.set_base_shapes(theirs, MupGPT(n_embd=32, **GPT_CFG), rescale_params=False)
    state = {k: v for k, v in ours.state_dict().items() if k in theirs.state_dict()}
    theirs.load_state_dict(state, strict=False)
    # mup keeps the 1/sqrt(d_head) attention scale; compare with ours set back to it
    attn = [m for m in ours.modules() if isinstance(m, ScaledAttention)]
    assert [m.sdpa_scale for m in attn] == [1 / 32]  # SμPar's 1/d_head, passed to the module's SDPA call
    attn[0].sdpa_scale = None
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SμPar by hand: (m_d, m_ρ) = (2, 0.25)
# ---------------------------------------------------------------------------------------------
def test_hand_computed_multipliers_mlp():
    dense = MLP(64)
    base = {n: float(p.detach().double().std()) for n, p in dense.named_parameters()}  # each weight's own σ_base
    m = sg.sparsify(dense, (torch.randn(4, 32),), "sparse_wide", 0.75, width=2.0)
    sg.supar.annotate(m, "supar", alpha_in=3.0, alpha_out=5.0)
    plan = m.plan
    assert plan.weight("fc2.weight").density == 0.25 and plan.weight("fc2.weight").shape == [128, 128]
    # hidden fc2: init std σ_base / sqrt(2*0.25), σ_base the dense fc2's (PyTorch's U(±1/sqrt(64)): 1/sqrt(3*64));
    # Adam lr / (2*0.25); SGD lr * (2/2) / 0.25
    s = plan.weight("fc2.weight").supar
    assert (s["class"], s["m_in"], s["m_out"], s["m_rho"]) == ("hidden", 2.0, 2.0, 0.25)
    assert s["sigma_base"] == base["fc2.weight"] == pytest.approx(1 / math.sqrt(3 * 64), rel=0.05)
    assert s["init"] == {"dist": "uniform", "std": pytest.approx(base["fc2.weight"] / math.sqrt(0.5), rel=1e-12)}
    assert s["lr"]["adam"] == [1.0, 0.5] and s["lr"]["sgd"] == [1.0, 0.25]
    # stem fc1 (fan-out widened): init as base (U(+-1/sqrt(32))); Adam lr; SGD lr * 2
    s = plan.weight("fc1.weight").supar
    assert (s["class"], s["m_d"], s["init"]["std"]) == ("input", 2.0, base["fc1.weight"])
    assert base["fc1.weight"] == pytest.approx(1 / math.sqrt(3 * 32), rel=0.05)
    assert s["lr"]["adam"] == [1.0, 1.0] and s["lr"]["sgd"] == [2.0, 1.0]
    # head out (fan-in widened): init as base (U(+-1/sqrt(64))); forward x * alpha_out / 2
    s = plan.weight("out.weight").supar
    assert (s["class"], s["m_d"], s["init"]["std"]) == ("output", 2.0, base["out.weight"])
    assert s["lr"]["sgd"] == [2.0, 1.0]
    # biases: widened fc1/fc2 biases SGD lr * 2 and init as base (U(+-1/sqrt(fan_in of the base layer))); out.bias fixed
    assert plan.weight("fc2.bias").supar["lr"]["sgd"] == [2.0, 1.0]
    assert plan.weight("fc2.bias").supar["init"] == {"dist": "uniform", "std": base["fc2.bias"]}
    assert plan.weight("out.bias").supar["lr"]["sgd"] == [1.0, 1.0]
    assert [(f["site"], f["weight"], f["value"]) for f in plan.supar["forward"]] == [
        ("input", "fc1.weight", 3.0), ("output", "out.weight", 2.5)]
    lr, wd = 0.01, 0.1
    adam = {n: (g["lr"], g["weight_decay"]) for g in sg.supar.param_groups(m, lr, wd, "adamw") for n in g["names"]}
    assert adam["fc2.weight"] == (0.02, 0.05) and adam["fc1.weight"] == adam["out.weight"] == (0.01, 0.1)
    sgd = {n: (g["lr"], g["weight_decay"]) for g in sg.supar.param_groups(m, lr, wd, "sgd") for n in g["names"]}
    assert sgd["fc2.weight"] == (0.04, 0.025) and sgd["fc1.weight"] == (0.02, 0.05)
    assert sgd["fc1.bias"] == (0.02, 0.0) and sgd["out.bias"] == (0.01, 0.0)  # 1-D: no weight decay by default
    with_1d = {n: (g["lr"], g["weight_decay"])
               for g in sg.supar.param_groups(m, lr, wd, "sgd", decay_1d=True) for n in g["names"]}
    assert with_1d["fc1.bias"] == (0.02, 0.05) and with_1d["out.bias"] == (0.01, 0.1)
    for g in sg.supar.param_groups(m, lr, wd, "adamw", decay_1d=True) + sg.supar.param_groups(m, lr, wd, "sgd"):
        decays = [n for n in g["names"] if g["weight_decay"] > 0]
        assert not decays or g["lr"] * g["weight_decay"] == pytest.approx(lr * wd)  # decoupled decay per step unchanged
    # the forward: out(relu(fc2(relu(3 * fc1(x)))) * 5/2), by hand
    x = torch.randn(4, 32)
    p = {n: t.detach() for n, t in m.named_parameters()}
    h = torch.relu(3.0 * F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    h = torch.relu(F.linear(h, p["fc2.weight"] * m.get_buffer("fc2.weight_mask"), p["fc2.bias"]))
    torch.testing.assert_close(m(x), F.linear(h * 2.5, p["out.weight"], p["out.bias"]))


def test_sparse_stem_and_head_get_the_density_factor():
    m = sg.sparsify(MLP(64), (torch.randn(4, 32),), "sparse_wide", 0.75, width=2.0, include_stem=True,
                    include_head=True)
    sg.supar.annotate(m, "supar")
    for name, m_d in (("fc1.weight", 2.0), ("out.weight", 2.0)):
        s = m.plan.weight(name).supar
        assert s["m_rho"] == 0.25 and s["lr"]["adam"] == [1.0, 0.25] and s["lr"]["sgd"] == [m_d, 0.25]
        assert s["init_std_mult"] == 2.0


def test_sp_and_mup_ignore_density_or_everything():
    m = sg.sparsify(MLP(64), (torch.randn(4, 32),), "sparse_wide", 0.75, width=2.0)
    sg.supar.annotate(m, "mup")
    s = m.plan.weight("fc2.weight").supar
    assert s["m_rho"] == 1.0 and s["lr"]["adam"] == [1.0, 2.0]
    sg.supar.annotate(m, "sp", sigma_base=0.02)
    assert all(w.supar["lr"]["adam"] == [1.0, 1.0] and w.supar["lr"]["sgd"] == [1.0, 1.0] for w in m.plan.weights)
    assert m.plan.weight("fc2.weight").supar["init"] == {"dist": "normal", "std": 0.02}
    assert m.plan.supar["forward"] == [] and not hasattr(m, "sparsegraph_supar")


@pytest.mark.parametrize("form", ["module", "graph"])
def test_annotating_again_replaces_and_sp_restores_the_model(form):
    dense, _, _, xf = CASES["gpt"]
    x = xf()
    m = sg.sparsify(dense(), (x,), "sparse_wide", 0.5, width=2.0, output=form)
    before = m(x)
    code = m.code if form == "graph" else None
    sg.supar.annotate(m, "supar", alpha_in=2.0, alpha_out=3.0)
    sg.supar.annotate(m, "mup", alpha_in=4.0)
    assert len(m.plan.supar["forward"]) == 3
    if form == "graph":
        assert len(m.get_submodule("sparsegraph_supar")._buffers) == 3
    else:  # hooks on the embeddings (x 4) and on ln_f, which feeds the tied readout (x 1/m_d)
        assert [(f["module"], f["value"]) for f in forward_sites(m)] == [("wte", 4.0), ("wpe", 4.0), ("ln_f", 0.5)]
        assert type(m.h[0].attn).__name__ == "ScaledCausalSelfAttention"
    assert not torch.allclose(m(x), before)
    sg.supar.annotate(m, "sp")
    if form == "graph":
        assert m.code == code
    else:
        assert forward_sites(m) == [] and type(m.h[0].attn).__name__ == "CausalSelfAttention"
        assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)


def test_module_form_equals_the_annotated_graph():
    """The module form's hooks and attention scales compute what the graph rewrite computes."""
    dense, _, _, xf = CASES["gpt"]
    x, base = xf(), dense()
    forms = {f: sg.sparsify(base, (x,), "sparse_wide", 0.75, width=2.0, output=f) for f in ("module", "graph")}
    for m in forms.values():
        sg.supar.annotate(m, "supar", alpha_in=2.0, alpha_out=3.0, alpha_attn=1.5)
        sg.supar.init_(m, seed=1)
    torch.testing.assert_close(forms["module"](x), forms["graph"](x), rtol=1e-6, atol=1e-6)
    assert lrs(forms["module"]) == lrs(forms["graph"])


# ---------------------------------------------------------------------------------------------
# coordinate check
# ---------------------------------------------------------------------------------------------
class Deep(nn.Module):
    def __init__(self, h=512):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(32, h), nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def test_coord_check_flat_under_supar_drifting_under_sp(tmp_path):
    torch.manual_seed(0)
    sparsities = (0.0, 0.5, 0.75, 0.875, 0.9375)
    cc = sg.supar.coord_check(Deep(), (torch.randn(32, 32),), widths=(1,), sparsities=sparsities,
                              parameterizations=("sp", "supar"), steps=3, lr=1e-3, png=str(tmp_path / "cc.png"))
    assert (tmp_path / "cc.png").stat().st_size > 10_000
    rows = {(r["parameterization"], r["sparsity"]): r for r in cc.summary(step=3)}
    for key in ("hidden_act", "hidden_delta"):
        supar = [rows["supar", s][key] for s in sparsities]
        sp = [rows["sp", s][key] for s in sparsities]
        assert max(supar) / min(supar) < 1.25, (key, supar)
        assert all(a > b for a, b in zip(sp, sp[1:])), (key, sp)  # SP shrinks monotonically with density
        assert sp[0] / sp[-1] > 1.25, (key, sp)
    assert rows["sp", 0.0]["hidden_act"] == rows["supar", 0.0]["hidden_act"]  # dense, width 1: identical


def test_coord_check_cli(tmp_path, capsys, monkeypatch):
    (tmp_path / "ccmodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),\n"
        "                            torch.nn.Linear(64, 4))\n"
        "    return m, torch.randn(16, 8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    png = tmp_path / "cc.png"
    assert main(["coord-check", "ccmodels:make", "--widths", "1", "2", "--sparsities", "0", "0.75", "--steps", "2",
                 "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "coordinate check" in out and "supar" in out and png.stat().st_size > 10_000
    assert main(["coord-check", "ccmodels:make", "--sparsities", "1.5"]) == 2  # bad input: one line, status 2
    assert "--sparsities must be in [0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# attention logits: q.k / d_head
# ---------------------------------------------------------------------------------------------
def reference_gpt(model, idx, alpha_in, alpha_out, m_d, n_head):
    """The built-in GPT written out by hand with attention q.k^T / d_head and the SμPar multipliers."""
    p = {n: t.detach() for n, t in model.named_parameters()}
    for n, b in model.named_buffers():
        if n.endswith("_mask"):
            p[n[:-5]] = p[n[:-5]] * b
    B, T = idx.shape
    x = alpha_in * p["wte.weight"][idx] + alpha_in * p["wpe.weight"][:T]  # (B, T, C)
    C = x.shape[-1]
    ln = lambda t, k: F.layer_norm(t, (C,), p[f"{k}.weight"], p[f"{k}.bias"])  # noqa: E731
    lin = lambda t, k: F.linear(t, p[f"{k}.weight"], p[f"{k}.bias"])  # noqa: E731
    q, k, v = lin(ln(x, "h.0.ln_1"), "h.0.attn.c_attn").split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    att = (q @ k.transpose(-2, -1)) / (C // n_head)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    x = x + lin((att @ v).transpose(1, 2).reshape(B, T, C), "h.0.attn.c_proj")
    x = x + lin(F.gelu(lin(ln(x, "h.0.ln_2"), "h.0.mlp.c_fc")), "h.0.mlp.c_proj")
    return F.linear(ln(x, "ln_f") * alpha_out / m_d, p["wte.weight"])


@pytest.mark.parametrize("form", ["module", "graph"])
def test_sdpa_scale_rewritten_to_one_over_d_head(form):
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 16))
    m = sg.sparsify(GPT(n_embd=32, **GPT_CFG), (x,), "sparse_wide", 0.5, width=2.0, output=form)
    sg.supar.annotate(m, "supar", alpha_in=1.5, alpha_out=4.0)
    site = {"rule": "sdpa", "d_head": 32, "old": None, "new": 1 / 32}
    assert m.plan.supar["attention"] == [site | ({"module": "h.0.attn"} if form == "module" else {})]
    torch.testing.assert_close(m(x), reference_gpt(m, x, 1.5, 4.0, 2.0, 2), rtol=1e-5, atol=1e-5)


class ExplicitAttention(nn.Module):
    """Attention written out: (q @ k^T) * (1/sqrt(d)) or / sqrt(d), as Hugging Face eager code does."""

    def __init__(self, d=32, heads=2, form="mul"):
        super().__init__()
        self.qkv, self.proj, self.heads, self.form = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, form

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        s = q @ k.transpose(-2, -1)  # (B, H, T, T)
        s = s * (1.0 / math.sqrt(q.size(-1))) if self.form == "mul" else s / math.sqrt(q.size(-1))
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


def scale_constants(m):
    return [n.args[1] for n in m.graph.nodes if n.target in (aten.mul.Tensor, aten.div.Tensor)
            and isinstance(n.args[1], float)]


@pytest.mark.parametrize("form", ["mul", "div"])
def test_explicit_attention_pattern_rewritten(form):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    with pytest.raises(sg.SparsegraphError, match='output="graph"'):  # C is the input width in its code
        sg.sparsify(ExplicitAttention(form=form), (x,), "sparse_wide", 0.0, width=2.0, include_stem=True,
                    include_head=True)
    m = sg.sparsify(ExplicitAttention(form=form), (x,), "sparse_wide", 0.0, width=2.0, include_stem=True,
                    include_head=True, output="graph")
    original = scale_constants(m)  # 1/sqrt(16) or sqrt(16): the rewrite keeps the base model's constant
    sg.supar.annotate(m, "mup")
    (site,) = m.plan.supar["attention"]
    assert site["rule"] == f"qk_{form}" and site["d_head"] == 32
    p = {n: t.detach() for n, t in m.named_parameters()}
    alpha_out = m.plan.supar["forward"][-1]["value"]  # the readout proj's input multiplier, 1/m_d
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 2, 32).transpose(1, 2) for t in F.linear(x, p["qkv.weight"], p["qkv.bias"]).split(64, 2))
    att = ((q @ k.transpose(-2, -1)) / 32).softmax(-1)  # q.k / d_head
    ref = F.linear((att @ v).transpose(1, 2).reshape(B, T, 64) * alpha_out, p["proj.weight"], p["proj.bias"])
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    sg.supar.annotate(m, "sp")  # the original constant comes back
    assert m.plan.supar["attention"] == [] and scale_constants(m) == original


# ---------------------------------------------------------------------------------------------
# round trips: every multiplier survives (mup's infshapes do not)
# ---------------------------------------------------------------------------------------------
def signature(model):
    plan = sg.plan_of(model)
    return ({w.name: w.supar for w in plan.weights}, {k: v for k, v in plan.supar.items()})


def lrs(model):
    return {n: (g["lr"], g["weight_decay"]) for g in sg.supar.param_groups(model, 1e-3, 0.1) for n in g["names"]}


@pytest.mark.parametrize("form", ["module", "graph"])
def test_round_trips_keep_every_multiplier(tmp_path, form):
    dense, _, _, xf = CASES["gpt"]
    x = xf()
    base = dense()
    m = sg.sparsify(base, (x,), "sparse_wide", 0.75, width=2.0, output=form)
    sg.supar.annotate(m, "supar", sigma_base=0.02, alpha_in=2.0, alpha_out=3.0, eta_base=1e-3)
    sg.supar.init_(m)
    sig, ref_lrs, y = signature(m), lrs(m), m(x)
    # sg.save / sg.load (a GPT of the test's own: sg.load rebuilds it from a fresh dense model)
    sg.save(m, tmp_path / "m.sgm")
    loaded = sg.load(tmp_path / "m.sgm", model=dense())
    assert type(loaded).__name__ == type(m).__name__ and signature(loaded) == sig and lrs(loaded) == ref_lrs
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    # deepcopy
    c = copy.deepcopy(m)
    assert signature(c) == sig and lrs(c) == ref_lrs
    torch.testing.assert_close(c(x), y, rtol=0, atol=0)
    # state_dict into a fresh model annotated differently: the plan (and multipliers) come with it
    fresh = sg.supar.annotate(sg.sparsify(base, (x,), "sparse_wide", 0.75, width=2.0, output=form), "supar",
                              alpha_in=2.0, alpha_out=3.0)
    fresh.load_state_dict(m.state_dict())
    if form == "module":  # the module form's hooks follow the plan that came with the state_dict
        sg.supar.annotate(fresh, None)
    assert signature(fresh) == sig and lrs(fresh) == ref_lrs
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    bare = sg.sparsify(base, (x,), "sparse_wide", 0.75, width=2.0, output=form)
    if form == "graph":  # state_dict into a never-annotated graph: strict loading refuses the multiplier buffers
        with pytest.raises(RuntimeError, match="sparsegraph_supar"):
            bare.load_state_dict(m.state_dict())
        bare = sg.sparsify(base, (x,), "sparse_wide", 0.75, width=2.0, output=form)
    # non-strict loading brings the plan; sg.supar notices the model lacks the multipliers
    bare.load_state_dict(m.state_dict(), strict=False)
    assert signature(bare) == sig
    with pytest.raises(sg.SparsegraphError, match="annotate"):
        sg.supar.param_groups(bare, 1e-3)
    sg.supar.annotate(bare, None)  # apply the plan's own parameterisation
    bare.load_state_dict(m.state_dict())
    assert signature(bare) == sig and lrs(bare) == ref_lrs
    torch.testing.assert_close(bare(x), y, rtol=0, atol=0)
    # mup, by contrast, loses its infshapes in a deepcopy and in a fresh model
    t = mup_model("gpt")
    assert not hasattr(copy.deepcopy(t).h[0].mlp.c_fc.weight, "infshape")
    f = MupGPT(n_embd=64, **GPT_CFG)
    f.load_state_dict(t.state_dict())
    with pytest.raises(AssertionError, match="infshape"):
        mup.MuAdam(f.parameters(), lr=1e-3)


def test_ddp_wrapper_reads_the_plan(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    m = wide_dense("mlp", "supar")
    ref = lrs(m)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DDP(m)
        assert sg.plan_of(ddp) is m.plan
        groups = sg.supar.param_groups(ddp, 1e-3, 0.1)
        assert {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]} == ref
        assert sum(len(g["params"]) for g in groups) == len(list(ddp.parameters()))
        sg.supar.init_(ddp)  # through the wrapper too
        torch.optim.AdamW(groups).zero_grad()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input():
    m = wide_dense("mlp", "supar")
    with pytest.raises(ValueError, match="unknown parameterization 'mu-p'"):
        sg.supar.annotate(m, "mu-p")
    with pytest.raises(sg.SparsegraphError, match="has no sparsity plan.*sg.sparsify"):
        sg.supar.annotate(MLP(), "supar")
    with pytest.raises(sg.SparsegraphError, match="has no sparsity plan"):
        sg.supar.param_groups(MLP(), 1e-3)
    with pytest.raises(ValueError, match="lr must be a non-negative number, got -0.001"):
        sg.supar.param_groups(m, -1e-3)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        sg.supar.param_groups(m, 1e-3, optimizer="lamb")
    with pytest.raises(ValueError, match="alpha_out must be a positive number"):
        sg.supar.annotate(m, "supar", alpha_out=0.0)
    with pytest.raises(ValueError, match="unknown preset"):
        sg.supar.annotate(m, "supar", preset="gpt-17")
    fresh = sg.sparsify(MLP(), (torch.randn(2, 32),), "sparse_wide", 0.5)
    with pytest.raises(sg.SparsegraphError, match="no SμPar annotation; call sg.supar.annotate"):
        sg.supar.param_groups(fresh, 1e-3)
    with pytest.raises(sg.SparsegraphError, match="lower lr"):
        sg.supar.coord_check(MLP(), (torch.randn(4, 32),), widths=(1,), sparsities=(0.0,),
                             parameterizations=("sp",), steps=2, lr=1e30)


def test_presets_tied_embedding_and_dynamic_sparsity_warning():
    m = wide_dense("gpt", "supar", preset="cerebras-gpt")
    hp = m.plan.supar
    assert (hp["sigma_base"], hp["eta_base"], hp["alpha_in"], hp["alpha_out"]) == (0.08, 6e-3, 10.0, 1.0)
    assert m.plan.weight("wte.weight").supar["class"] == "input"  # tied: embedding and readout
    assert {g["lr"] for g in sg.supar.param_groups(m)} == {6e-3, 6e-3 / 2}  # eta_base from the plan
    m.plan.history.append({"step": 100, "kind": "rigl"})
    with pytest.warns(UserWarning, match="over-corrects"):
        sg.supar.annotate(m, "supar")
    assert "RigL" in m.plan.supar["notes"][0]


def test_coord_check_targets_are_not_the_inputs():
    """gpt-mini's example tokens come from seed 0; the fixed targets must be a different stream, or the
    model only has to copy its input (zero loss, no updates: a check that measures nothing)."""
    from sparsegraph.models import builtin
    from sparsegraph.supar import _default_data

    spec = builtin("gpt-mini", n_layer=1)
    (x,), targets = _default_data(spec.model, spec.example_inputs, seed=0)(0)
    assert targets.shape == x.shape
    assert (targets == x).float().mean() < 0.05  # 1/256 by chance


def test_explicit_multipliers_win_over_a_preset_and_optimizer_names_are_checked():
    from sparsegraph.models import builtin

    spec = builtin("gpt-mini", n_layer=1)
    m = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.5)
    sg.supar.annotate(m, "supar", preset="btlm", alpha_in=1.0, alpha_out=1.0)  # 1.0 asked for, not the preset's
    assert (m.plan.supar["alpha_in"], m.plan.supar["alpha_out"]) == (1.0, 1.0)
    sg.supar.annotate(m, "supar", preset="btlm")
    assert (m.plan.supar["alpha_in"], m.plan.supar["alpha_out"]) == (14.6, 2.22)
    with pytest.raises(sg.supar.SuparError, match="unknown optimizer 'lamb'"):
        sg.supar.coord_check(spec.model, spec.example_inputs, widths=(1,), sparsities=(0.0,), optimizer="lamb")
    cc = sg.supar.coord_check(spec.model, spec.example_inputs, widths=(1,), sparsities=(0.0,),
                              parameterizations=("sp",), steps=1, optimizer="AdamW")
    assert cc.rows


# ---------------------------------------------------------------------------------------------
# σ_base per weight from the dense model; the SGD rule with m_in != m_out; factorized_bn in the plan
# ---------------------------------------------------------------------------------------------
def test_sigma_base_is_each_weights_own_init_gpt2_c_proj_included():
    from .conftest import hf_model

    n_layer = 2
    dense = hf_model("gpt2", n_layer=n_layer, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    own = {n: float(p.detach().double().std()) for n, p in dense.named_parameters()}
    m = sg.sparsify(dense, (torch.randint(0, 128, (2, 16)),), "sparse_wide", 0.75)
    sg.supar.annotate(m, "supar")
    checked = 0
    for w in m.plan.weights:
        if w.kind in ("linear", "conv", "embedding"):
            assert w.supar["sigma_base"] == own[w.source], w.name  # the dense model's own σ, not a global one
            checked += 1
    assert checked >= 4 * n_layer + 1
    # GPT-2 initialises its residual projections with σ/√(2·n_layer), everything else with σ = 0.02
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert m.plan.weight(name).supar["sigma_base"] == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05)
    assert m.plan.weight("transformer.h.0.attn.c_attn.weight").supar["sigma_base"] == pytest.approx(0.02, rel=0.05)
    s = m.plan.weight("transformer.h.0.mlp.c_proj.weight").supar
    assert s["init"] == {"dist": "normal", "std": pytest.approx(s["sigma_base"] / math.sqrt(s["m_in"] * s["m_rho"]))}
    assert m.plan.weight("transformer.h.0.attn.c_attn.bias").supar["init"] == {"dist": "zeros", "std": 0.0}
    sg.supar.init_(m)
    w = m.get_parameter("transformer.h.0.mlp.c_proj.weight").detach()
    assert float(w.std()) == pytest.approx(s["init"]["std"], rel=0.05)
    sg.supar.annotate(m, "supar", sigma_base=0.05)  # one σ for every weight only when asked for
    assert {w.supar["sigma_base"] for w in m.plan.weights if w.kind == "linear"} == {0.05}


def test_sgd_rule_with_fan_in_and_fan_out_multipliers_apart():
    """Sparse Factorized at s = 0.75: fc2 (64 -> 64) becomes U (64 -> d) then V (d -> 64), d = 128, density
    64·64 / (64·128 + 128·64) = 0.25 each. U: m_in = 1, m_out = 2; V: m_in = 2, m_out = 1."""
    dense = MLP(64)
    m = sg.sparsify(dense, (torch.randn(4, 32),), "sparse_factorized", 0.75)
    sg.supar.annotate(m, "supar")
    u, v = m.plan.weight("fc2.u.weight"), m.plan.weight("fc2.v.weight")
    assert u.shape == [128, 64] and v.shape == [64, 128] and u.density == v.density == 0.25
    su, sv = u.supar, v.supar
    assert (su["class"], su["m_in"], su["m_out"], su["m_rho"]) == ("hidden", 1.0, 2.0, 0.25)
    assert (sv["class"], sv["m_in"], sv["m_out"], sv["m_rho"]) == ("hidden", 2.0, 1.0, 0.25)
    # SGD: η·(m_out/m_in)/m_ρ -> U 8η, V 2η; Adam: η/(m_in·m_ρ) -> U 4η, V 2η; init σ/√(m_in·m_ρ)
    assert su["lr"]["sgd"] == [1.0, 0.125] and sv["lr"]["sgd"] == [1.0, 0.5]
    assert su["lr"]["adam"] == [1.0, 0.25] and sv["lr"]["adam"] == [1.0, 0.5]
    sigma = float(dense.fc2.weight.detach().double().std())
    assert su["init"]["std"] == pytest.approx(sigma * 2) and sv["init"]["std"] == pytest.approx(sigma / math.sqrt(0.5))
    lr = {n: g["lr"] for g in sg.supar.param_groups(m, 0.01, optimizer="sgd") for n in g["names"]}
    assert lr["fc2.u.weight"] == pytest.approx(0.08) and lr["fc2.v.weight"] == pytest.approx(0.02)


def test_factorized_bn_batchnorms_are_in_the_plan():
    from sparsegraph.models import builtin

    spec = builtin("resnet-mini")
    m = sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.75, factorized_bn=True)
    assert {n for n, _ in m.named_parameters()} == {w.name for w in m.plan.weights}
    assert m.plan.totals["params"] == sum(p.numel() for p in m.parameters())
    bn = m.plan.weight("layers.0.0.conv1.uv_bn.weight")
    assert (bn.role, bn.kind, bn.shape) == ("norm", "norm", [m.plan.weight("layers.0.0.conv1.u.weight").shape[0]])
    sg.supar.annotate(m, "supar")
    assert m.plan.weight("layers.0.0.conv1.uv_bn.bias").supar["init"]["dist"] == "zeros"
    sg.supar.init_(m)  # every planned parameter, the added BatchNorms included
