"""A channel rule for a custom op, end to end (README, "Writing a rule"): `python examples/custom_rule.py`.

``ChannelScale`` multiplies channel c by a learned ``weight[c]``. It stands for any module you keep as one
node (a fused kernel, code torch.fx cannot trace): gpdc probes parameter-free ops, but a module with
parameters needs a rule saying how its parameters follow the channels.
"""

import sys

import torch
from torch import nn

import gpdc
from gpdc.exactness import check_expansion
from gpdc.layout import Layout
from gpdc.rules import ChannelsIn


@gpdc.register_leaf_module  # kept as one call_module node, like a fused kernel
class ChannelScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels).uniform_(0.5, 1.5))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class ChannelScaleRule(gpdc.Rule):
    """The output holds the input's channels; every teacher copy of channel c is scaled by the student's
    weight[c], and the student reads its weight from the first copies."""

    def analyze(self, node, an):
        L = an.layout_of(node.args[0])  # which student channel each position of the input's channel dim holds
        if not isinstance(L, Layout) or L.dim != 1:
            raise gpdc.RuleError(f"ChannelScale '{node.target}' expects its channels in dim 1.")
        an.record(node, ChannelsIn(L))  # facts for expand: a frozen dataclass, kept on the node
        return L  # same channels out: they widen together with the input's group

    def expand(self, node, ex):
        m, L = ex.an.module(node), ex.facts(node).inp
        TI = ex.tin(node.args[0], L)  # layout of the widened input: (channel, copy) per teacher position
        src = torch.as_tensor(ex.student_pos(L, TI))  # the student channel of each teacher position
        new = ex.clone(m, params={"weight": m.weight.detach()[src]})
        ex.emit_module(node, new, ex.arg(node.args[0]), layout=TI)
        ex.share(node.target, "weight", index={0: TI.positions_of(ex.keys(L))})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = ChannelScale(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.scale(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def main() -> bool:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 16, 16)
    spec = {"input_shape": [2, 3, 16, 16], "expand": {"ratio": 1.5}}
    exp = gpdc.expand(model, spec)  # exact, but the teacher runs the scale at the student's width
    print(f"without a rule: 'scale' {exp.report()['student_width_ops']['scale']}; conv2 reads "
          f"{exp.teacher.conv2.in_channels} channels")
    gpdc.register_module_rule(ChannelScale, ChannelScaleRule())
    ok = True
    for strategy in ("replicate", "grow"):
        exp = gpdc.expand(model, spec | {"expand": {"ratio": 1.5, "strategy": strategy}})
        assert exp.report()["student_width_ops"] == {} and exp.teacher.conv2.in_channels == 24
        for name, c in check_expansion(exp, x).items():
            print(f"{strategy:9s} {name:13s} max error {c['error']:.2e} (bound {c['bound']:.2e}) "
                  + ("exact" if c["ok"] else "NOT EXACT"))
            ok &= c["ok"]
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
