"""sg.lower(target="triton") runs the generated Triton kernels (interpreted on CPU, in a subprocess:
TRITON_INTERPRET=1 must be set before triton is imported)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch, torch.nn as nn
import sparsegraph as sg

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 32)
        for fc in (self.fc1, self.fc2):
            n, k = fc.weight.shape
            bm = torch.rand(-(-n // 16), -(-k // 16)) < 0.5
            bm[0] = False  # an empty block-row
            mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k].float()
            fc.register_buffer("weight_mask", mask)

    def forward(self, x):
        h = torch.relu(nn.functional.linear(x, self.fc1.weight * self.fc1.weight_mask, self.fc1.bias))
        return nn.functional.linear(h, self.fc2.weight * self.fc2.weight_mask, self.fc2.bias)


net = Net()
x = torch.randn(5, 64)
low = sg.lower(net, target="triton", example_inputs=(x,))
layers = low.lowering["layers"]
assert all(r["format"] == "triton" and r["block"] == 16 for r in layers.values()), layers
calls = [n for n in low.graph.nodes if n.target is torch.ops.sparsegraph.sparse_linear.default]
assert len(calls) == 2 and all(n.args[-1] == "triton" for n in calls)
y = low(x)
assert torch.allclose(y, net(x), atol=1e-5), (y - net(x)).abs().max()
y.square().sum().backward()
net(x).square().sum().backward()
from sparsegraph.backends.cpu import pack
for name in ("fc1.weight", "fc2.weight"):
    buf = dict(low.named_buffers())
    want = pack(dict(net.named_parameters())[name].grad, buf[name + "_crow"], buf[name + "_col"], 16)
    got = dict(low.named_parameters())[name + "_values"].grad
    assert torch.allclose(got, want, atol=1e-5), name
print("ok")
"""


def test_lower_to_triton_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


MODULE_SCRIPT = r"""
import torch
import sparsegraph as sg
from sparsegraph.backends.cpu import pack
from sparsegraph.models import builtin
from sparsegraph.nn import LoweredLinear

spec = builtin("gpt-mini", n_layer=1)
wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:16")
x = spec.example_inputs[0][:1, :8]  # (1, 8): 8 rows through the interpreter
low = sg.lower(wide, target="triton", example_inputs=(x,))
assert type(low) is type(wide)
layers = low.plan.lowering["layers"]
assert len(layers) == 4 and all(r["format"] == "triton" and r["block"] == 16 for r in layers.values()), layers
lowered = [m for m in low.modules() if isinstance(m, LoweredLinear)]
assert len(lowered) == 4 and all(m.weight_layout.impl == "triton" for m in lowered)
y, ref = low(x), wide(x)
assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()
y.square().sum().backward()
ref.square().sum().backward()
state, masked, values = low.state_dict(), dict(wide.named_parameters()), dict(low.named_parameters())
for name in layers:
    want = pack(masked[name].grad, state[name + "_crow"], state[name + "_col"], 16)
    assert torch.allclose(values[name + "_values"].grad, want, atol=1e-5), name
print("ok")
"""


def test_module_form_lowers_to_triton_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", MODULE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
