"""Multi-head attention: widen by adding heads (head size unchanged).

The attention modules of torch, torchvision and timm are kept as single nodes (leaf modules):
their forward reshapes the projected channels into ``num_heads × head_dim`` with sizes read from
the module's attributes or from the input width, so the teacher module is the same class with more
heads. Every module here ties its width to its heads (``C = heads · head_dim``), so the input's
channel group widens by whole heads (a quantum of ``head_dim``) and the teacher has
``C' / head_dim`` heads.

Teacher head h copies student head ``src[h]`` (a channel map over heads, METHOD.md §2): the q/k/v
rows of a copy are the student head's rows, so with replicated activations every copy computes
the student head's attention exactly; the output projection divides each head's columns by its
number of copies (replicate) or gives new heads zero columns (grow). Per-head parameters
(relative position bias tables, Swin-V2 logit scales and its bias MLP) are indexed by head.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..analyze import node_label
from ..errors import RuleError
from ..layout import Layout
from ..trace import register_leaf_module
from .producers import Dense, dense_bias, dense_weight
from .registry import Rule, register_module_rule


class _Heads:
    """The head channel map of one teacher attention module."""

    def __init__(self, ex, heads: int, teacher_heads: int, head_dim: int):
        from ..plan import ChannelMap  # noqa: PLC0415 (plan imports the analysis, which imports the rules)

        cmap = ChannelMap.build(heads, teacher_heads)
        self.heads, self.teacher_heads, self.d = heads, teacher_heads, head_dim
        self.src, self.copy = cmap.src, cmap.copy
        per_head = 1.0 / np.bincount(self.src)[self.src] if ex.strategy == "replicate" else (self.copy == 0) * 1.0
        self.fan = np.repeat(per_head, head_dim)  # fan-in scale of the heads' channels

    def rows(self, parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Student rows and copy numbers of a projection emitting ``parts`` blocks of heads (q, k, v)."""
        lane = np.arange(self.d)
        one = (self.src[:, None] * self.d + lane).reshape(-1)
        rows = np.concatenate([p * self.heads * self.d + one for p in range(parts)])
        return rows, np.tile(np.repeat(self.copy, self.d), parts)

    def student_rows(self, parts: int = 1) -> np.ndarray:
        """Teacher positions of the student's rows (the first copies come first in every part)."""
        n = self.heads * self.d
        return np.concatenate([p * self.teacher_heads * self.d + np.arange(n) for p in range(parts)])


def _into_heads(ex, w: torch.Tensor, b, name: tuple[str, str, str], heads: _Heads, TI, cols, in_pos, parts: int):
    """Teacher (weight, bias) of a projection from the widened input channels to ``parts`` blocks of
    heads; ``name`` = (module, weight name, bias name) for the ParamMap."""
    rows, copy = heads.rows(parts)
    weight = dense_weight(ex, w, rows, SimpleNamespace(width=len(rows), copy=copy), cols, ex.fanin_scale(TI))
    ex.share(name[0], name[1], index={0: heads.student_rows(parts), 1: in_pos}, scale={1: 1.0 / ex.fanin_scale(TI)[in_pos]})
    if b is None:
        return weight, None
    b = dense_bias(ex, b, rows, copy)
    ex.share(name[0], name[2], index={0: heads.student_rows(parts)})
    return weight, b


def _widen_into_heads(ex, lin: nn.Linear, name: str, heads: _Heads, TI, cols, in_pos, parts: int) -> nn.Linear:
    w, b = _into_heads(ex, lin.weight, lin.bias, (name, "weight", "bias"), heads, TI, cols, in_pos, parts)
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    return ex.clone(lin, params=params, in_features=TI.width, out_features=w.shape[0])


def _widen_from_heads(ex, lin: nn.Linear, name: str, heads: _Heads, TO, rows_student: np.ndarray) -> nn.Linear:
    """The output projection from the teacher heads to the output channels ``TO``: each head's
    columns divided by its copies (replicate) or zero for new heads (grow)."""
    fan = heads.fan
    weight = dense_weight(ex, lin.weight, TO.index, TO, heads.rows()[0], fan)
    params = {"weight": weight}
    if lin.bias is not None:
        params["bias"] = dense_bias(ex, lin.bias, TO.index, TO.copy)
    n = heads.heads * heads.d
    ex.share(name, "weight", index={0: rows_student, 1: np.arange(n)}, scale={1: 1.0 / fan[:n]})
    if lin.bias is not None:
        ex.share(name, "bias", index={0: rows_student})
    return ex.clone(lin, params=params, in_features=len(fan), out_features=TO.width)


class AttentionRule(Rule):
    """Base of the per-class attention rules: input channels in the last dim, output a new space
    of ``out_features(m)`` channels (the output projection), heads tied to the input width."""

    def head_dim(self, m) -> int:
        return m.head_dim

    def out_features(self, m) -> int:
        return m.proj.out_features

    def analyze(self, node: fx.Node, an):
        m = an.module(node)
        L = an.layout_of(node.args[0])
        nd = len(node.args[0].meta["gpdc.shape"])
        if not isinstance(L, Layout) or L.dim != nd - 1:
            raise RuleError(f"attention {node_label(node)} expects its widened channels in the last dim.")
        self.check(node, an)
        d = self.head_dim(m)
        if L.width % d:
            raise RuleError(f"attention {node_label(node)} has {L.width} input channels, not a whole number of heads of "
                            f"size {d}; its rule widens heads with the input channels.")
        an.set_quantum(L, d, node)
        cout = self.out_features(m)
        out = Layout.of_space(nd - 1, an.new_space(cout, node), cout)
        an.record(node, Dense(L, out))
        return self.output_layout(out)

    def check(self, node: fx.Node, an) -> None:
        pass

    def output_layout(self, out: Layout):
        return out

    def expand(self, node: fx.Node, ex) -> None:
        m = ex.an.module(node)
        facts = ex.facts(node)
        L, Lout = facts.inp, facts.out
        TI = ex.tin(node.args[0], L)
        d = self.head_dim(m)
        if TI.width % d:
            raise RuleError(f"attention {node_label(node)}: the teacher width {TI.width} of its input is not a "
                            f"multiple of the head size {d}; widen this channel group by whole heads.")
        heads = _Heads(ex, L.width // d, TI.width // d, d)
        TO = ex.canonical(Lout)
        new = self.widen(node, m, ex, heads, TI, TO, ex.student_pos(L, TI), TI.positions_of(ex.keys(L)),
                         TO.positions_of(ex.keys(Lout)))
        ex.emit_module(node, new, *[ex.arg(a) for a in node.args], layout=self.output_layout(TO), kwargs=ex.arg(node.kwargs))
        ex.log(node, f"attention: {heads.heads}->{heads.teacher_heads} heads of {d}, {L.width}->{TI.width} in, "
               f"{Lout.width}->{TO.width} out")

    def widen(self, node, m, ex, heads: _Heads, TI, TO, cols, in_pos, out_rows) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def per_head(ex, name: str, p: torch.Tensor, dim: int, heads: _Heads) -> torch.Tensor:
        ex.share(*name.rsplit(".", 1), index={dim: np.arange(heads.heads)})
        return p.detach().index_select(dim, torch.as_tensor(heads.src))


class TorchMultiheadAttentionRule(AttentionRule):
    """``nn.MultiheadAttention`` used as self-attention (query, key and value are one tensor)."""

    def out_features(self, m):
        return m.out_proj.out_features

    def output_layout(self, out):
        return (out, None)

    def check(self, node, an):
        m = an.module(node)
        qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs]
        if len({id(a) for a in qkv}) != 1 or not m._qkv_same_embed_dim or m.bias_k is not None:
            raise RuleError(f"nn.MultiheadAttention {node_label(node)}: gpdc widens self-attention only (query, key "
                            "and value the same tensor, no add_bias_kv).")
        for user in node.users:
            if user.target is operator.getitem and user.args[1] == 1 and user.users:
                raise RuleError(f"nn.MultiheadAttention {node_label(node)} returns head-averaged attention weights "
                                "that are used; call it with need_weights=False to widen it.")

    def widen(self, node, m, ex, heads, TI, TO, cols, in_pos, out_rows):
        name = node.target
        w, b = _into_heads(ex, m.in_proj_weight, m.in_proj_bias, (name, "in_proj_weight", "in_proj_bias"), heads,
                           TI, cols, in_pos, 3)
        params = {"in_proj_weight": w} if b is None else {"in_proj_weight": w, "in_proj_bias": b}
        new = ex.clone(m, params=params, embed_dim=TI.width, kdim=TI.width, vdim=TI.width, num_heads=heads.teacher_heads)
        new.out_proj = _widen_from_heads(ex, m.out_proj, f"{name}.out_proj", heads, TO, out_rows)
        return new


class TimmAttentionRule(AttentionRule):
    """timm's ``Attention`` (ViT, DeiT, ...): fused qkv, optional q/k norms over the head dim."""

    def check(self, node, an):
        m = an.module(node)
        if not isinstance(m.norm, nn.Identity) or getattr(m, "gate", None) is not None:
            raise RuleError(f"timm Attention {node_label(node)} with scale_norm or a gate is not supported.")

    def widen(self, node, m, ex, heads, TI, TO, cols, in_pos, out_rows):
        name = node.target
        new = ex.clone(m, num_heads=heads.teacher_heads, attn_dim=heads.teacher_heads * heads.d)
        new.qkv = _widen_into_heads(ex, m.qkv, f"{name}.qkv", heads, TI, cols, in_pos, 3)
        new.proj = _widen_from_heads(ex, m.proj, f"{name}.proj", heads, TO, out_rows)
        for sub in ("q_norm", "k_norm"):
            ex.share_unchanged(f"{name}.{sub}", getattr(m, sub))
        return new


class WindowAttentionRule(AttentionRule):
    """Swin window attention (torchvision V1/V2, timm) and MaxViT's relative-position attention:
    fused qkv, a relative position bias table with one column per head."""

    covers_own_forward = True  # torchvision's V2 subclasses V1: logit scale and a bias MLP, which this rule widens

    def __init__(self, qkv: str = "qkv", proj: str = "proj", heads_attr: str = "num_heads"):
        self.qkv, self.proj, self.heads_attr = qkv, proj, heads_attr

    def head_dim(self, m):
        return getattr(m, self.qkv).out_features // 3 // getattr(m, self.heads_attr)

    def out_features(self, m):
        return getattr(m, self.proj).out_features

    def widen(self, node, m, ex, heads, TI, TO, cols, in_pos, out_rows):
        name = node.target
        params = {k: self.per_head(ex, f"{name}.{k}", getattr(m, k), dim, heads)
                  for k, dim in (("relative_position_bias_table", 1), ("logit_scale", 0))  # logit_scale: Swin V2
                  if m._parameters.get(k) is not None}
        new = ex.clone(m, params=params, **{self.heads_attr: heads.teacher_heads})
        if hasattr(m, "attn_dim"):
            new.attn_dim = heads.teacher_heads * heads.d
        setattr(new, self.qkv, _widen_into_heads(ex, getattr(m, self.qkv), f"{name}.{self.qkv}", heads, TI, cols, in_pos, 3))
        setattr(new, self.proj, _widen_from_heads(ex, getattr(m, self.proj), f"{name}.{self.proj}", heads, TO, out_rows))
        if hasattr(m, "cpb_mlp"):  # Swin V2: the bias MLP's last layer emits one value per head
            last = m.cpb_mlp[-1]
            new.cpb_mlp[-1].weight = nn.Parameter(self.per_head(ex, f"{name}.cpb_mlp.{len(m.cpb_mlp) - 1}.weight",
                                                                last.weight, 0, heads))
            new.cpb_mlp[-1].out_features = heads.teacher_heads
            for i, layer in enumerate(m.cpb_mlp[:-1]):
                ex.share_unchanged(f"{name}.cpb_mlp.{i}", layer)
        return new


register_leaf_module(nn.MultiheadAttention)  # torchvision's and timm's attention modules: rules/integrations.py
register_module_rule(nn.MultiheadAttention, TorchMultiheadAttentionRule())
