"""Attention written inline (gpdc.rules.heads): a reshape splits channels into heads × head size, and
matmuls, softmax, scaling, per-head parameters and scaled_dot_product_attention follow the heads with no
per-class rule. Teacher heads copy student heads (METHOD.md §2), so the expansion is exact at any ratio.

The blocks are written in the styles of timm's transformers (fused qkv + unbind, separate projections +
SDPA, XCiT's cross-covariance attention over channels-first tensors, LeViT's per-head bias table,
einsum, q/k norms over the head size).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.exactness import check, randomize, reference, set_mode

CASES = [(2.0, "replicate"), (1.5, "grow"), (1.5, "replicate"), (3.0, "grow")]
DIM, HEADS, TOKENS = 16, 4, 6


class FusedQKV(nn.Module):
    """timm's Attention written out: fused qkv, reshape + permute + unbind, q/k norms, explicit softmax."""

    def __init__(self, qk_norm=False):
        super().__init__()
        self.heads, self.head_dim = HEADS, DIM // HEADS
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SeparateSDPA(nn.Module):
    """Separate q/k/v projections, view + transpose, F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.o = nn.Linear(DIM, DIM)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (lin(x).view(B, N, HEADS, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class CrossCovariance(nn.Module):
    """XCiT's XCA: channels-first heads (B, H, d, N), L2-normalised over tokens, a per-head temperature."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(HEADS, 1, 1) + 0.5)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 4, 1)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C))


class BiasTable(nn.Module):
    """LeViT: unequal key/value sizes split off one projection, a learned per-head bias over token pairs."""

    def __init__(self, key_dim=2, val_dim=4):
        super().__init__()
        self.kd, self.vd = key_dim, val_dim
        self.qkv = nn.Linear(DIM, HEADS * (2 * key_dim + val_dim))
        self.bias = nn.Parameter(torch.randn(HEADS, TOKENS * TOKENS))
        self.register_buffer("bias_idx", torch.randperm(TOKENS * TOKENS).view(TOKENS, TOKENS), persistent=False)
        self.proj = nn.Linear(HEADS * val_dim, DIM)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, HEADS, -1).split([self.kd, self.kd, self.vd], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = q @ k.transpose(-2, -1) * self.kd ** -0.5 + self.bias[:, self.bias_idx]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, HEADS * self.vd)
        return self.proj(x)


class Einsum(nn.Module):
    """Heads through einsum, with a per-head learned scale."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.head_scale = nn.Parameter(torch.rand(1, HEADS, 1, 1) + 0.5)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, HEADS, C // HEADS).unbind(2)
        attn = torch.einsum("bnhd,bmhd->bhnm", q, k) * self.head_scale
        return self.proj(torch.einsum("bhnm,bmhd->bnhd", attn.softmax(-1), v).reshape(B, N, C))


class Block(nn.Module):
    """A pre-norm transformer block around one of the attentions, classifier on the mean token."""

    def __init__(self, attn):
        super().__init__()
        self.embed = nn.Linear(5, DIM)
        self.norm1, self.attn = nn.LayerNorm(DIM), attn
        self.norm2, self.mlp = nn.LayerNorm(DIM), nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


ATTENTIONS = {"fused_qkv": FusedQKV, "fused_qkv_qk_norm": lambda: FusedQKV(qk_norm=True), "separate_sdpa": SeparateSDPA,
              "cross_covariance": CrossCovariance, "bias_table": BiasTable, "einsum": Einsum}


def expand_exact(model, ratio, strategy):
    torch.manual_seed(0)
    randomize(model.eval())
    x = torch.randn(2, TOKENS, 5)
    exp = gpdc.expand(model, {"input_shape": [2, TOKENS, 5], "expand": {"ratio": ratio, "strategy": strategy}})
    for train in (False, True):
        ref, own = reference(model, x, train)
        for cand in (exp.teacher, exp.student):
            result = check(set_mode(cand, train), ref, own, x)
            assert result.ok, f"r={ratio} {strategy} train={train}: {result}"
    return exp


@pytest.mark.parametrize("ratio,strategy", CASES)
@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_inline_attention_exact(name, ratio, strategy):
    exp = expand_exact(Block(ATTENTIONS[name]()), ratio, strategy)
    assert any("heads" in line for line in exp.log), "the head split was not followed"


def test_heads_widen_whole_and_keep_their_size():
    exp = expand_exact(Block(FusedQKV()), 1.5, "replicate")
    qkv = exp.teacher.attn.qkv
    assert qkv.out_features % (3 * (DIM // HEADS)) == 0 and qkv.out_features > 3 * DIM
    line = next(line for line in exp.log if "heads" in line)
    assert f"heads {HEADS}->" in line and f"of {DIM // HEADS}" in line


def test_fold_returns_the_original_architecture():
    model = Block(FusedQKV())
    exp = expand_exact(model, 2.0, "replicate")
    fresh = Block(FusedQKV())
    fresh.load_state_dict(dict(exp.fold_state_dict()), strict=True)
    x = torch.randn(2, TOKENS, 5)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), set_mode(exp.student, False)(x), rtol=1e-5, atol=1e-6)


class ChannelContraction(nn.Module):
    """EfficientViT-MSRA / SHViT style: channels-first q, k, v; token attention from a sum over channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q, self.k, self.v = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        q, k, v = self.q(x).flatten(2), self.k(x).flatten(2), self.v(x).flatten(2)
        attn = (q.transpose(-2, -1) @ k) * 0.3
        y = (v @ attn.softmax(-1).transpose(-2, -1)).view(B, C, H, W)
        return self.head((x + y).mean((2, 3)))


class TokenSDPA(nn.Module):
    """scaled_dot_product_attention on channels-last tokens without a head split."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.q, self.k, self.v = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        x = self.embed(x)
        return self.head((x + F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))).mean(1))


@pytest.mark.parametrize("ratio,strategy", CASES)
@pytest.mark.parametrize("model,shape", [(ChannelContraction, [2, 3, 6, 6]), (TokenSDPA, [2, TOKENS, 5])],
                         ids=["channel_contraction", "token_sdpa"])
def test_products_over_channels_count_each_channel_once(model, shape, ratio, strategy):
    torch.manual_seed(0)
    m = model()
    randomize(m.eval())
    x = torch.randn(*shape)
    exp = gpdc.expand(m, {"input_shape": shape, "expand": {"ratio": ratio, "strategy": strategy}})
    for train in (False, True):
        ref, own = reference(m, x, train)
        for cand in (exp.teacher, exp.student):
            result = check(set_mode(cand, train), ref, own, x)
            assert result.ok, f"r={ratio} {strategy} train={train}: {result}"
    assert any("counted once" in line or "student's scale" in line for line in exp.log)
