"""mimland: masked image modeling with Vision Transformers, in one readable file.

MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377), RC-MAE (MAE plus an
EMA teacher: Lee et al., "Exploring the Role of Mean Teachers in Self-supervised Masked Auto-Encoders",
arXiv 2210.02077), SSAT (classification with MAE as an auxiliary task: Das et al., "Limited Data, Unlimited
Potential", arXiv 2310.20704), a supervised ViT and, as the contrastive baseline, MoCo v3 (Chen et al., "An
Empirical Study of Training Self-Supervised Vision Transformers", arXiv 2104.02057), with training,
evaluation, filter-normalized loss landscapes, Hessian curvature metrics and the papers' analyses. The file
reads top to bottom in two parts:

    THE IDEAS   config -> building blocks -> models -> the training step -> evaluation -> landscapes and curvature
    MACHINERY   checkpoints -> data -> the run loop -> plots -> CLI

Every fact marked "reference" is the official code's (facebookresearch/mae, youngwanLEE/rc-mae,
dominickrei/Limited-data-vits, facebookresearch/moco-v3, timm, tomgoldstein/loss-landscape); the tests check
the numerics against an independent re-implementation of it.
"""
from __future__ import annotations
import argparse
import contextlib
import copy
import ctypes
import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


class BadInput(ValueError):
    """Wrong input from the user: the CLI prints the message on one line and exits with status 2."""


# ==================================================================================================
# THE IDEAS: config -> building blocks -> models -> the training step -> evaluation -> landscapes
# ==================================================================================================


# ----------------------------------------------------------------------------------------------------
# config


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768            # encoder width
    depth: int = 12           # encoder blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000   # classifier head (sup, SSAT, fine-tuning)
    decoder_dim: int = 512    # MAE decoder (mae, rcmae, ssat)
    decoder_depth: int = 8
    decoder_heads: int = 16
    drop_path: float = 0.0    # stochastic depth, fine-tuning only (reference 0.1 for ViT-B)
    global_pool: bool = False  # classifier reads fc_norm(mean of patch tokens) instead of norm(x)[:, 0]
    proj_hidden: int = 4096   # MoCo v3 projector and predictor: hidden width, output width (reference 4096, 256)
    proj_dim: int = 256

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise BadInput(f"image size {self.img_size} is not divisible by patch size {self.patch_size}: "
                           f"pick --img-size as a multiple of the patch size")
        for width, heads, what in [(self.dim, self.heads, "encoder"),
                                   (self.decoder_dim, self.decoder_heads, "decoder")]:
            if width % heads:
                raise BadInput(f"{what} width {width} is not divisible by its {heads} heads")
            if width % 4:
                raise BadInput(f"{what} width {width} must be a multiple of 4 for the 2-D sin-cos embedding")

    @property
    def grid(self) -> int:  # patches per side
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


# Encoder sizes as the reference (ViT-T/S/B/L/H); decoders: 512/8/16 for B/L/H (MAE), RC-MAE's 256/4/8
# for ViT-S and 128/2/4 for ViT-T; SSAT's small-data presets: 32x32 inputs, patch 4, decoder 128/2/16.
# vit_digits and vit_fashion are mimland's own: the 8x8 scikit-learn digits at patch 2 (16 tokens) and the
# 28x28 Fashion-MNIST at patch 4 (49 tokens), small enough to train each method on a laptop CPU in
# minutes (digits) or a quarter of an hour (Fashion-MNIST); their MoCo heads are 512 wide (out 128), not 4096.
PRESETS = {
    "vit_tiny": dict(dim=192, depth=12, heads=3, decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "vit_small": dict(dim=384, depth=12, heads=6, decoder_dim=256, decoder_depth=4, decoder_heads=8),
    "vit_base": dict(dim=768, depth=12, heads=12),
    "vit_large": dict(dim=1024, depth=24, heads=16),
    "vit_huge": dict(patch_size=14, dim=1280, depth=32, heads=16),
    "ssat_tiny": dict(img_size=32, patch_size=4, dim=192, depth=12, heads=3, num_classes=10,
                      decoder_dim=128, decoder_depth=2, decoder_heads=16),
    "ssat_small": dict(img_size=32, patch_size=4, dim=384, depth=12, heads=6, num_classes=10,
                       decoder_dim=128, decoder_depth=2, decoder_heads=16),
    "vit_digits": dict(img_size=8, patch_size=2, in_chans=1, dim=64, depth=4, heads=4, num_classes=10,
                       decoder_dim=64, decoder_depth=2, decoder_heads=4, proj_hidden=512, proj_dim=128),
    "vit_fashion": dict(img_size=28, patch_size=4, in_chans=1, dim=64, depth=4, heads=4, num_classes=10,
                        decoder_dim=64, decoder_depth=2, decoder_heads=4, proj_hidden=512, proj_dim=128),
}


def preset(name: str, **overrides) -> ViTConfig:
    if name not in PRESETS:
        raise BadInput(f"unknown model preset {name!r}: choose from {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------
# building blocks


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C]: patches in row-major order, inside a patch (row, column, channel)."""
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W], the exact inverse of patchify for square images."""
    h = math.isqrt(x.shape[1])
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=p, q=p)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [(1 +) G*G, dim], equal to the reference's.

    The first dim/2 channels encode the column, the last dim/2 the row (the reference builds its grid with
    meshgrid(w, h)); each half is dim/4 sines then dim/4 cosines of pos * omega_k,
    omega_k = 1 / 10000**(k / (dim/4)). The cls slot is all zeros. Computed in float64 like the reference.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))      # [D/4]
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def embed_1d(pos):  # [G, G] -> [G*G, D/2]
        angles = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)                                # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of noise, as the reference.

    x: [N, L, D]; noise: [N, L] in [0, 1), drawn if None. The int(L * (1 - mask_ratio)) patches with the
    smallest noise are kept. Returns x_kept [N, L_keep, D], mask [N, L] (0 kept, 1 removed, original
    order) and ids_restore [N, L] (the inverse of the shuffle).
    """
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)          # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, repeat(ids_keep, "n l -> n l d", d=D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)          # back to the original patch order
    return x_kept, mask, ids_restore


class PatchEmbed(nn.Module):
    """Patches [N, L, C*p*p] -> tokens [N, L, D]: the reference's Conv2d with kernel = stride = patch (its
    checkpoint layout), run as the matmul it is on flattened patches, so the encoder can mask before it embeds."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def patches(self, imgs):
        """[N, C, H, W] -> [N, L, C*p*p], flattened in the conv weight's (c p1 p2) order."""
        p = self.proj.stride[0]
        return rearrange(imgs, "n c (h p1) (w p2) -> n (h w) (c p1 p2)", p1=p, p2=p)

    def forward(self, patches):
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention; qkv laid out as (3, heads, head_dim) like the reference, scale head_dim**-0.5,
    softmax(q k^T * scale) v as one fused kernel (F.scaled_dot_product_attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                               # [N, T, D]
        # views of the [N, T, 3D] output, no copies; in the backward one cat joins the three gradients
        q, k, v = (rearrange(t, "n t (h d) -> n h t d", h=self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        x = F.scaled_dot_product_attention(q, k, v)                                     # [N, h, T, d]
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()   # exact erf GELU, as the reference
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole samples with probability p."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def reference_init_(module: nn.Module) -> None:
    """MAE reference init: xavier_uniform for Linear weights, zero Linear biases; the patch conv's weight
    xavier_uniform as an (out, -1) matrix, its bias left at PyTorch's Conv2d default (the reference's
    `_init_weights` touches only Linear and LayerNorm); LayerNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def fixed_pos_embed(dim: int, grid: int) -> nn.Parameter:
    """The frozen sin-cos table as a [1, 1 + G*G, dim] parameter (a parameter so checkpoints carry it)."""
    return nn.Parameter(sincos_pos_embed_2d(dim, grid)[None], requires_grad=False)


# ----------------------------------------------------------------------------------------------------
# models: every method offers training_loss(batch) -> (loss, its logged parts), the encoder that is probed,
# and ema_update(m) (a no-op where there is no EMA network)


class Batch(NamedTuple):
    """A micro-batch: images [N, C, H, W] (MoCo: two views [2, N, C, H, W]), labels [N], mask noise [N, L] and
    the RC-MAE teacher's own mask noise (read only when its mask differs from the student's)."""
    imgs: torch.Tensor
    labels: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    teacher_noise: torch.Tensor | None = None


class ViT(nn.Module):
    """The ViT encoder every method shares, in the reference's parameter names:
    patch_embed.proj, cls_token, pos_embed (fixed sin-cos), blocks.{i}, norm."""
    loss_parts: tuple = ()

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = fixed_pos_embed(cfg.dim, cfg.grid)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()   # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        reference_init_(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_encoder(self, imgs, mask_ratio: float = 0.0, noise=None):
        """imgs [N, C, H, W] -> tokens [N, 1 + L_keep, D] after the final norm, mask, ids_restore (both None
        when mask_ratio is 0). The reference embeds the patches, adds positions, masks, prepends cls. Masking
        the raw patches and the positions first, with the same noise, gives the same tokens (the embedding
        acts per patch) for a quarter of the embedding's work and no scatter in its backward."""
        x = self.patch_embed.patches(imgs)                                           # [N, L, C*p*p]
        pos = self.pos_embed[:, 1:].expand(x.shape[0], -1, -1)                       # [N, L, D]
        mask = ids_restore = None
        if mask_ratio > 0:
            noise = torch.rand(x.shape[:2], device=x.device) if noise is None else noise
            x, mask, ids_restore = random_masking(x, mask_ratio, noise)              # [N, L_keep, C*p*p]
            pos = random_masking(pos, mask_ratio, noise)[0]                          # [N, L_keep, D]
        x = self.patch_embed(x) + pos                                                # [N, L_keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)   # [N, 1, D]
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def features(self, imgs):
        """[N, D]: the cls token after the final norm, the reference linear-probe feature."""
        return self.forward_encoder(imgs)[0][:, 0]

    @property
    def encoder(self) -> ViT:
        """The encoder that is probed, fine-tuned and analysed."""
        return self

    def ema_update(self, m: float) -> None:
        """No EMA network here: nothing to move."""


class SupervisedViT(ViT):
    """The same encoder with a classification head: cls token -> norm -> head (or, with
    cfg.global_pool, the mean patch token -> fc_norm -> head, the reference fine-tuning variant)."""

    loss_parts = ("ce",)

    def __init__(self, cfg: ViTConfig, label_smoothing: float = 0.0):
        super().__init__(cfg)
        self.label_smoothing = label_smoothing
        if cfg.global_pool:   # the reference drops `norm` and normalizes the pooled token instead
            self.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        reference_init_(self.head)

    def features(self, imgs):
        if not self.cfg.global_pool:
            return super().features(imgs)
        return self.fc_norm(self.forward_encoder(imgs)[0][:, 1:].mean(dim=1))

    def forward(self, imgs):                                                          # -> [N, classes]
        return self.head(self.features(imgs))

    def training_loss(self, batch: Batch, momentum=None):
        ce = F.cross_entropy(self(batch.imgs), batch.labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.detach()}


class MAE(ViT):
    """Masked autoencoder: the encoder sees the visible patches only; a light decoder fills in mask
    tokens and predicts the pixels of every patch; the loss is on the removed patches."""

    loss_parts = ("rec",)

    def __init__(self, cfg: ViTConfig, norm_pix_loss: bool = False, mask_ratio: float = 0.75):
        super().__init__(cfg)
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self.decoder_embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos_embed = fixed_pos_embed(cfg.decoder_dim, cfg.grid)
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.patch_size ** 2 * cfg.in_chans)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            reference_init_(m)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, x, ids_restore):
        """x [N, 1 + L_keep, D], ids_restore [N, L] -> pred [N, L, p*p*C] for every patch."""
        x = self.decoder_embed(x)                                                    # [N, 1+L_keep, Dd]
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)               # [N, L-L_keep, Dd]
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)                                # shuffled order
        x_ = torch.gather(x_, 1, repeat(ids_restore, "n l -> n l d", d=x.shape[2]))   # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed                 # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        # the reference drops the cls token after the head; both act per token, so drop it first
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))                         # [N, L, p*p*C]

    def target(self, imgs):
        """[N, L, p*p*C]: pixels per patch; with norm_pix_loss, normalized per patch:
        (t - mean) / sqrt(var + 1e-6), var unbiased (reference)."""
        t = patchify(imgs, self.cfg.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def forward_loss(self, imgs, pred, mask):
        """Per-patch MSE, averaged over the removed patches only."""
        loss = (pred - self.target(imgs)).pow(2).mean(dim=-1)                       # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)                             # [N, L, p*p*C]
        return self.forward_loss(imgs, pred, mask), pred, mask

    def training_loss(self, batch: Batch, momentum=None):
        loss = self(batch.imgs, self.mask_ratio, batch.noise)[0]
        return loss, {"rec": loss.detach()}


@torch.no_grad()
def ema_update_(target: list, source: list, m: float) -> None:
    """target = m * target + (1 - m) * source, tensor by tensor, as one fused foreach lerp."""
    torch._foreach_lerp_(target, source, 1.0 - m)


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """EMA momentum at a step. constant: `base` throughout (RC-MAE's teacher as its reference ran, 0.996; the
    reference builds a cosine but indexes it by the step within the epoch); cosine: from `base` to 1 over the
    run's global steps (MoCo v3's momentum encoder, 0.99)."""
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2


def teacher_lag(momenta: list) -> tuple:
    """An EMA applied with momenta m_1..m_T: (mean age of the teacher's weights in updates, the weight the
    initialization still holds). The teacher is prod(m) theta_0 + sum_t (1 - m_t) prod_(s > t) m_s theta_t."""
    age, weight, T = 0.0, 1.0, len(momenta)
    for t in range(T, 0, -1):                       # from the last update back: weight is prod_(s > t) m_s
        age += (1 - momenta[t - 1]) * weight * (T - t)
        weight *= momenta[t - 1]
    return age + weight * T, weight


class RCMAE(nn.Module):
    """RC-MAE = MAE + an EMA teacher (a full MAE, encoder and decoder) that sees the same image and, by default,
    the same mask (teacher_mask "same", the paper's RC-MAE-S; "different" is its -D ablation). Its prediction is
    a second target: loss = reconstruction + gamma * consistency, both on the removed patches. Checkpoints keep
    the reference layout: `model` (the student) and `teacher`."""
    loss_parts = ("rec", "cons")

    def __init__(self, cfg: ViTConfig, norm_pix_loss: bool = False, gamma: float = 1.0,
                 teacher_mask: str = "same", mask_ratio: float = 0.75):
        super().__init__()
        self.cfg, self.gamma, self.teacher_mask = cfg, gamma, teacher_mask
        self.student = MAE(cfg, norm_pix_loss, mask_ratio)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()   # starts equal

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()   # the teacher always runs in eval mode
        return self

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None, teacher_noise=None):
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.cfg.num_patches, device=imgs.device)
        if teacher_noise is None:
            teacher_noise = noise if self.teacher_mask == "same" else torch.rand_like(noise)
        rec, pred, mask = self.student(imgs, mask_ratio, noise)
        with torch.no_grad():
            _, t_pred, _ = self.teacher(imgs, mask_ratio, teacher_noise)
        cons = self.consistency(pred, t_pred, mask)
        loss = rec + self.gamma * cons
        return loss, pred, mask, {"rec": rec.detach(), "cons": cons.detach()}

    def training_loss(self, batch: Batch, momentum=None):
        t_noise = None if self.teacher_mask == "same" else batch.teacher_noise
        loss, _, _, parts = self(batch.imgs, self.student.mask_ratio, batch.noise, t_noise)
        return loss, parts

    @staticmethod
    def consistency(pred, t_pred, mask) -> torch.Tensor:
        """Per-patch MSE between student and teacher predictions, averaged over the student's removed patches."""
        cons = (pred - t_pred).pow(2).mean(dim=-1)                                   # [N, L]
        return (cons * mask).sum() / mask.sum()

    def ema_update(self, m: float) -> None:
        """teacher = m * teacher + (1 - m) * student, after every micro-batch (reference)."""
        ema_update_(list(self.teacher.parameters()), list(self.student.parameters()), m)

    @property
    def encoder(self) -> ViT:
        return self.teacher   # probing and fine-tuning start from the teacher (reference)

    def features(self, imgs):
        return self.teacher.features(imgs)


class SSAT(MAE):
    """SSAT: classification with MAE as an auxiliary task. One encoder, run twice with shared weights:
    on the full image (cls token after the final norm -> head -> cross-entropy) and on the visible
    patches (-> decoder -> pixel MSE on removed patches). loss = lam * CE + (1 - lam) * rec (reference)."""

    loss_parts = ("ce", "rec")

    def __init__(self, cfg: ViTConfig, lam: float = 0.1, norm_pix_loss: bool = False,
                 label_smoothing: float = 0.0, mask_ratio: float = 0.75):
        super().__init__(cfg, norm_pix_loss, mask_ratio)
        self.lam, self.label_smoothing = lam, label_smoothing
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        reference_init_(self.head)

    def logits(self, imgs):
        """Test time: the full image, the cls head."""
        return self.head(self.features(imgs))

    def forward(self, imgs, labels, mask_ratio: float = 0.75, noise=None):
        rec, pred, mask = super().forward(imgs, mask_ratio, noise)                  # masked pass
        ce = F.cross_entropy(self.logits(imgs), labels, label_smoothing=self.label_smoothing)  # full pass
        loss = self.lam * ce + (1 - self.lam) * rec
        return loss, pred, mask, {"ce": ce.detach(), "rec": rec.detach()}

    def training_loss(self, batch: Batch, momentum=None):
        loss, _, _, parts = self(batch.imgs, batch.labels, self.mask_ratio, batch.noise)
        return loss, parts


def across_processes(training: bool) -> bool:
    """Whether a batch-coupled computation (negatives, batch statistics) must see every process's rows."""
    dist = torch.distributed
    return training and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the global batch: under torchrun, every process's rows (the
    reference converts to SyncBatchNorm, which needs a GPU; this does the same on any device)."""

    def forward(self, x):                                                             # [n, D]
        if not across_processes(self.training):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce                       # a sum with a backward
        D = x.shape[1]
        s = all_reduce(torch.cat([x.sum(0), x.pow(2).sum(0), x.new_tensor([len(x)])]))
        n, mean = s[-1], s[:D] / s[-1]
        var = s[D:2 * D] / n - mean ** 2                                             # biased, as BatchNorm divides
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)                  # unbiased, as BatchNorm keeps
            self.num_batches_tracked += 1
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight + self.bias if self.affine else x


def moco_mlp(layers: int, d_in: int, hidden: int, d_out: int, last_bn: bool) -> nn.Sequential:
    """The reference's MLP: (Linear without bias -> BatchNorm -> ReLU) per hidden layer, then a Linear without
    bias and, with last_bn, a BatchNorm without affine parameters (as SimCLR). PyTorch's default Linear init,
    as the reference."""
    mods = []
    for i in range(layers):
        a, b = d_in if i == 0 else hidden, d_out if i == layers - 1 else hidden
        mods.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            mods += [GlobalBatchNorm(b), nn.ReLU()]
        elif last_bn:
            mods.append(GlobalBatchNorm(b, affine=False))
    return nn.Sequential(*mods)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, tau: float = 0.2, first: int = 0) -> torch.Tensor:
    """MoCo v3's InfoNCE: queries q [n, d] against keys k [m, d] on L2-normalized rows; the positive of q[i] is
    k[first + i], every other key a negative: 2 tau * cross_entropy(q k^T / tau) (the 2 tau as the reference)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / tau                                                            # [n, m]
    return 2 * tau * F.cross_entropy(logits, torch.arange(first, first + len(q), device=q.device))


class MoCo(ViT):
    """MoCo v3 (Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", arXiv
    2104.02057), the contrastive (non-MIM) baseline. Two augmented views of each image; the online branch
    (this encoder's cls feature -> projector -> predictor) must pick out, among the batch's keys, the momentum
    branch's key (an EMA copy of encoder + projector) of the other view of the same image. The encoder's
    tensors are named as a plain ViT's, so probing, fine-tuning and the analyses read it like any other run."""

    loss_parts = ("ctr",)

    def __init__(self, cfg: ViTConfig, tau: float = 0.2, random_patch_projection: bool = False):
        super().__init__(cfg)
        self.tau = tau
        self.projector = moco_mlp(3, cfg.dim, cfg.proj_hidden, cfg.proj_dim, last_bn=True)
        self.predictor = moco_mlp(2, cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, last_bn=False)
        if random_patch_projection:   # the reference's option: the patch embedding stays at its random init
            self.patch_embed.requires_grad_(False)
        self.momentum_encoder = ViT(cfg).requires_grad_(False)        # starts equal to the online branch
        self.momentum_encoder.load_state_dict({k: v for k, v in self.state_dict().items()
                                               if k in self.momentum_encoder.state_dict()})
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, views):
        """views [2, N, C, H, W], two augmentations of the same images -> ctr(q1, k2) + ctr(q2, k1). In training
        under torchrun the keys of every process are negatives (the reference's concat_all_gather)."""
        q1, q2 = (self.predictor(self.projector(self.features(x))) for x in views)            # [N, d] each
        with torch.no_grad():                                                              # no gradient here
            k1, k2 = (self.momentum_projector(self.momentum_encoder.features(x)) for x in views)
        first = 0
        if across_processes(self.training):
            from torch.distributed.nn.functional import all_gather
            first = torch.distributed.get_rank() * len(k1)                                 # my keys' offset
            k1, k2 = (torch.cat(all_gather(k.contiguous())) for k in (k1, k2))             # [W*N, d] each
        return contrastive_loss(q1, k2, self.tau, first) + contrastive_loss(q2, k1, self.tau, first)

    def training_loss(self, batch: Batch, momentum=None):
        if momentum is not None:       # in training, the reference moves the momentum branch first
            self.update_momentum(momentum)
        loss = self(batch.imgs)
        return loss, {"ctr": loss.detach()}

    def update_momentum(self, m: float) -> None:
        """momentum branch = m * itself + (1 - m) * (encoder, projector), before each step's forward (reference)."""
        own = dict(self.named_parameters())
        pairs = [(p, own[online + n]) for branch, online in (("momentum_encoder", ""),
                                                             ("momentum_projector", "projector."))
                 for n, p in getattr(self, branch).named_parameters()]
        ema_update_([t for t, _ in pairs], [s for _, s in pairs], m)


MODELS = {"sup": SupervisedViT, "mae": MAE, "rcmae": RCMAE, "ssat": SSAT, "moco": MoCo}
METHODS = tuple(MODELS)
MIM_METHODS = ("mae", "rcmae", "ssat")   # the masked image models: a pixel decoder and masks
EMA_METHODS = ("rcmae", "moco")          # an EMA network, moved with a momentum every step


def build_model(method: str, cfg: ViTConfig, **kw) -> nn.Module:
    """The model of a method; kw are the method's own hyperparameters (MAE mask_ratio, RCMAE gamma, ...)."""
    if method not in MODELS:
        raise BadInput(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    return MODELS[method](cfg, **kw)


# ----------------------------------------------------------------------------------------------------
# the training step: hyperparameters, schedule, one optimizer step of any method


# Hyperparameters in one place. "quick" is mimland's default, sized so that every method trains on the
# embedded digits in a couple of minutes on a 2-core CPU; "reference" is the paper recipe (MAE and RC-MAE:
# ImageNet-1K pre-training at total batch 4096; SSAT: the small-data recipe; sup: DeiT's from-scratch
# recipe). `--recipe reference` starts from the latter; any flag given on the command line wins.
RECIPES = {
    "quick": {   # digits are centred and chiral: no flips, and crops that only jitter aspect and position
        "mae": dict(epochs=100, batch_size=128, blr=1.5e-3, warmup_epochs=5, mask_ratio=0.75, min_crop_scale=1.0,
                    hflip=False),
        "rcmae": dict(epochs=100, batch_size=128, blr=1.5e-3, warmup_epochs=5, mask_ratio=0.75, min_crop_scale=1.0,
                      hflip=False),
        "ssat": dict(epochs=100, batch_size=128, blr=1e-3, warmup_epochs=5, mask_ratio=0.75, min_crop_scale=1.0,
                     hflip=False),
        "sup": dict(epochs=100, batch_size=128, blr=1e-3, warmup_epochs=5, min_crop_scale=1.0, hflip=False),
        # two views need real crops (scale 0.5-1) and, in two_views, brightness and contrast jitter; 80 epochs:
        # each step runs the encoder 6 times (3 minutes on 2 cores)
        "moco": dict(epochs=80, batch_size=128, blr=1.5e-3, warmup_epochs=5, weight_decay=0.1, ema_momentum=0.99,
                     ema_schedule="cosine",
                     min_crop_scale=0.5, hflip=False),
        "finetune": dict(epochs=50, batch_size=128, blr=1e-3, warmup_epochs=5, layer_decay=0.75, drop_path=0.1,
                         min_crop_scale=1.0, hflip=False),
        # the reference probe's effective lr (0.1 * 16384 / 256 = 6.4) at batch 256, for enough epochs on small
        # data sets, never past the reference's 7020 LARS steps (LARS at this lr never settles: docs/GUIDE.md)
        "probe": dict(epochs=300, blr=6.4, batch_size=256, max_steps=7020),
        # Fashion-MNIST, 60,000 images of 28x28: 4 epochs of 256 (936 steps) in under 15 minutes on 2 CPU cores
        # for each method; clothes are mirror-symmetric: flips on
        "fashion-mnist": dict(epochs=4, batch_size=256, warmup_epochs=1, eval_every=2, hflip=True),
    },
    "reference": {   # random resized crop (scale 0.2-1) and horizontal flip
        "mae": dict(epochs=800, batch_size=4096, blr=1.5e-4, warmup_epochs=40, mask_ratio=0.75, norm_pix_loss=True),
        "rcmae": dict(epochs=800, batch_size=4096, blr=1.5e-4, warmup_epochs=40, mask_ratio=0.75,
                      norm_pix_loss=True),
        "ssat": dict(epochs=100, batch_size=256, blr=1e-3, warmup_epochs=5, mask_ratio=0.75, min_lr=1e-6),
        "sup": dict(epochs=300, batch_size=1024, blr=2.5e-4, warmup_epochs=5, min_lr=1e-5),
        "moco": dict(epochs=300, batch_size=4096, blr=1.5e-4, warmup_epochs=40, weight_decay=0.1, ema_momentum=0.99,
                     ema_schedule="cosine",
                     min_crop_scale=0.08),   # MoCo v3, ViT-B; BYOL's augmentations (two_views keeps their grey part)
        "finetune": dict(epochs=100, batch_size=1024, blr=5e-4, warmup_epochs=5, min_lr=1e-6, layer_decay=0.65,
                         drop_path=0.1),
        "probe": dict(epochs=90, blr=0.1, batch_size=16384),   # LARS, 10 warm-up epochs, no weight decay
    },
}


DEFAULTS = dict(weight_decay=0.05, min_lr=0.0, norm_pix_loss=False, gamma=1.0, ema_momentum=0.996,
              ema_schedule="constant", teacher_mask="same", lam=0.1, smoothing=0.1, tau=0.2, random_patch_projection=False,
              min_crop_scale=0.2, hflip=True, accum_iter=1, clip_grad=None,
              precision="auto", ckpt_every=500, final_eval=True, mask_ratio=None)


FINETUNE_NO_DECAY = ("cls_token", "pos_embed")   # timm's ViT.no_weight_decay(), as the reference fine-tuning


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None, depth: int = 0,
                 no_decay: tuple = ()):
    """AdamW groups: no weight decay for 1-D parameters, biases and the names in no_decay (fine-tuning:
    FINETUNE_NO_DECAY; in pre-training the cls and mask tokens do get it, as the reference). With layer_decay
    (fine-tuning), block i gets lr scale layer_decay**(depth - i), the embeddings layer_decay**(depth + 1)
    and the head 1 (the reference's layer-wise lr decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim == 1 or name.endswith(".bias") or name in no_decay else weight_decay
        layer = depth + 1
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [dict(params=ps, weight_decay=d, lr_scale=s) for (d, s), ps in groups.items()]


def peak_lr(blr: float, batch: int) -> float:
    """The reference's linear scaling rule: lr = blr * batch / 256."""
    return blr * batch / 256


def lr_at(epoch: float, lr: float, min_lr: float, warmup: float, epochs: float) -> float:
    """Linear warm-up, then half-cycle cosine to min_lr, at a fractional epoch (set every step)."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1e-8)))


def step_generator(seed: int, step: int, stream: str, device="cpu") -> torch.Generator:
    """A generator for one (seed, step, stream): every random draw of a step (crops, masks, data order)
    depends on these alone, so a run is the same whatever the number of processes and resumes exactly."""
    h = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") >> 1)


def train_step(raw, opt, micro_batches, lr: float, momentum: float | None = None, *, loss_fn=None, accum: int = 1,
               clip_grad: float | None = None, ddp=None, scaler=None, autocast=None, stop: bool = False) -> list:
    """One optimizer step over `accum` micro-batches -> ([loss, *raw.loss_parts] as global means, any stop)."""
    loss_fn, scaler, sums = loss_fn or raw.training_loss, scaler or torch.amp.GradScaler(enabled=False), 0
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]                                         # the schedule, set every step
    for i, batch in enumerate(micro_batches):
        last = i == accum - 1                                                 # DDP all-reduces on the last only
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast or contextlib.nullcontext():
                loss, parts = loss_fn(batch, momentum)                        # MoCo moves its momentum branch first
            scaler.scale(loss / accum).backward()                             # gradients add up over micro-batches
        sums = sums + torch.stack([loss.detach().float(), *(p.float() for p in parts.values())]) / accum
        if not last:
            raw.ema_update(momentum)                                          # RC-MAE's teacher: every micro-batch
    *vals, stops = all_reduce_mean(torch.cat([sums, sums.new_tensor([float(stop)])]), ddp)   # one host sync
    if math.isfinite(vals[0]):                                                # else no update: the weights stay good
        if clip_grad:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), clip_grad)
        scaler.step(opt)                                                      # AdamW (through the fp16 scaler)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        raw.ema_update(momentum)                                              # and after the step
    return vals, stops > 0                                                    # a stop asked by any process


def all_reduce_mean(values: torch.Tensor, ddp) -> list:
    """The mean over processes of each value (one process: the values), read back to the host."""
    if ddp is not None:
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values.tolist()


class TrainingLoss(nn.Module):
    """A model's training_loss as a module's forward, so DDP and torch.compile wrap it as they wrap a model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, momentum=None):
        return self.model.training_loss(batch, momentum)


def flops_per_image(cfg: ViTConfig, method: str, mask_ratio: float = 0.75, train: bool = True) -> float:
    """Analytic matmul FLOPs (2 per multiply-accumulate) for one image. A block of width d on T tokens costs
    T * (12 d^2 + 2 T d) MACs (qkv, projection, MLP with ratio 4, attention scores and mixing). Training
    counts 3x the forward of what gets gradients (forward + backward) and 1x the RC-MAE teacher and MoCo's
    momentum branch; MoCo runs every network on two views."""
    def blocks(T, d, depth):
        hidden = int(d * cfg.mlp_ratio)
        return depth * T * (4 * d * d + 2 * d * hidden + 2 * T * d)
    L, C, p = cfg.num_patches, cfg.in_chans, cfg.patch_size
    embed = cfg.dim * C * p * p                                      # per embedded patch
    full = L * embed + blocks(L + 1, cfg.dim, cfg.depth)
    keep = int(L * (1 - mask_ratio))                                 # masked before the embedding
    masked = (keep * embed + blocks(keep + 1, cfg.dim, cfg.depth) + (keep + 1) * cfg.dim * cfg.decoder_dim
              + blocks(L + 1, cfg.decoder_dim, cfg.decoder_depth) + L * cfg.decoder_dim * p * p * C)
    head = cfg.dim * cfg.num_classes
    h, o = cfg.proj_hidden, cfg.proj_dim
    projector, predictor = cfg.dim * h + h * h + h * o, o * h + h * o
    fwd = {"sup": full + head, "mae": masked, "rcmae": masked, "ssat": masked + full + head,
           "moco": 2 * (full + projector + predictor)}[method]
    fixed = {"rcmae": masked, "moco": 2 * (full + projector)}.get(method, 0)     # the EMA networks, forward only
    return 2.0 * (3 * fwd + fixed) if train else 2.0 * fwd


# ----------------------------------------------------------------------------------------------------
# views: what each method sees of a uint8 image batch (augmentation on tensors, on the device)


@dataclass
class Data:
    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    chans: int
    mean: tuple          # per-channel mean and std of the [0, 1] training pixels, for normalization
    std: tuple
    eval_crop: float = 1.0   # centre-crop fraction at evaluation (folder: 224/256, as the reference)


def sample_crops(n: int, H: int, W: int, gen: torch.Generator, min_scale: float = 0.2, hflip: bool = True,
                 ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes plus a horizontal-flip coin for n images, torchvision's algorithm vectorized:
    up to 10 tries of area ~ U[min_scale, 1] * H*W and log-uniform aspect ratio, else the centre crop.
    Returns [n, 5] float: top, left, height, width, flip. Training draws them for the whole global batch
    from the step's generator, so an image's crop does not depend on how the batch is split."""
    dev = gen.device
    area = H * W * (min_scale + (1 - min_scale) * torch.rand(n, tries, generator=gen, device=dev))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        n, tries, generator=gen, device=dev)
    w = (area * logr.exp()).sqrt().round()
    h = (area / logr.exp()).sqrt().round()
    ok = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = ok.float().argmax(dim=1, keepdim=True)                              # first valid try
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)
    r = W / H                                                                   # fallback: centre crop
    fw, fh = (W, round(W / ratio[0])) if r < ratio[0] else (round(H * ratio[1]), H) if r > ratio[1] else (W, H)
    w, h = torch.where(ok, w, float(fw)), torch.where(ok, h, float(fh))
    u = torch.rand(n, 3, generator=gen, device=dev)
    top = torch.where(ok, (u[:, 0] * (H - h + 1)).floor(), (H - h) // 2)
    left = torch.where(ok, (u[:, 1] * (W - w + 1)).floor(), (W - w) // 2)
    return torch.stack([top, left, h, w, ((u[:, 2] < 0.5) & hflip).float()], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image [N, C, H, W] to its box (top, left, h, w, flip) and resize it to size x size with
    bicubic interpolation, batched with one affine grid (runs wherever x lives)."""
    N, C, H, W = x.shape
    top, left, h, w, flip = boxes.to(x.dtype).unbind(1)
    sx = torch.where(flip > 0, -w / W, w / W)              # output [-1, 1] -> crop box, mirrored if flip
    theta = torch.zeros(N, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [N, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)


def channel_stats(data: Data, device) -> tuple:
    """The data set's per-channel mean and std as [1, C, 1, 1] tensors."""
    return tuple(rearrange(torch.tensor(v, device=device), "c -> 1 c 1 1") for v in (data.mean, data.std))


def normalize(x: torch.Tensor, data: Data) -> torch.Tensor:
    mean, std = channel_stats(data, x.device)
    return (x - mean) / std


def train_view(u8: torch.Tensor, boxes: torch.Tensor, data: Data, size: int) -> torch.Tensor:
    """Pre-training augmentation as the reference (random resized crop, scale 0.2-1, and flip), on tensors."""
    return normalize(resized_crop(u8.float() / 255, boxes, size), data)


def view_draws(n: int, side: int, gen_of, a: dict) -> tuple:
    """MoCo's random draws for n images: crop boxes [2, n, 5] and jitter coins [2, n, 3], one set per view,
    from the generators gen_of(stream)."""
    boxes = torch.stack([sample_crops(n, side, side, gen_of(f"crop-{v}"), a["min_crop_scale"], a["hflip"])
                         for v in (1, 2)])
    return boxes, torch.rand(2, n, 3, generator=gen_of("jitter"), device=boxes.device)


def two_views(u8: torch.Tensor, boxes: torch.Tensor, jitter: torch.Tensor, data: Data, size: int) -> torch.Tensor:
    """[2, n, C, size, size]: MoCo's two views of the same images. Each: a random resized crop (and flip), then
    with probability 0.8 brightness and contrast factors drawn in [0.6, 1.4] (BYOL's colour jitter, 0.4, as it
    acts on grey images; its saturation, hue, grey-scaling, blur and solarization are left out: the data sets
    mimland trains MoCo on are grey, and an 8x8 digit blurred loses its strokes)."""
    x, out = u8.float() / 255, []
    for box, j in zip(boxes, jitter):
        v = resized_crop(x, box, size)
        on, bright, contrast = (rearrange(t, "n -> n 1 1 1") for t in (j[:, 0] < 0.8, 0.6 + 0.8 * j[:, 1],
                                                                        0.6 + 0.8 * j[:, 2]))
        w = (v * bright).clamp(0, 1)
        mean = w.mean(dim=(1, 2, 3), keepdim=True)                                  # contrast about the mean
        out.append(normalize(torch.where(on, ((w - mean) * contrast + mean).clamp(0, 1), v), data))
    return torch.stack(out)


def fixed_views(u8: torch.Tensor, gen_of, a: dict, data: Data, size: int) -> torch.Tensor:
    """MoCo's two views of a batch drawn from fixed generators (evaluation, landscapes)."""
    return two_views(u8, *view_draws(len(u8), u8.shape[-1], gen_of, a), data, size)


def eval_view(u8: torch.Tensor, data: Data, size: int) -> torch.Tensor:
    """No augmentation: the centre crop (data.eval_crop of the side) resized to size x size."""
    x = u8.float() / 255
    H = x.shape[-1]
    c = round(H * data.eval_crop)
    if c != H:
        x = x[..., (H - c) // 2:(H - c) // 2 + c, (H - c) // 2:(H - c) // 2 + c]
    if c != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=c > size, align_corners=False).clamp_(0, 1)
    return normalize(x, data)


def eval_batches(dataset, batch: int, workers: int = 0):
    """(u8 images, labels) of a split in order, without augmentation."""
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(len(dataset))), batch, False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_identity)


def loader_workers(dataset, workers: int | None = None) -> int:
    """DataLoader workers: as given, else the data set's own (FolderImages decode JPEGs: 8), else 0."""
    return workers if workers is not None else getattr(dataset, "workers", 0)


def _identity(batch):
    return batch


# ----------------------------------------------------------------------------------------------------
# evaluation: per-epoch test metrics, the linear probe and k-NN on frozen features


@torch.no_grad()
def extract_features(features_fn, dataset, data: Data, size: int, device, autocast=None, batch: int = 256,
                     desc: str = "features"):
    """Frozen features [N, D] (float32, CPU) and labels [N] of a whole split, batch by batch (a progress bar
    from 10,000 images)."""
    from tqdm import tqdm
    # written into one tensor (small per-batch copies would fragment the heap that keep_freed_memory keeps)
    feats, labels, start = None, torch.empty(len(dataset), dtype=torch.long), 0
    for u8, y in tqdm(eval_batches(dataset, batch, loader_workers(dataset)), desc=desc, unit="batch", leave=False,
                      disable=len(dataset) < 10_000, dynamic_ncols=True):
        with autocast or contextlib.nullcontext():
            f = features_fn(eval_view(u8.to(device), data, size))                       # [b, D]
        feats = torch.empty(len(dataset), f.shape[1]) if feats is None else feats          # float32, CPU
        feats[start:start + len(y)], labels[start:start + len(y)] = f, y
        start += len(y)
        del f                  # a view of the batch's whole [b, T, D] output: freed before the next batch runs
    return feats, labels


def frozen_features(features_fn, data: Data, size: int, device, autocast=None) -> tuple:
    """(train features, train labels, test features, test labels): what k-NN and the linear probe read."""
    return (*extract_features(features_fn, data.train, data, size, device, autocast, desc="train features"),
            *extract_features(features_fn, data.test, data, size, device, autocast, desc="test features"))


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes: int, k: int = 20, T: float = 0.07) -> float:
    """Weighted k-NN on cosine similarity (k = 20, votes exp(sim / 0.07), as DINO's protocol)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for start in range(0, len(test_f), 512):
        sim, idx = (test_f[start:start + 512] @ train_f.T).topk(k, dim=1)             # [c, k]
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (sim / T).exp())
        correct += (votes.argmax(1) == test_y[start:start + 512]).sum().item()
    return correct / len(test_f)


class LARS(torch.optim.Optimizer):
    """LARS, as the reference linear probe: SGD with momentum 0.9 where each matrix's update g + wd * w is
    rescaled by trust_coefficient * ||w|| / ||g + wd * w||; 1-D parameters are not rescaled."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = p.norm(), dp.norm()
                    dp = dp * torch.where((pn > 0) & (un > 0), g["trust_coefficient"] * pn / un, 1.0)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def probe_head(dim: int, num_classes: int) -> nn.Module:
    """BatchNorm1d(affine=False, eps 1e-6) then Linear (trunc-normal std 0.01), as the reference probe."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int, epochs: int = 300, blr: float = 6.4,
                 batch: int = 256, warmup: int = 10, seed: int = 0, max_steps: int | None = None):
    """Train the probe head on frozen features with LARS, no weight decay, 10 warm-up epochs then cosine;
    lr = blr * batch / 256 (batch capped at the data size); epochs cut to the fewest whose steps reach
    max_steps; -> (test accuracy, head). Defaults: the quick recipe; the reference's is epochs 90, blr 0.1,
    batch 16384 (RECIPES)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = probe_head(train_f.shape[1], num_classes)
    batch = min(batch, len(train_f))
    lr, steps_per_epoch = peak_lr(blr, batch), len(train_f) // batch
    epochs = min(epochs, math.ceil(max_steps / steps_per_epoch)) if max_steps else epochs
    opt = LARS(head.parameters(), lr=lr)
    head.train()
    from tqdm import trange
    for epoch in trange(epochs, desc="linear probe", unit="epoch", leave=False, disable=epochs * steps_per_epoch < 20_000,
                        dynamic_ncols=True):
        perm = torch.randperm(len(train_f), generator=g)
        for k in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + k / steps_per_epoch, lr, 0.0, warmup, epochs)
            idx = perm[k * batch:(k + 1) * batch]
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        acc = (head(test_f).argmax(1) == test_y).float().mean().item()
    return acc, head


@torch.no_grad()
def evaluate(model, method: str, data: Data, cfg: ViTConfig, device, a: dict, autocast=None, knn: bool = True) -> dict:
    """Test-set metrics without augmentation and with fixed masks (MoCo: fixed views): the method's loss (and
    parts), the head's accuracy (sup, SSAT) and k-NN accuracy of the features."""
    with eval_mode(model):
        totals, n, correct = {}, 0, 0
        for b, (u8, y) in enumerate(eval_batches(data.test, 256, loader_workers(data.test))):
            imgs, y = eval_view(u8.to(device), data, cfg.img_size), y.to(device)
            g = lambda stream: step_generator(a["seed"], b, stream, device)                  # noqa: E731
            noise = torch.rand(len(y), cfg.num_patches, generator=g("eval-mask"), device=device)
            t_noise = torch.rand(len(y), cfg.num_patches, generator=g("eval-teacher-mask"), device=device)
            inputs = fixed_views(u8.to(device), lambda s: g("eval-" + s), a, data, cfg.img_size) \
                if method == "moco" else imgs                                               # MoCo: fixed views
            with autocast or contextlib.nullcontext():
                loss, parts = model.training_loss(Batch(inputs, y, noise, t_noise))
                if hasattr(model, "head"):                                                  # a classifier
                    correct += (model.head(model.features(imgs)).argmax(1) == y).sum().item()
            for k, v in {"loss": loss, **parts}.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(y)
            n += len(y)
        out = {f"test_{k}": v / n for k, v in totals.items()}
        if hasattr(model, "head"):
            out["test_acc"] = correct / n
        if knn:
            out["knn_acc"] = knn_accuracy(*frozen_features(model.features, data, cfg.img_size, device, autocast),
                                          data.num_classes)
    return out


def final_evaluation(model, method, data, cfg, device, a, autocast=None) -> tuple:
    """(everything a finished run reports, the probe head): test metrics, k-NN and linear-probe accuracy of the
    frozen features of model.encoder (RC-MAE: the teacher; its student is probed too)."""
    out = evaluate(model, method, data, cfg, device, a, autocast, knn=False)
    model.eval()
    feats = frozen_features(model.features, data, cfg.img_size, device, autocast)
    out["knn_acc"] = knn_accuracy(*feats, data.num_classes)
    probe = RECIPES[a.get("recipe") or "quick"]["probe"]
    settings = dict(epochs=probe["epochs"], blr=probe["blr"], batch=probe["batch_size"], max_steps=probe.get("max_steps"))
    out["probe_acc"], head = linear_probe(*feats, data.num_classes, **settings)
    if hasattr(model, "student"):   # RC-MAE's student too, beside the teacher the reference probes
        feats = frozen_features(model.student.features, data, cfg.img_size, device, autocast)
        out["student_knn_acc"] = knn_accuracy(*feats, data.num_classes)
        out["student_probe_acc"] = linear_probe(*feats, data.num_classes, **settings)[0]
    return out, head


# ----------------------------------------------------------------------------------------------------
# loss landscapes (Li et al. 2018) and curvature


def trainable(model: nn.Module) -> dict:
    """The parameters a landscape perturbs: those that require grad (so never the sin-cos tables, nor an
    RC-MAE teacher, which the pre-training loss holds fixed)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None,
                                ignore: str = "biasbn") -> dict:
    """A Gaussian direction over the trainable parameters, filter-normalized: each dim-0 slice (output
    filter / neuron row) of every tensor with dim >= 2 rescaled to the norm of the same slice of the
    weights (eps 1e-10). 1-D tensors (biases, LayerNorm): zero ("biasbn") or equal to the weights ("copy").
    Drawn on the CPU from `generator`, so a seed gives the same direction on any device."""
    out = {}
    for name, w in trainable(model).items():
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w)
        scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)            # [out]
        out[name] = d * scale.view(-1, *[1] * (w.dim() - 1))
    return out


ENCODER_PARTS = ("patch_embed", "cls_token", "blocks", "norm", "fc_norm")   # a ViT's encoder, by name


def mean_over_chunks(loss_of_rows, n: int, chunk: int):
    """loss_fn(m) = the mean over n samples of loss_of_rows(m, i, j), chunk by chunk: memory stays bounded
    under vmap, and each sample weighs the same."""
    return lambda m: sum(loss_of_rows(m, i, min(i + chunk, n)) * (min(i + chunk, n) - i)
                         for i in range(0, n, chunk)) / n


def pretraining_loss(model: nn.Module, batch: Batch, chunk: int = 256) -> tuple:
    """(network, loss_fn, the parameters it perturbs): the method's own loss at fixed masks (MoCo: two fixed
    views, the other images of a chunk its negatives), over every trainable parameter: RC-MAE's teacher and
    MoCo's momentum branch are held fixed."""
    def rows(m, i, j):
        views = batch.imgs.dim() == 5                                         # MoCo: [2, N, C, H, W]
        x = batch.imgs[:, i:j] if views else batch.imgs[i:j]
        return m.training_loss(Batch(x, batch.labels[i:j], batch.noise[i:j], batch.teacher_noise[i:j]))[0]
    return model, mean_over_chunks(rows, len(batch.labels), chunk), trainable(model)


def classification_loss(model: nn.Module, imgs, labels, chunk: int = 256) -> tuple:
    """(network, loss_fn, parameters): the cross-entropy of a classifier's head (sup, SSAT) on full images, over
    the encoder and the head (SSAT's decoder plays no part; the sin-cos table is fixed)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(ENCODER_PARTS + ("head",)) and "pos_embed" not in n)
    rows = lambda m, i, j: F.cross_entropy(m.head(m.features(imgs[i:j])), labels[i:j])       # noqa: E731
    return model, mean_over_chunks(rows, len(labels), chunk), trainable(model)


class ProbeNet(nn.Module):
    """A frozen-feature encoder and its linear-probe head as one network, for the probe's landscape."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, imgs):
        return self.head(self.encoder.features(imgs))


def probe_loss(encoder: nn.Module, head: nn.Module, imgs, labels, chunk: int = 256) -> tuple:
    """(network, loss_fn, parameters): the cross-entropy of a linear probe on the encoder's features, over the
    encoder and the head together."""
    net = ProbeNet(encoder, head)
    for n, p in net.named_parameters():
        p.requires_grad_((n.startswith("head.") or n.removeprefix("encoder.").startswith(ENCODER_PARTS))
                         and "pos_embed" not in n)
    rows = lambda m, i, j: F.cross_entropy(m(imgs[i:j]), labels[i:j])                         # noqa: E731
    return net, mean_over_chunks(rows, len(labels), chunk), trainable(net)


@torch.no_grad()
def landscape_loop(model: nn.Module, loss_fn, xs, ys, directions: list) -> torch.Tensor:
    """L(theta + x d1 + y d2) on the grid xs x ys, one point at a time: the definition, as the reference loops
    (GridEvaluator below computes the same, faster)."""
    theta = {n: p.clone() for n, p in trainable(model).items()}
    params, surface = dict(model.named_parameters()), torch.empty(len(xs), len(ys))
    with eval_mode(model):
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                for n in theta:
                    params[n].copy_(theta[n] + x * directions[0][n] + y * directions[1][n])
                surface[i, j] = loss_fn(model)
    for n in theta:                                                           # back to the weights
        params[n].copy_(theta[n])
    return surface


class _LossOf(nn.Module):
    """loss_fn(model) as a module, so torch.func.functional_call can swap the model's parameters for any
    code loss_fn runs (several forwards, the encoder alone, ...)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self):
        return self.loss_fn(self.model)


class GridEvaluator:
    """landscape_loop's numbers, fast: loss_fn at origin + coords[i] @ directions for each row of coords [P, K]
    -> [P], in eval mode. batch_points points a call through torch.func (functional_call + vmap: every layer a
    batched matmul), or one at a time; None times both on the first points and keeps the faster. compiled: the
    vmapped call through torch.compile, the last call padded so one graph serves a surface. A call's parameters
    are one matmul, [1, c] @ [theta; d_1; ...], into a reused buffer."""

    def __init__(self, model: nn.Module, loss_fn, directions: list, origin: dict | None = None,
                 batch_points: int | None = None, compiled: bool = False):
        self.model, self.compiled = model, compiled
        self.batch_points = batch_points or (8 if compiled else None)
        origin = origin if origin is not None else trainable(model)
        self.shapes = {n: w.shape for n, w in origin.items()}

        self.basis = torch.stack([torch.cat([t[n].flatten() for n in origin]) for t in (origin, *directions)])  # [1+K, N]
        self.buffer = self.basis.new_empty(self.batch_points or 8, self.basis.shape[1])    # [k, N]
        wrapper = _LossOf(model, loss_fn)

        def call(params):
            return torch.func.functional_call(wrapper, params, ())
        self.one = call
        self.vmapped = torch.compile(torch.func.vmap(call)) if compiled else torch.func.vmap(call)

    def params_at(self, c: torch.Tensor) -> dict:
        """c [p, K] -> {name: [p, *shape]}, views into the reused buffer (valid until the next call)."""
        flat = torch.mm(torch.cat([c.new_ones(len(c), 1), c], dim=1).to(self.basis), self.basis,
                        out=self.buffer[:len(c)])                                           # [p, N]
        parts = flat.split([s.numel() for s in self.shapes.values()], dim=1)
        return {"model." + n: part.view(len(c), *s) for (n, s), part in zip(self.shapes.items(), parts)}

    def run(self, c: torch.Tensor, k: int) -> torch.Tensor:
        """The losses of the points c [p, K], p <= k, in one call of path k (1: one point alone)."""
        if k == 1 and not self.compiled:
            return self.one({n: v[0] for n, v in self.params_at(c).items()}).float().cpu()[None]
        n = len(c)
        if self.compiled and n < k:                                      # one shape for the compiled graph
            c = torch.cat([c, c.new_zeros(k - n, c.shape[1])])
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):   # vmap-able
            return self.vmapped(self.params_at(c)).float().cpu()[:n]

    def choose(self, coords: torch.Tensor, out: torch.Tensor, k: int = 8) -> int:
        """batch_points=None: one point alone and k vmapped as warm-ups, then k points each way timed;
        the faster path is kept. Every value lands in out. -> the points done (0 on a call too small to tell)."""
        if len(coords) < 3 * k + 1:
            return 0
        out[0] = self.run(coords[:1], 1)[0]
        out[1:k + 1] = self.run(coords[1:k + 1], k)
        t0 = time.perf_counter()
        for i in range(k + 1, 2 * k + 1):
            out[i] = self.run(coords[i:i + 1], 1)[0]
        t1 = time.perf_counter()
        out[2 * k + 1:3 * k + 1] = self.run(coords[2 * k + 1:3 * k + 1], k)
        self.batch_points = 1 if t1 - t0 < time.perf_counter() - t1 else k
        return 3 * k + 1

    @torch.no_grad()
    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(coords))
        with eval_mode(self.model):
            start = self.choose(coords, out) if self.batch_points is None else 0
            k = self.batch_points or 1                   # undecided after a small call: one at a time
            for i in range(start, len(coords), k):
                out[i:i + k] = self.run(coords[i:i + k], k)
        return out


def evaluate_points(model: nn.Module, loss_fn, coords: torch.Tensor, directions: list, origin: dict | None = None,
                    batch_points: int | None = None, compiled: bool = False) -> torch.Tensor:
    """loss_fn at origin + coords @ directions, one value per row of coords [P, K] -> [P] (GridEvaluator;
    by default it picks the faster evaluation itself)."""
    return GridEvaluator(model, loss_fn, directions, origin, batch_points, compiled)(coords)


def grid_coords(xs: torch.Tensor, ys: torch.Tensor | None = None) -> torch.Tensor:
    """[len(xs) * len(ys), 2] points in indexing='ij' order (the reference's 'xy' order is only
    consistent for square grids), or [len(xs), 1] in 1-D."""
    if ys is None:
        return xs[:, None]
    return torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 2)


def landscape_1d(model, loss_fn, xs, direction=None, generator=None, **kw) -> torch.Tensor:
    """L(theta + x d) for x in xs -> [len(xs)]; d filter-normalized unless given."""
    d = direction if direction is not None else filter_normalized_direction(model, generator)
    return evaluate_points(model, loss_fn, grid_coords(xs), [d], **kw)


def landscape_2d(model, loss_fn, xs, ys, directions=None, generator=None, **kw) -> torch.Tensor:
    """L(theta + x d1 + y d2) on the grid xs x ys -> [len(xs), len(ys)] (indexing 'ij')."""
    ds = directions if directions is not None else [filter_normalized_direction(model, generator) for _ in range(2)]
    return evaluate_points(model, loss_fn, grid_coords(xs, ys), ds, **kw).view(len(xs), len(ys))


def interpolate(model, loss_fn, theta_a: dict, theta_b: dict, ts, **kw) -> torch.Tensor:
    """L(theta_a + t (theta_b - theta_a)) for t in ts (e.g. init -> trained, MAE -> RC-MAE), evaluated
    with `model`'s structure -> [len(ts)]."""
    d = {n: theta_b[n] - theta_a[n] for n in theta_a}
    return evaluate_points(model, loss_fn, grid_coords(ts), [d], origin=theta_a, **kw)


class Hessian:
    """The Hessian of loss_fn at the model's trainable parameters, as a linear operator on flat vectors.
    Hessian-vector products by forward-over-reverse differentiation: torch.func.jvp of torch.func.grad.
    progress: a progress bar (tqdm) that each product advances."""

    def __init__(self, model: nn.Module, loss_fn, progress=None):
        model.eval()
        self.progress = progress
        self.theta = trainable(model)
        self.shapes = {n: w.shape for n, w in self.theta.items()}
        self.dim = sum(w.numel() for w in self.theta.values())
        self.device, self.dtype = next(iter(self.theta.values())).device, next(iter(self.theta.values())).dtype
        wrapper = _LossOf(model, loss_fn)
        self._grad = torch.func.grad(lambda p: torch.func.functional_call(
            wrapper, {"model." + n: w for n, w in p.items()}, ()))

    def unflatten(self, v: torch.Tensor) -> dict:
        parts = torch.split(v.to(self.device, self.dtype), [math.prod(s) for s in self.shapes.values()])
        return {n: x.view(s) for (n, s), x in zip(self.shapes.items(), parts)}

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat v [dim] -> float64 on the CPU."""
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):   # twice differentiable
            _, hv = torch.func.jvp(self._grad, (self.theta,), (self.unflatten(v),))
        if self.progress is not None:
            self.progress.update()
        return torch.cat([hv[n].flatten() for n in self.shapes]).double().cpu()


def _orthogonalize(v: torch.Tensor, basis: list) -> torch.Tensor:
    for u in basis:
        v = v - (v @ u) * u
    return v


def top_eigenvalues(H, k: int = 1, iters: int = 100, tol: float = 1e-3, generator=None):
    """The k eigenvalues of largest magnitude by power iteration with deflation (each vector kept
    orthogonal to those found before), stopping at relative change < tol (PyHessian's 1e-3, 100 iterations).
    -> (values [k] float64, vectors list of [dim])."""
    vals, vecs = [], []
    for _ in range(k):
        v = _orthogonalize(torch.randn(H.dim, generator=generator, dtype=torch.float64), vecs)
        v, lam = v / v.norm(), None
        for _ in range(iters):
            hv = _orthogonalize(H.mv(v), vecs)
            new = (v @ hv).item()
            v = hv / (hv.norm() + 1e-30)
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam = new
                break
            lam = new
        vals.append(lam)
        vecs.append(v)
    return torch.tensor(vals, dtype=torch.float64), vecs


def extreme_eigenvalues(H, steps: int = 64, generator=None) -> dict:
    """lambda_max and lambda_min, the extreme Ritz values of a Lanczos run (the extremes converge first),
    and Li et al.'s convexity measure |lambda_min / lambda_max| (near 0: locally convex; large: strongly
    non-convex). Power iteration on H - lambda_max I would stall here: the bottom of a network's spectrum
    clusters near zero, far below lambda_max."""
    a, b = lanczos(H, steps, generator)
    ritz = torch.linalg.eigvalsh(torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1))
    lam_min, lam_max = ritz[0].item(), ritz[-1].item()
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio_min_max": abs(lam_min / lam_max)}


def hutchinson_trace(H, samples: int = 100, generator=None) -> tuple:
    """Tr(H) = E[v^T H v] over Rademacher v -> (estimate, standard error)."""
    est = []
    for _ in range(samples):
        v = torch.randint(0, 2, (H.dim,), generator=generator, dtype=torch.float64) * 2 - 1
        est.append((v @ H.mv(v)).item())
    est = torch.tensor(est, dtype=torch.float64)
    return est.mean().item(), (est.std() / math.sqrt(samples)).item() if samples > 1 else float("nan")


def lanczos(H, steps: int, generator=None) -> tuple:
    """Lanczos tridiagonalization from a random unit vector, with full reorthogonalization
    -> (alpha [m], beta [m-1]) with m <= steps."""
    v = torch.randn(H.dim, generator=generator, dtype=torch.float64)
    basis, alpha, beta = [v / v.norm()], [], []
    for j in range(min(steps, H.dim)):
        w = H.mv(basis[-1])
        alpha.append((w @ basis[-1]).item())
        w = _orthogonalize(_orthogonalize(w, basis), basis)                   # twice is enough
        b = w.norm().item()
        if j == min(steps, H.dim) - 1 or b < 1e-10 * max(1.0, abs(alpha[-1])):
            break
        beta.append(b)
        basis.append(w / b)
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)


def slq_density(H, steps: int = 64, runs: int = 4, generator=None, bins: int = 200, sigma: float | None = None) -> dict:
    """Eigenvalue density by stochastic Lanczos quadrature: each run's tridiagonal matrix gives nodes (its
    eigenvalues) and weights (squared first components), averaged over runs; the density is smoothed with
    a Gaussian kernel. negative_share is the weight of negative nodes (the share of negative eigenvalues,
    the SSAT paper's "fewer negative eigenvalues"); negative_mass weighs them by |lambda|."""
    nodes, weights = [], []
    for _ in range(runs):
        a, b = lanczos(H, steps, generator)
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        evals, evecs = torch.linalg.eigh(T)
        nodes.append(evals)
        weights.append(evecs[0] ** 2 / runs)
    nodes, weights = torch.cat(nodes), torch.cat(weights)
    lo, hi = nodes.min().item(), nodes.max().item()
    sigma = sigma or max(hi - lo, 1e-12) / 100
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, bins, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (weights[None] * kernel).sum(1)                                                       # [bins]
    neg = nodes < 0
    return {"nodes": nodes, "weights": weights, "grid": grid, "density": density,
            "negative_share": weights[neg].sum().item(),
            "negative_mass": (weights[neg] * nodes[neg].abs()).sum().item() / max((weights * nodes.abs()).sum().item(), 1e-30)}


def _centre(coords: torch.Tensor) -> int:
    return int(coords.abs().argmin())


def basin_width(surface: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor | None = None, rise: float = 0.1) -> float:
    """Diameter of the largest disc (interval in 1-D) around the centre on which the loss stays within
    `rise` (in loss units) of the centre loss, in units of the (filter-normalized) directions; an absolute
    rise stays meaningful where the centre loss is 0 (a probe that fits its training set)."""
    if ys is None:
        i0 = _centre(xs)
        ok = surface <= surface[i0] + rise
        left = right = i0
        while left > 0 and ok[left - 1]:
            left -= 1
        while right < len(xs) - 1 and ok[right + 1]:
            right += 1
        return (xs[right] - xs[left]).item()
    return _disc_diameter(xs, ys, surface <= surface[_centre(xs), _centre(ys)] + rise)


def _disc_diameter(xs: torch.Tensor, ys: torch.Tensor, inside: torch.Tensor) -> float:
    """Diameter of the largest disc around the grid's centre whose every grid point is `inside`."""
    i0, j0 = _centre(xs), _centre(ys)
    r = torch.sqrt((xs[:, None] - xs[i0]) ** 2 + (ys[None, :] - ys[j0]) ** 2)
    reach = min(xs[-1] - xs[i0], xs[i0] - xs[0], ys[-1] - ys[j0], ys[j0] - ys[0]).item()
    first_out = r[~inside].min().item() if (~inside).any() else float("inf")
    return 2 * min(r[r < first_out].max().item(), reach) if first_out > 0 else 0.0


def convex_points(surface: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[len(xs) - 2, len(ys) - 2]: whether the finite-difference 2x2 Hessian of the surface is positive
    definite (locally convex) at each interior grid point."""
    hx, hy = (xs[1] - xs[0]).item(), (ys[1] - ys[0]).item()
    f = surface.double()
    fxx = (f[2:, 1:-1] - 2 * f[1:-1, 1:-1] + f[:-2, 1:-1]) / hx ** 2
    fyy = (f[1:-1, 2:] - 2 * f[1:-1, 1:-1] + f[1:-1, :-2]) / hy ** 2
    fxy = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / (4 * hx * hy)
    return (fxx > 0) & (fxx * fyy - fxy ** 2 > 0)


def convex_share(surface: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> float:
    """Share of the interior grid points that are locally convex."""
    return convex_points(surface, xs, ys).double().mean().item()


def convex_width(surface: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> float:
    """Width of the convex region around the minimum: the diameter of the largest disc around the centre
    on which the surface is locally convex everywhere, in units of the directions (scale-free, so surfaces
    of different losses compare)."""
    return _disc_diameter(xs[1:-1], ys[1:-1], convex_points(surface, xs, ys))


def surface_metrics(surface: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor | None = None) -> dict:
    """Flatness numbers of a surface: centre loss, basin widths for a rise of 0.1 and 1.0 (loss units),
    convex share and convex width (2-D)."""
    centre = surface[_centre(xs)] if ys is None else surface[_centre(xs), _centre(ys)]
    out = {"centre_loss": centre.item(), "basin_width_0.1": basin_width(surface, xs, ys, 0.1),
           "basin_width_1.0": basin_width(surface, xs, ys, 1.0)}
    if ys is not None:
        out.update(convex_share=convex_share(surface, xs, ys), convex_width=convex_width(surface, xs, ys))
    return out


# ----------------------------------------------------------------------------------------------------
# analyses: what the papers measure inside the encoder


@torch.no_grad()
def encoder_trace(model: nn.Module, imgs: torch.Tensor) -> tuple:
    """The encoder on full, unmasked images in eval mode -> (each block's attention weights [N, heads, T, T],
    each block's output [N, T, D]), token 0 the cls token. The weights are recomputed from the block's own
    input, softmax(q k^T * head_dim**-0.5), which SDPA does not return."""
    enc, maps, outs = model.encoder, [], []

    def weights(attn, inputs, _):
        q, k, _ = (rearrange(t, "n t (h d) -> n h t d", h=attn.heads) for t in attn.qkv(inputs[0]).chunk(3, dim=-1))
        maps.append((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))
    hooks = [b.attn.register_forward_hook(weights) for b in enc.blocks] + \
            [b.register_forward_hook(lambda block, inputs, out: outs.append(out)) for b in enc.blocks]
    try:
        with eval_mode(enc):
            enc.forward_encoder(imgs)
    finally:
        for h in hooks:
            h.remove()
    return maps, outs


def patch_distances(grid: int, patch: int) -> torch.Tensor:
    """[L, L]: the distance in pixels between the centres of every two patches (row-major, as patchify)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch
    return torch.cdist(centres, centres).float()


def patch_attention(maps: list) -> list:
    """Each [N, h, T, T] map's patch queries over patch keys, the cls key dropped and each row renormalized."""
    return [a[:, :, 1:, 1:] / a[:, :, 1:, 1:].sum(dim=-1, keepdim=True) for a in maps]


def attention_distance(model: nn.Module, imgs: torch.Tensor, trace: tuple | None = None) -> torch.Tensor:
    """Mean attention distance in pixels, [depth, heads] (Dosovitskiy et al. 2021, Fig. 7; `trace`: an
    encoder_trace(model, imgs) already computed, which every analysis here can share): for each patch
    query, sum over patch keys of its attention weight times the distance between the two patches' centres;
    averaged over queries and images."""
    maps, _ = trace or encoder_trace(model, imgs)
    cfg = model.encoder.cfg
    d = patch_distances(cfg.grid, cfg.patch_size).to(imgs.device)                   # [L, L]
    return torch.stack([(w * d).sum(dim=-1).mean(dim=(0, 2)) for w in patch_attention(maps)])


def attention_entropy(model: nn.Module, imgs: torch.Tensor, trace: tuple | None = None) -> torch.Tensor:
    """Entropy in nats of the same renormalized rows, [depth, heads], averaged over queries and images
    (SSAT's "smoother attention": higher entropy); 0 log 0 = 0."""
    maps, _ = trace or encoder_trace(model, imgs)
    return torch.stack([-torch.xlogy(w, w).sum(dim=-1).mean(dim=(0, 2)) for w in patch_attention(maps)])


def feature_variance(model: nn.Module, imgs: torch.Tensor, trace: tuple | None = None) -> torch.Tensor:
    """[depth]: the variance of each block's output feature map of patch tokens [T, D], over all its entries
    (population variance), per image, averaged over images (Park and Kim 2022, "How do vision transformers
    work?"; SSAT's "higher feature variance")."""
    _, outs = trace or encoder_trace(model, imgs)
    return torch.stack([o[:, 1:].flatten(1).var(dim=1, correction=0).mean() for o in outs])


def rcmae_gradients(model: RCMAE, imgs, noise, teacher_noise=None, mask_ratio: float = 0.75) -> tuple:
    """(gradient of the reconstruction loss, gradient of the consistency loss), each flat over the student's
    parameters, in eval mode; the teacher masks with teacher_noise (default: the student's noise)."""
    params = [p for p in model.student.parameters() if p.requires_grad]
    with torch.enable_grad():
        rec, pred, mask = model.student(imgs, mask_ratio, noise)
        with torch.no_grad():
            t_pred = model.teacher(imgs, mask_ratio, noise if teacher_noise is None else teacher_noise)[1]
        grads = [torch.autograd.grad(loss, params, retain_graph=True)
                 for loss in (rec, RCMAE.consistency(pred, t_pred, mask))]
    return tuple(torch.cat([g.flatten() for g in gs]) for gs in grads)


def gradient_correction(model: RCMAE, x_prev, noise_prev, probes: dict, lr: float = 1e-3,
                        mask_ratio: float = 0.75) -> dict:
    """RC-MAE's Proposition 4.1 in a deep ViT. On a copy of the model whose teacher is set to its student,
    one SGD step of the student on X_prev's reconstruction loss (the update u); then for each probe batch
    X_now (name -> (imgs, noise)), the consistency gradient g there: the correction is the descent -g. The
    proposition predicts it opposes u (cosine < 0), most for inputs like X_prev, not at all for unrelated
    ones. -> {name: {correction_cosine: cos(-g, u), correction_norm: |g| / |u|, input_similarity: the
    cosine between the two batches' pixels}}."""
    m = copy.deepcopy(model).eval()
    m.teacher.load_state_dict(m.student.state_dict())                      # the teacher at theta_(t-1)
    update = -lr * rcmae_gradients(m, x_prev, noise_prev, mask_ratio=mask_ratio)[0]
    params = [p for p in m.student.parameters() if p.requires_grad]
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + update, params)
    out = {}
    for name, (x, noise) in probes.items():
        g = rcmae_gradients(m, x, noise, mask_ratio=mask_ratio)[1]
        out[name] = {"correction_cosine": F.cosine_similarity(-g, update, dim=0).item(),
                     "correction_norm": (g.norm() / update.norm()).item(),
                     "input_similarity": F.cosine_similarity(x.flatten(), x_prev.flatten(), dim=0).item()}
    return out


def mask_gradient_angles(model: RCMAE, imgs, noise, teacher_noise, mask_ratio: float = 0.75) -> dict:
    """The cosine between the reconstruction and the consistency gradient when the teacher sees the
    student's mask (RC-MAE-S) and another mask (RC-MAE-D): the paper argues the first is nearer orthogonal."""
    out = {}
    for name, t_noise in (("same_mask", None), ("different_mask", teacher_noise)):
        g_rec, g_cons = rcmae_gradients(model, imgs, noise, t_noise, mask_ratio)
        out[name] = F.cosine_similarity(g_rec, g_cons, dim=0).item()
    return out


# ==================================================================================================
# MACHINERY: checkpoints, data, the run loop, plots, CLI. Nothing below changes what a method computes.
# ==================================================================================================


# ----------------------------------------------------------------------------------------------------
# checkpoints: safe loading, and the official MAE / RC-MAE / timm layouts


def checkpoint_path(run: str) -> str:
    """A run directory or a checkpoint file -> the checkpoint file."""
    return os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run


def run_directory(run: str) -> str:
    """A run directory or a checkpoint file -> the run directory (probe.pt, landscapes, hessian-*.json)."""
    return os.path.dirname(os.path.abspath(checkpoint_path(run)))


def read_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, so a checkpoint carrying
    pickled code is refused instead of run. argparse.Namespace (the reference saves its args) is allowed."""
    if not os.path.isfile(path):
        raise BadInput(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused globals, truncated zip, not a torch file, ...
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise BadInput(f"{path} holds pickled code ({found.group(1)}) that weights-only loading refuses; "
                           f"mimland never runs code from a checkpoint") from None
        raise BadInput(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another format)") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _pick(ckpt: dict, keys: tuple) -> dict | None:
    for k in keys:
        if _is_state_dict(ckpt.get(k)):
            return ckpt[k]
    return None


def _strip(sd: dict) -> dict:
    """Drop the DistributedDataParallel ('module.') and torch.compile ('_orig_mod.') key prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def checkpoint_state(model: nn.Module, ckpt: dict) -> dict:
    """The state dict inside a checkpoint container, in `model`'s key space.

    Understood: a bare state dict (timm), {'model': ...} (MAE, mimland), the RC-MAE layouts
    {'model' | 'student' | 'student_without_ddp', 'teacher' | 'teacher_without_ddp'}, {'state_dict': ...}.
    An RCMAE takes the student and the teacher; any other model takes the teacher when there is one
    (RC-MAE fine-tunes and probes the teacher), else the model."""
    if _is_state_dict(ckpt):
        return _strip(ckpt)
    students = ("model", "student_without_ddp", "student", "state_dict")
    teachers = ("teacher_without_ddp", "teacher")
    if isinstance(model, RCMAE):
        out = {}
        for prefix, keys in (("student.", students), ("teacher.", teachers)):
            sd = _pick(ckpt, keys)
            out.update({prefix + k: v for k, v in _strip(sd or {}).items()})
        return out
    sd = _pick(ckpt, teachers + students)
    if sd is None:
        raise BadInput(f"the checkpoint holds no state dict (its keys: {', '.join(map(str, ckpt))})")
    return _strip(sd)


def load_pretrained(model: nn.Module, path_or_state_dict, strict: bool = True, verbose: bool = True) -> dict:
    """Load an official MAE / RC-MAE / timm / mimland checkpoint (a path or an already loaded dict).

    Keys equal in name and shape are loaded. The rest (missing, unexpected, mis-shaped) are reported in
    one message: strict=True raises it as BadInput and loads nothing; strict=False loads the matching keys,
    prints the message (verbose) and returns the report {'missing', 'unexpected', 'mismatched'}."""
    src = path_or_state_dict
    ckpt = read_checkpoint(src) if isinstance(src, (str, os.PathLike)) else src
    state = checkpoint_state(model, ckpt)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                  for k in own if k in state and state[k].shape != own[k].shape]
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if missing or unexpected or mismatched:
        def few(names):
            return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        parts = [f"missing {few(missing)}" if missing else "",
                 f"unexpected {few(unexpected)}" if unexpected else "",
                 "mis-shaped " + few([f"{k} (checkpoint {list(a)}, model {list(b)})" for k, a, b in mismatched])
                 if mismatched else ""]
        msg = (f"checkpoint does not fit {type(model).__name__} (img {model.cfg.img_size}, patch "
               f"{model.cfg.patch_size}, dim {model.cfg.dim}, depth {model.cfg.depth}): "
               + "; ".join(p for p in parts if p))
        if strict:
            raise BadInput(msg)
        if verbose:
            print(f"load_pretrained: loaded {len(own) - len(missing) - len(mismatched)}/{len(own)} tensors; {msg}")
    bad = {k for k, _, _ in mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in bad}, strict=False)
    return report


def init_from_pretrained(model: nn.Module, src) -> None:
    """Fine-tuning start: a pre-trained encoder (mimland run or official MAE / RC-MAE / timm checkpoint;
    RC-MAE's teacher). Every encoder tensor must load; the head is new, trunc-normal std 2e-5 (reference)."""
    ckpt = read_checkpoint(src)
    if ckpt.get("format") == CKPT_FORMAT and ckpt["method"] == "rcmae":
        ckpt = {"model": ckpt["teacher"]}
    report = load_pretrained(model, ckpt, strict=False, verbose=False)
    new = ("head.", "fc_norm.")
    bad = [k for k in report["missing"] if not k.startswith(new)] + \
          [k for k, _, _ in report["mismatched"] if not k.startswith(new)]
    if bad:
        raise BadInput(f"{src} does not hold this encoder: {', '.join(bad[:4])} ... missing or mis-shaped; "
                       f"pick the --model preset it was trained with")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    if int(os.environ.get("RANK", 0)) == 0:
        unused = report["unexpected"]
        print(f"mimland finetune: loaded the encoder ({len(model.state_dict()) - len(report['missing'])} tensors) of "
              f"{src}; the classifier ({', '.join(sorted({k.split('.')[0] for k in report['missing']}))}) is new, as "
              f"fine-tuning expects" + (f"; it does not use the checkpoint's {', '.join(sorted({k.split('.')[0].split('_')[0] for k in unused}))} "
                                        f"({len(unused)} tensors)" if unused else ""), flush=True)


# ----------------------------------------------------------------------------------------------------
# data: uint8 images in memory (or decoded from folders by DataLoader workers), augmented on the device


class TensorImages(torch.utils.data.Dataset):
    """A split held in memory: uint8 images [N, C, H, W] and int64 labels [N]. __getitems__ hands the
    DataLoader a whole batch at once, with no per-sample collation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.side = images.shape[-1]

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels[idx]


class FolderImages(torch.utils.data.Dataset):
    """A class-per-folder split decoded with Pillow: the shorter side resized to `size` (bicubic), then a
    centre crop to size x size, as uint8 [C, size, size]."""

    workers = min(8, os.cpu_count())   # DataLoader workers that decode

    def __init__(self, files: list, labels: list, size: int):
        self.files, self.labels, self.side = files, torch.tensor(labels), size

    def __len__(self):
        return len(self.files)

    def decode(self, path):
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                s, n = self.side / min(im.size), self.side
                im = im.resize((max(n, round(im.width * s)), max(n, round(im.height * s))), Image.BICUBIC)
                left, top = (im.width - n) // 2, (im.height - n) // 2
                im = im.crop((left, top, left + n, top + n))
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                return rearrange(pixels, "(h w c) -> c h w", h=n, w=n)
        except OSError as e:
            raise BadInput(f"cannot decode image {path} ({e})") from None

    def __getitems__(self, idx):
        return torch.stack([self.decode(self.files[i]) for i in idx]), self.labels[torch.as_tensor(idx)]


def _stats(images: torch.Tensor):
    x = rearrange(images.float() / 255, "n c h w -> c (n h w)")
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def _in_memory(name, tr_x, tr_y, te_x, te_y, num_classes):
    mean, std = _stats(tr_x)
    return Data(name, TensorImages(tr_x, tr_y), TensorImages(te_x, te_y), num_classes, tr_x.shape[1], mean, std)


def load_digits_data() -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 16 grey levels), a fixed stratified
    split: 1437 train / 360 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.from_numpy(d.images * (255 / 16)).round().to(torch.uint8)[:, None]    # [1797, 1, 8, 8]
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return _in_memory("digits", x[tr], y[tr], x[te], y[te], 10)


FASHION_DEBIAN = "/usr/share/datasets/fashion-mnist"   # Debian package dataset-fashion-mnist


FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (optionally .gz): magic 0x0000080{1,3}, big-endian int32 dims, then uint8 data."""
    import gzip
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) >= 4 and raw[:3] == b"\x00\x00\x08" else 0
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 0 or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise BadInput(f"{path} is not a valid uint8 IDX file (bad header or truncated)")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(data_dir=None) -> Data:
    """The four IDX files from --data-dir, else $MIMLAND_DATA (each, or its fashion-mnist/), else, when neither
    is given, Debian's dataset-fashion-mnist."""
    roots = [root for root in (data_dir, os.environ.get("MIMLAND_DATA")) if root][:1]
    dirs = [d for root in roots for d in (root, os.path.join(root, "fashion-mnist"))] or [FASHION_DEBIAN]

    def find(stem):
        for d in dirs:
            for name in (stem, stem + ".gz"):
                if os.path.isfile(os.path.join(d, name)):
                    return os.path.join(d, name)
        where = (f"--data-dir or $MIMLAND_DATA ({roots[0]}) must hold them, or drop both to read {FASHION_DEBIAN}"
                 if roots else "install them with apt-get install dataset-fashion-mnist, or give --data-dir")
        raise BadInput(f"fashion-mnist: {stem}[.gz] not found in {', '.join(dirs)}; expected the four IDX files "
                       f"{', '.join(FASHION_FILES)} (.gz or not): {where}")
    tr_x, tr_y, te_x, te_y = (read_idx(find(stem)) for stem in FASHION_FILES)
    if tr_x.ndim != 3 or len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise BadInput("fashion-mnist: image and label files do not match in count or shape")
    return _in_memory("fashion-mnist", tr_x[:, None], tr_y.long(), te_x[:, None], te_y.long(), 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the CIFAR archives are pickles, and a pickle from
    the internet must not be able to run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (m, f) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in ("_reconstruct", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def load_cifar(name: str, data_dir=None) -> Data:
    """CIFAR-10/100 from the standard python-pickle archive: a directory holding cifar-10-batches-py/
    (or cifar-100-python/), that directory itself, or the .tar.gz beside it."""
    import tarfile
    folder, tgz, parts = (("cifar-10-batches-py", "cifar-10-python.tar.gz",
                           [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else
                          ("cifar-100-python", "cifar-100-python.tar.gz", ["train", "test"]))
    key = b"labels" if name == "cifar10" else b"fine_labels"
    root = data_dir or os.environ.get("MIMLAND_DATA")
    expected = (f"{name}: expected {folder}/ ({', '.join(parts)}) or {tgz} in --data-dir or $MIMLAND_DATA "
                f"(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    if not root:
        raise BadInput(expected)
    blobs = {}
    for d in (os.path.join(root, folder), root):
        if all(os.path.isfile(os.path.join(d, p)) for p in parts):
            for p in parts:
                with open(os.path.join(d, p), "rb") as f:
                    blobs[p] = f.read()
            break
    else:
        if not os.path.isfile(os.path.join(root, tgz)):
            raise BadInput(expected + f"; found neither in {root}")
        try:
            with tarfile.open(os.path.join(root, tgz)) as tar:
                for p in parts:
                    blobs[p] = tar.extractfile(f"{folder}/{p}").read()
        except (tarfile.TarError, KeyError, OSError, EOFError) as e:
            raise BadInput(f"{os.path.join(root, tgz)} is corrupt or incomplete ({e}); " + expected) from None
    import io

    def batch(p):
        try:
            d = _ArrayUnpickler(io.BytesIO(blobs[p]), encoding="bytes").load()
            x = rearrange(torch.from_numpy(d[b"data"]), "n (c h w) -> n c h w", c=3, h=32)
            return x, torch.tensor(list(d[key])).long()
        except Exception as e:
            raise BadInput(f"{name}: {p} is corrupt or not a CIFAR batch ({e}); " + expected) from None
    loaded = [batch(p) for p in parts]
    tr_x, tr_y = (torch.cat(t) for t in zip(*loaded[:-1]))
    te_x, te_y = loaded[-1]
    return _in_memory(name, tr_x, tr_y, te_x, te_y, 10 if name == "cifar10" else 100)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_folder(data_dir, img_size: int) -> Data:
    """An ImageNet-style tree: DATA_DIR/{train,val}/<class>/<image>. Images are decoded at
    round(img_size * 256/224) and evaluated on the centre img_size crop (reference eval transform)."""
    if not data_dir:
        raise BadInput("folder: pass --data-dir DIR with DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg")
    splits = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
            if os.path.isdir(root) else []
        files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise BadInput(f"folder: no images in {root}/<class>/; expected DIR/train/<class>/*.jpg and "
                           f"DIR/val/<class>/*.jpg")
        splits[split] = (classes, files)
    if splits["train"][0] != splits["val"][0]:
        raise BadInput(f"folder: train/ and val/ of {data_dir} have different class folders")
    size = round(img_size * 256 / 224)
    tr, va = (FolderImages([f for f, _ in fl], [c for _, c in fl], size) for _, fl in splits.values())
    return Data("folder", tr, va, len(splits["train"][0]), 3, IMAGENET_MEAN, IMAGENET_STD, 224 / 256)


def synthetic_data(n_train: int, n_test: int, img_size: int, chans: int, num_classes: int, seed: int = 0):
    """Uniform random uint8 images and labels of any size and class count, for benchmarks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train + n_test, chans, img_size, img_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    return Data("synthetic", TensorImages(x[:n_train], y[:n_train]), TensorImages(x[n_train:], y[n_train:]),
                num_classes, chans, (0.5,) * chans, (0.29,) * chans)


DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "folder", "synthetic")


def load_data(name: str, data_dir=None, cfg: ViTConfig | None = None) -> Data:
    if name == "digits":
        return load_digits_data()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir)
    if name == "folder":
        return load_folder(data_dir, cfg.img_size)
    if name == "synthetic":
        return synthetic_data(4096, 1024, cfg.img_size, cfg.in_chans, cfg.num_classes)
    raise BadInput(f"unknown data set {name!r}: choose from {', '.join(DATASETS)}")


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of a class-balanced subset of n training images, the same for every seed and method, and nested
    (the first 250 are among the first 1000): a fixed shuffle, then each class's first, second, ... image."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    y = labels[perm]
    rank = torch.zeros_like(perm)
    for c in y.unique():
        rows = torch.nonzero(y == c).flatten()
        rank[rows] = torch.arange(len(rows))
    return perm[torch.argsort(rank, stable=True)[:n]]


def limit_train(data: Data, n: int | None) -> Data:
    """--train-size: a limited-data run keeps n training images (balanced_subset); the test split is whole."""
    if n is None:
        return data
    if not isinstance(data.train, TensorImages):
        raise BadInput(f"--train-size takes an in-memory data set (digits, fashion-mnist, CIFAR, synthetic); "
                       f"{data.name} is read from files: make a smaller folder instead")
    if n > len(data.train):
        raise BadInput(f"--train-size {n} is more than the {len(data.train)} training images of {data.name}")
    rows = balanced_subset(data.train.labels, n)
    return replace(data, train=TensorImages(data.train.images[rows], data.train.labels[rows]))


# ----------------------------------------------------------------------------------------------------
# the run loop: processes, the run directory, resume, the loop itself


class GlobalBatchSampler:
    """Yields this process's micro-batches. Each epoch's permutation (from seed and epoch) is cut into
    global batches of `batch` (the last partial batch dropped); each is split into world * accum equal
    micro-batches, process `rank` taking rows rows(i) for micro-step i. Starts at `start_step`."""

    def __init__(self, n: int, batch: int, world: int, rank: int, accum: int, seed: int, start_step: int = 0):
        self.n, self.batch, self.world, self.rank, self.accum = n, batch, world, rank, accum
        self.seed, self.start_step = seed, start_step
        self.micro = batch // (world * accum)
        self.steps_per_epoch = n // batch

    def rows(self, i: int) -> slice:
        start = self.rank * (self.batch // self.world) + i * self.micro
        return slice(start, start + self.micro)

    def __iter__(self):
        step, perm = self.start_step, None
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            if perm is None or k == 0:
                perm = torch.randperm(self.n, generator=step_generator(self.seed, epoch, "perm"))
            rows = perm[k * self.batch:(k + 1) * self.batch]
            for i in range(self.accum):
                yield rows[self.rows(i)].tolist()
            step += 1


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(flag)
    except RuntimeError:
        raise BadInput(f"--device {flag!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def setup_distributed(device_flag: str):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1): one process per GPU with NCCL, or gloo on CPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = resolve_device(device_flag, int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None)
    return rank, world, device


def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep what is freed (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB),
    so the big tensors a step or a grid call allocates are not page-faulted in afresh each time; the process
    keeps its peak memory. The CLI and bench.py call it once. False without glibc (docs/BENCHMARKS.md: its gain)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt   # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # <malloc.h>
    return mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1 and mallopt(M_MMAP_MAX, 0) == 1


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list:
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut short by a crash
                    pass
    return out


class RunLog:
    """metrics.jsonl (one JSON object per line) and the progress bar; silent on ranks other than 0."""

    def __init__(self, run_dir: str | None, total: int, start: int, desc: str, resume: bool):
        from tqdm import tqdm
        self.file, self.bar = None, None
        if run_dir is None:
            return
        path = os.path.join(run_dir, "metrics.jsonl")
        if resume:   # drop what was logged after the checkpoint: those steps are run again
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a")
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, smoothing=0.1)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")

    def step(self, record: dict) -> None:
        self.write(record)
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_s']:.0f}", refresh=False)
            self.bar.update(1)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary (checkpoint, clean exit); a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        import signal
        self.signal, self.requested, self.previous = signal, False, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == self.signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for s, h in self.previous.items():
            self.signal.signal(s, h)


CKPT_FORMAT = "mimland-1"


DEFAULT_MODEL = {"digits": "vit_digits", "fashion-mnist": "vit_fashion", "cifar10": "ssat_tiny",
                 "cifar100": "ssat_tiny", "folder": "vit_base", "synthetic": "vit_digits"}


RESUMABLE = ("device", "compile", "ckpt_every", "workers", "resume")   # flags a resumed run may change


class RunStopped(Exception):
    """Training stopped before the end (Ctrl-C, non-finite loss): a one-line message and an exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


MODEL_ARGS = {"sup": {"label_smoothing": "smoothing"}, "mae": {"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio"},
              "rcmae": {"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio", "gamma": "gamma",
                        "teacher_mask": "teacher_mask"},
              "ssat": {"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio", "lam": "lam",
                       "label_smoothing": "smoothing"},
              "moco": {"tau": "tau", "random_patch_projection": "random_patch_projection"}}   # model arg: run arg


def method_kwargs(method: str, a: dict) -> dict:
    """The method's own hyperparameters, from a run's arguments."""
    return {k: a[flag] for k, flag in MODEL_ARGS[method].items()}


def run_config(a: dict) -> tuple:
    """(ViTConfig, Data) of a run: the preset (default per data set), --img-size, then the data's channel
    and class counts."""
    name = a["model"] or DEFAULT_MODEL[a["data"]]
    over = {k: a[k] for k in ("img_size", "drop_path", "global_pool") if a.get(k) is not None}
    base = preset(name, **over)
    data = limit_train(load_data(a["data"], a.get("data_dir"), base), a.get("train_size"))
    side = data.train.side
    if a.get("img_size") is None and isinstance(data.train, TensorImages) and base.img_size > 4 * side:
        near = [k for k, v in PRESETS.items() if v.get("img_size", 224) <= 4 * side]
        raise BadInput(f"--model {name} runs at {base.img_size}x{base.img_size}, {base.img_size // side}x the "
                       f"{side}x{side} images of {a['data']}: give --img-size (e.g. --img-size {side}) or a preset "
                       f"near that size ({', '.join(near)})")
    return replace(base, in_chans=data.chans, num_classes=data.num_classes), data


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the recipe of the method, then the common defaults."""
    args.data = args.data or "digits"
    recipe = RECIPES[args.recipe or "quick"]
    recipe = {**DEFAULTS, **recipe["finetune" if args.init else args.method], **recipe.get(args.data, {})}
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.warmup_epochs is None:
        args.warmup_epochs = 0
    if args.eval_every is None:
        args.eval_every = max(1, args.epochs // 10)
    return args


def resume_args(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    """A resumed run keeps its saved configuration; flags given now must agree with it."""
    for k, v in vars(args).items():
        if k in RESUMABLE or v is None or k not in saved or v == saved[k]:
            continue
        what = "wrong-method checkpoint: " if k == "method" else ""
        raise BadInput(f"{what}--{k.replace('_', '-')} {v} differs from the resumed run's {saved[k]}; --resume "
                       f"continues a run as it was configured")
    saved = {"ema_schedule": "cosine", **saved}   # a run saved before the schedule was a flag ran the cosine
    return argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in RESUMABLE if getattr(args, k) is not None}})


METHOD_FLAGS = {"mask_ratio": ("mae", "rcmae", "ssat"), "norm_pix_loss": ("mae", "rcmae", "ssat"),
                "gamma": ("rcmae",), "ema_momentum": ("rcmae", "moco"), "ema_schedule": ("rcmae", "moco"),
                "teacher_mask": ("rcmae",), "lam": ("ssat",), "smoothing": ("sup", "ssat"), "tau": ("moco",),
                "random_patch_projection": ("moco",)}   # flags that only some methods read


def check_method_flags(a: dict) -> None:
    """A flag the chosen method does not read is refused, not silently ignored."""
    method = a["method"]
    for k, methods in METHOD_FLAGS.items():
        if a.get(k) is not None and method not in methods:
            raise BadInput(f"--{k.replace('_', '-')} is read by {', '.join(methods)} only; --method {method} does "
                           f"not use it: drop it")


def check_run_args(a: argparse.Namespace, world: int, n_train: int | None = None) -> None:
    """Flags that fail together (each alone is checked as it is parsed) fail before anything is loaded or
    written; the batch against the data once it is loaded."""
    if a.batch_size % (world * a.accum_iter):
        raise BadInput(f"--batch-size {a.batch_size} (the global batch) does not split into {world} processes x "
                       f"{a.accum_iter} accumulation steps; use a multiple of {world * a.accum_iter}")
    if a.method == "moco" and a.accum_iter > 1:
        raise BadInput("--accum-iter: MoCo's loss couples the images of a batch (negatives, batch norm), so "
                       "accumulated micro-batches are not its global batch; drop --accum-iter (or lower --batch-size)")
    if n_train is not None and a.batch_size > n_train:
        raise BadInput(f"--batch-size {a.batch_size} is larger than the {n_train} training images; "
                       f"use at most {n_train}")


def start_args(args: argparse.Namespace, world: int) -> tuple:
    """(args, checkpoint or None): a resumed run's saved settings, or a new run's filled from its recipe;
    what can fail without the data fails here, before anything is loaded or written."""
    ckpt = None
    if args.resume:
        path = checkpoint_path(args.resume)
        ckpt = read_checkpoint(path)
        if ckpt.get("format") != CKPT_FORMAT or "optimizer" not in ckpt:
            raise BadInput(f"{path} is not a mimland training checkpoint; --resume takes a run directory "
                           f"or its checkpoint.pt")
        args = resume_args(args, ckpt["args"])
        args.out = run_directory(path)
    else:
        check_method_flags(vars(args))
        resolve_args(args)
        if args.out and os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise BadInput(f"{args.out} already holds a run; continue it with --resume {args.out} or pick another --out")
    check_run_args(args, world)
    return args, ckpt


def build_training(args, cfg: ViTConfig, device, ckpt: dict | None) -> tuple:
    """(model, AdamW, grad scaler, autocast, precision): a new run's, or restored from its checkpoint."""
    torch.manual_seed(args.seed)
    raw = build_model(args.method, cfg, **method_kwargs(args.method, vars(args))).to(device)
    if args.init:   # fine-tuning trains the loaded position table, as the reference (timm's ViT) does
        raw.pos_embed.requires_grad_(True)
        if not ckpt:
            init_from_pretrained(raw, args.init)
    skip = FINETUNE_NO_DECAY if args.init else ()
    opt = torch.optim.AdamW(param_groups(raw, args.weight_decay, args.layer_decay, cfg.depth, skip),
                            lr=peak_lr(args.blr, args.batch_size), betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    half = torch.float16 if precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=half, enabled=precision != "fp32")
    if not ckpt:
        return raw, opt, scaler, autocast, precision
    load_pretrained(raw, ckpt)
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except ValueError:
        raise BadInput(f"{args.out}: its optimizer state does not fit this model's trainable parameters; start "
                       f"the run afresh") from None
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return raw, opt, scaler, autocast, precision


def open_run(args, cfg: ViTConfig, data, raw, world: int, device, precision: str, total: int, new: bool) -> str:
    """Rank 0: make the run directory, write config.json (a new run) and say what is about to run."""
    B, accum = args.batch_size, args.accum_iter
    source = run_directory(args.init) if args.init and os.path.basename(args.init) == "checkpoint.pt" else args.init
    if not args.out:
        name = f"finetune-{os.path.basename(source).removesuffix('.pth').removesuffix('.pt')}" if args.init else \
            f"{args.method}-{args.data}"
        args.out = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot make the run directory --out {args.out} ({e.strerror}); pick another --out") from None
    lr = peak_lr(args.blr, B)
    if new:
        atomic_write_text(os.path.join(args.out, "config.json"), json.dumps(
            {"args": vars(args), "model": asdict(cfg), "world_size": world, "per_process_batch": B // (world * accum),
             "lr": lr, "steps": total, "steps_per_epoch": len(data.train) // B, "device": str(device),
             "precision": precision, "torch": torch.__version__,
             **({"finetuned_from": os.path.abspath(source)} if args.init else {})}, indent=2))
    n_trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    what = f"finetune: fine-tuning the encoder of {source} on" if args.init else f"train: {args.method} on"
    print(f"mimland {what} {args.data} ({len(data.train)} images) with {args.model or DEFAULT_MODEL[args.data]} "
          f"({cfg.img_size}x{cfg.img_size} images, {cfg.num_patches} tokens, {n_trainable / 1e6:.2f}M trainable); "
          f"{world} process(es) x {B // (world * accum)} images x {accum} accumulation = global "
          f"batch {B}; lr {lr:.3g} (blr {args.blr:g} x {B}/256); {total} steps; {device}, {precision}; "
          f"-> {args.out}", flush=True)
    if args.warmup_epochs >= args.epochs:
        print(f"mimland {what.split(':')[0]}: note: all {args.epochs} epochs lie inside the {args.warmup_epochs:g}-epoch "
              f"warm-up, so the lr never reaches its peak {lr:.3g} (at most {lr * args.epochs / args.warmup_epochs:.3g}); "
              f"lower --warmup-epochs or raise --epochs", flush=True)
    return args.out


def save_run(args, cfg: ViTConfig, data, raw, opt, scaler, step: int, seconds: dict, device) -> None:
    """RUN/checkpoint.pt, atomically: everything --resume needs to continue bit for bit. RC-MAE in the
    reference layout: `model` (the student) and `teacher`."""
    state = {"format": CKPT_FORMAT, "method": args.method, "config": asdict(cfg), "args": vars(args),
             "data_stats": {"mean": list(data.mean), "std": list(data.std)},
             "model": getattr(raw, "student", raw).state_dict(),
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
             "epoch": step / (len(data.train) // args.batch_size), **seconds,
             "rng": {"cpu": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}
    if hasattr(raw, "teacher"):
        state["teacher"] = raw.teacher.state_dict()
    atomic_save(state, os.path.join(args.out, "checkpoint.pt"))


def micro_batches(loader, sampler, args, step: int, data, cfg: ViTConfig, device):
    """This process's Batches of one step, augmented on the device (MoCo: its two views). Crops and masks are
    drawn for the whole global batch from (seed, step) and sliced per micro-batch."""
    B, L, H, moco = args.batch_size, cfg.num_patches, data.train.side, args.method == "moco"
    g = lambda stream: step_generator(args.seed, step, stream, device)                 # noqa: E731
    boxes, jitter = view_draws(B, H, g, vars(args)) if moco else \
        (sample_crops(B, H, H, g("crop"), args.min_crop_scale, args.hflip), None)
    noise = torch.rand(B, L, generator=g("mask"), device=device)
    t_noise = torch.rand(B, L, generator=g("teacher-mask"), device=device)
    for i in range(args.accum_iter):
        u8, labels = next(loader)
        u8, r = u8.to(device, non_blocking=True), sampler.rows(i)
        imgs = two_views(u8, boxes[:, r], jitter[:, r], data, cfg.img_size) if moco else \
            train_view(u8, boxes[r], data, cfg.img_size)
        yield Batch(imgs, labels.to(device, non_blocking=True), noise[r], t_noise[r])


@dataclass
class Run:
    """A training run in progress: its settings, data, model (`raw`, and `loss_fn` its training loss as called:
    DDP- or compile-wrapped), optimizer and place in the schedule."""
    args: argparse.Namespace
    cfg: ViTConfig
    data: Data
    raw: nn.Module
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    ddp: object
    rank: int
    world: int
    device: torch.device
    step: int
    seconds: dict             # so far: wall clock (elapsed_s) and training steps alone (train_s)
    resumed: bool
    sampler: GlobalBatchSampler = None
    loader: object = None     # this process's micro-batches from the step it starts at

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train) // self.args.batch_size

    @property
    def total_steps(self) -> int:
        return self.args.epochs * self.steps_per_epoch


def start_run(args: argparse.Namespace) -> Run:
    """A new run from its flags, or a stopped one from its checkpoint; rank 0 makes the run directory."""
    rank, world, device = setup_distributed(args.device)
    args, ckpt = start_args(args, world)
    cfg, data = run_config(vars(args))
    check_run_args(args, world, len(data.train))
    if ckpt:   # evaluate on the pixels the run was trained on
        data.mean, data.std = tuple(ckpt["data_stats"]["mean"]), tuple(ckpt["data_stats"]["std"])
        if ckpt["step"] >= args.epochs * (len(data.train) // args.batch_size) and \
                os.path.isfile(os.path.join(args.out, "results.json")):
            raise RunStopped(f"{args.out} is finished (step {ckpt['step']}, results.json written): nothing to "
                             f"resume, nothing changed", 0)
    raw, opt, scaler, autocast, precision = build_training(args, cfg, device, ckpt)
    ddp = torch.nn.parallel.DistributedDataParallel(TrainingLoss(raw), device_ids=[device] if device.type == "cuda"
                                                    else None) if world > 1 else None
    loss_fn = torch.compile(ddp or TrainingLoss(raw)) if args.compile else ddp or TrainingLoss(raw)
    seconds = {k: ckpt.get(k, ckpt["elapsed_s"]) if ckpt else 0.0 for k in ("elapsed_s", "train_s")}
    run = Run(args, cfg, data, raw, loss_fn, opt, scaler, autocast, ddp, rank, world, device,
              ckpt["step"] if ckpt else 0, seconds, ckpt is not None)
    run.sampler = GlobalBatchSampler(len(data.train), args.batch_size, world, rank, args.accum_iter, args.seed, run.step)
    run.loader = iter(torch.utils.data.DataLoader(data.train, batch_sampler=run.sampler, collate_fn=_identity,
                                                  num_workers=loader_workers(data.train, args.workers),
                                                  pin_memory=device.type == "cuda"))
    if rank == 0:
        open_run(args, cfg, data, raw, world, device, precision, run.total_steps, new=not ckpt)
    return run


def train(args: argparse.Namespace) -> dict:
    """Train one method end to end: the loop, checkpoints, evaluations, the final probes -> results (rank 0)."""
    r = start_run(args)
    args, raw, steps_per_epoch = r.args, r.raw, r.steps_per_epoch
    total, base_lr, last_saved = r.total_steps, peak_lr(args.blr, args.batch_size), r.step if r.resumed else None
    stop, t_start = StopFlag(), time.perf_counter()
    wall = lambda: {**r.seconds, "elapsed_s": r.seconds["elapsed_s"] + time.perf_counter() - t_start}   # noqa: E731
    log = RunLog(args.out if r.rank == 0 else None, total, r.step, args.method, resume=r.resumed)

    def save(at_step):
        nonlocal last_saved
        last_saved = at_step
        if r.rank == 0:
            log.flush()
            save_run(args, r.cfg, r.data, raw, r.opt, r.scaler, at_step, wall(), r.device)
    raw.train()
    try:
        while r.step < total:
            t0 = time.perf_counter()
            lr = lr_at(r.step / steps_per_epoch, base_lr, args.min_lr, args.warmup_epochs, args.epochs)
            momentum = momentum_at(r.step, total, args.ema_momentum, args.ema_schedule) \
                if args.method in EMA_METHODS else None
            batches = micro_batches(r.loader, r.sampler, args, r.step, r.data, r.cfg, r.device)
            vals, stopped = train_step(raw, r.opt, batches, lr, momentum, loss_fn=r.loss_fn, accum=args.accum_iter,
                                       clip_grad=args.clip_grad, ddp=r.ddp, scaler=r.scaler, autocast=r.autocast,
                                       stop=stop.requested)
            if not math.isfinite(vals[0]):
                raise RunStopped(non_finite_message(vals[0], r.step, steps_per_epoch, last_saved, args.out), 1)
            r.step, dt = r.step + 1, time.perf_counter() - t0
            r.seconds["train_s"] += dt
            log.step({"kind": "train", "step": r.step, "epoch": r.step / steps_per_epoch, "loss": vals[0],
                      **dict(zip(raw.loss_parts, vals[1:])), "lr": lr,
                      **({"momentum": momentum} if momentum is not None else {}), "img_s": args.batch_size / dt})
            if args.ckpt_every and r.step % args.ckpt_every == 0:
                save(r.step)
            epoch, end_of_epoch = divmod(r.step, steps_per_epoch)
            if end_of_epoch == 0 and (epoch % args.eval_every == 0 or r.step == total):
                evaluate_during_run(raw, r.data, r.cfg, r.device, vars(args), r.autocast, log, epoch, r.world)
            if stopped:
                save(r.step)
                raise RunStopped(f"interrupted at step {r.step}/{total}: checkpoint saved; continue with "
                                 f"python mimland.py train --resume {args.out}", 130)
        save(r.step)
    finally:
        stop.restore()
        log.close()
    results = finish_run(raw, args, r.cfg, r.data, r.device, r.autocast, r.step, wall()) if r.rank == 0 else {}
    if r.world > 1:
        torch.distributed.barrier()
    return results


def non_finite_message(loss: float, step: int, steps_per_epoch: int, last_saved: int | None, out: str) -> str:
    return f"loss is {loss} at step {step} (epoch {step / steps_per_epoch:.2f}): stopping. " + (
        f"The last good checkpoint (step {last_saved}) is intact in {out}; lower --blr or add "
        f"--clip-grad, then --resume" if last_saved is not None else
        "No checkpoint was written yet; lower --blr or add --clip-grad")


def evaluate_during_run(raw, data, cfg: ViTConfig, device, a: dict, autocast, log, epoch: float, world: int) -> None:
    """Per-epoch test metrics into metrics.jsonl and the terminal (rank 0); the other processes wait."""
    if log.file:
        metrics = evaluate(raw, a["method"], data, cfg, device, a, autocast)
        log.write({"kind": "eval", "step": round(epoch * (len(data.train) // a["batch_size"])), "epoch": epoch,
                   **metrics})
        log.bar.write(f"epoch {epoch:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if world > 1:
        torch.distributed.barrier()


def finish_run(raw, args, cfg: ViTConfig, data, device, autocast, step: int, seconds: dict) -> dict:
    """Rank 0 at the end: results.json (final test metrics, probe and k-NN), loss.png, recon.png."""
    method, run_dir = args.method, args.out
    results = {"method": method, "data": args.data, "model": args.model or DEFAULT_MODEL[args.data],
               "steps": step, "train_wall_s": round(seconds["elapsed_s"], 1),
               "train_steps_s": round(seconds["train_s"], 3),          # img_s counts the training steps alone
               "img_s": round(step * args.batch_size / max(seconds["train_s"], 1e-9), 1),
               "train_gflop_per_image": flops_per_image(cfg, method, args.mask_ratio or 0.75) / 1e9}
    if hasattr(raw, "teacher"):   # the EMA as applied: once per micro-batch, the momentum of the step
        steps_per_epoch = len(data.train) // args.batch_size
        momenta = [momentum_at(t, args.epochs * steps_per_epoch, args.ema_momentum, args.ema_schedule)
                   for t in range(step) for _ in range(args.accum_iter)]
        lag, results["teacher_init_weight"] = teacher_lag(momenta)
        results["teacher_lag_steps"] = lag / args.accum_iter
        results["teacher_lag_share"] = results["teacher_lag_steps"] / max(step, 1)
    if args.final_eval:
        t = time.perf_counter()
        metrics, head = final_evaluation(raw, method, data, cfg, device, vars(args), autocast)
        results.update(metrics)
        atomic_save({"head": head.state_dict(), "features": "teacher" if hasattr(raw, "teacher") else "model",
                     "probe_acc": results["probe_acc"]}, os.path.join(run_dir, "probe.pt"))   # landscape --loss probe
        results["final_eval_s"] = round(time.perf_counter() - t, 1)
    atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2))
    plot_curves(run_dir)
    if isinstance(raw.encoder, MAE):   # a masked autoencoder (RC-MAE: its teacher) shows its reconstructions
        plot_reconstructions(raw.encoder, data, cfg, device,
                             os.path.join(run_dir, "recon.png"), args.mask_ratio, args.seed,
                             title=f"{os.path.basename(os.path.normpath(run_dir))} ({'the RC-MAE teacher' if hasattr(raw, 'teacher') else method})")
    print(f"mimland {'finetune' if args.init else 'train'}: done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in results.items()) + f" -> {run_dir}")
    return results


# ----------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """Write a figure atomically and close it."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)


PART_NAMES = {"loss": "total loss", "rec": "reconstruction", "cons": "consistency (right axis)", "ce": "cross-entropy",
              "ctr": "contrastive"}


def plot_curves(run_dir: str) -> None:
    """RUN/loss.png: the training loss and its parts per step (left); the per-epoch test metrics (right)."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    name = os.path.basename(os.path.normpath(run_dir))
    parts = [k for k in ("rec", "ce", "cons", "ctr") if k in train[0]]
    steps = [r["step"] for r in train]
    for k in (["loss"] if len(parts) > 1 else []) + [p for p in parts if p != "cons"]:   # one part: it is the loss
        ax1.plot(steps, [r[k] for r in train], label=PART_NAMES[k], lw=1)
    ax1.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title=f"{name}: training loss")
    _log_axis(ax1.yaxis)
    handles = ax1.get_lines()
    if "cons" in parts:   # far smaller than the reconstruction: its own axis
        twin = ax1.twinx()
        cons = [(st, r["cons"]) for st, r in zip(steps, train) if r["cons"] > 0]   # 0 at the start: teacher = student
        handles += twin.plot(*zip(*cons), label=PART_NAMES["cons"], lw=1, color="tab:red")
        twin.set(ylabel="consistency loss", yscale="log")
        _log_axis(twin.yaxis)
    ax1.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper right")
    fixed = "" if parts == ["ce"] else " (fixed views)" if parts == ["ctr"] else " (fixed masks)"
    plot_test_metrics(ax2, evals, "test loss" + fixed)
    save_figure(fig, os.path.join(run_dir, "loss.png"))


def plot_test_metrics(ax, evals: list, loss_label: str) -> None:
    """The right panel of loss.png: test and k-NN accuracy (left axis), test loss (right axis), legend below."""
    ax.set(title="test set, each evaluation", xlabel="epoch", ylabel="accuracy")
    if len(evals) < 2:   # one point is no curve: say the numbers
        text = "\n".join(f"{k}: {v:.4g}" for k, v in (evals[0] if evals else {}).items() if k not in ("kind", "step"))
        ax.text(0.5, 0.5, text or "no evaluation", ha="center", va="center", transform=ax.transAxes)
        return
    epochs = [r["epoch"] for r in evals]
    handles = []
    for k, label in (("test_acc", "test accuracy (head)"), ("knn_acc", "k-NN accuracy")):
        if k in evals[0]:
            handles += ax.plot(epochs, [r[k] for r in evals], marker="o", label=label)
    twin = ax.twinx()
    handles += twin.plot(epochs, [r["test_loss"] for r in evals], color="grey", ls="--", label=loss_label)
    twin.set_ylabel("test loss")
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)


@torch.no_grad()
def reconstruct(net: MAE, imgs: torch.Tensor, mask_ratio: float, noise=None):
    """(reconstruction [N, C, H, W] in the input's normalized space, mask [N, L]). With norm_pix_loss the
    decoder predicts per-patch normalized pixels, so each patch is given back the mean and std of the real
    patch, as the reference demo does; without it the prediction is already in input space."""
    latent, mask, ids_restore = net.forward_encoder(imgs, mask_ratio, noise)
    pred = net.forward_decoder(latent, ids_restore)                                 # [N, L, p*p*C]
    if net.norm_pix_loss:
        t = patchify(imgs, net.cfg.patch_size)
        pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
    return unpatchify(pred, net.cfg.patch_size), mask


REMOVED_COLOUR = (0.95, 0.55, 0.1)   # the colour of a removed patch in recon.png: no pixel of a grey image has it


def plot_reconstructions(net: MAE, data: Data, cfg: ViTConfig, device, path: str, mask_ratio: float = 0.75,
                         seed: int = 0, n: int = 8, title: str = "") -> None:
    """A grid of test images: original | what the encoder sees | the decoder's output for every patch | the
    visible patches with the predicted ones, all un-normalized to pixel space; removed patches in orange."""
    u8, _ = data.test.__getitems__(list(range(min(n, len(data.test)))))
    imgs = eval_view(u8.to(device), data, cfg.img_size)
    noise = torch.rand(len(imgs), cfg.num_patches, generator=step_generator(seed, 0, "recon", device), device=device)
    with eval_mode(net):
        rec, mask = reconstruct(net, imgs, mask_ratio, noise)
    removed = unpatchify(repeat(mask, "n l -> n l k", k=cfg.patch_size ** 2 * cfg.in_chans), cfg.patch_size)[:, :1]
    mean, std = channel_stats(data, device)
    rgb = lambda x: (x * std + mean).clamp(0, 1).expand(-1, 3, -1, -1)                  # noqa: E731
    orange = torch.tensor(REMOVED_COLOUR, device=device).view(1, 3, 1, 1)
    cols = {"original": rgb(imgs), "the encoder sees\n(orange: removed)": rgb(imgs) * (1 - removed) + orange * removed,
            "decoder output, every patch\n(the loss reads the removed)": rgb(rec),
            "visible + predicted": rgb(imgs * (1 - removed) + rec * removed)}
    plt = _pyplot()
    fig, axes = plt.subplots(len(imgs), 4, figsize=(8.4, 2 * len(imgs) + 0.8), squeeze=False, constrained_layout=True)
    for j, (head, x) in enumerate(cols.items()):
        axes[0, j].set_title(head, fontsize=9)
        for i in range(len(imgs)):
            axes[i, j].imshow(rearrange(x[i].float().cpu(), "c h w -> h w c").numpy(), vmin=0, vmax=1,
                              interpolation="nearest")
            axes[i, j].axis("off")
    fig.suptitle(f"{title or type(net).__name__}: {len(imgs)} test images, {mask_ratio:.0%} of the patches removed")
    save_figure(fig, path)


def _levels(vmin: float, vmax: float, n: int = 30):
    """Contour levels and round colour-bar ticks: log-spaced where the loss is positive (losses span decades
    away from the minimum: log levels keep the basin visible), else linear."""
    import numpy as np
    from matplotlib.ticker import LogLocator, MaxNLocator
    vmax = max(vmax, vmin * 1.0001 + 1e-12)
    if vmin > 0:
        ticks = LogLocator(subs=(1, 2, 5)).tick_values(vmin, vmax)
        return np.geomspace(vmin, vmax, n), [t for t in ticks if vmin <= t <= vmax] or [vmin, vmax]
    return np.linspace(vmin, vmax, n), MaxNLocator(6).tick_values(vmin, vmax)


def _log_axis(axis) -> None:
    """Round ticks (1, 2, 5 per decade) written plainly, not as powers of ten, on a log-scaled axis."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def _directions_axes(ax, xs, ys) -> None:
    """Axis labels and five round ticks per direction."""
    import numpy as np
    ax.set(xlabel="direction 1", ylabel="direction 2", xticks=np.linspace(float(xs[0]), float(xs[-1]), 5),
           yticks=np.linspace(float(ys[0]), float(ys[-1]), 5))


def plot_landscape(xs, ys, surface, prefix: str, title: str, vmin=None, vmax=None) -> list:
    """PREFIX.png (1-D), or PREFIX-contour.png, PREFIX-filled.png and PREFIX-surface.png (3-D) -> the paths."""
    import numpy as np
    plt = _pyplot()
    s = surface.double().numpy()
    vmin, vmax = vmin if vmin is not None else float(s.min()), vmax if vmax is not None else float(s.max())
    if ys is None:
        fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
        ax.plot(xs.numpy(), s, marker="." if len(xs) <= 31 else None)
        ax.set(xlabel="step along the filter-normalized direction", ylabel="loss", title=title,
               yscale="log" if vmin > 0 else "linear", xticks=np.linspace(float(xs[0]), float(xs[-1]), 5))
        if vmin > 0:
            _log_axis(ax.yaxis)
        save_figure(fig, prefix + ".png")
        return [prefix + ".png"]
    X, Y = (t.numpy() for t in torch.meshgrid(xs, ys, indexing="ij"))
    levels, ticks = _levels(vmin, vmax)
    paths = []
    for kind in ("contour", "contourf"):
        fig, ax = plt.subplots(figsize=(5.5, 4.6), constrained_layout=True)
        cs = getattr(ax, kind)(X, Y, s, levels=levels, cmap="viridis")
        fig.colorbar(cs, ax=ax, ticks=ticks, format="%g", label="loss")
        _directions_axes(ax, xs, ys)
        ax.set(title=title, aspect="equal")
        paths.append(f"{prefix}-{'filled' if kind == 'contourf' else kind}.png")
        save_figure(fig, paths[-1])
    fig = plt.figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, s, cmap="viridis", linewidth=0, antialiased=True)
    _directions_axes(ax, xs, ys)
    ax.set(zlabel="loss", title=title)
    ax.tick_params(labelsize=8)
    save_figure(fig, prefix + "-surface.png")
    return paths + [prefix + "-surface.png"]


def plot_landscape_comparison(items: list, path: str, title: str, label: str = "loss") -> None:
    """Filled contours of several surfaces side by side on one colour scale; items: (name, xs, ys, surface)."""
    plt = _pyplot()
    levels, ticks = _levels(min(float(s.min()) for *_, s in items), max(float(s.max()) for *_, s in items))
    fig, axes = plt.subplots(1, len(items), figsize=(3.6 * len(items) + 1.2, 4), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, (name, xs, ys, s) in zip(axes[0], items):
        X, Y = (t.numpy() for t in torch.meshgrid(xs, ys, indexing="ij"))
        cs = ax.contourf(X, Y, s.double().numpy(), levels=levels, cmap="viridis")
        ax.contour(X, Y, s.double().numpy(), levels=levels[::3], colors="white", linewidths=0.4)
        _directions_axes(ax, xs, ys)
        ax.set(title=name, aspect="equal")
        ax.label_outer()
    fig.colorbar(cs, ax=list(axes[0]), ticks=ticks, format="%g", label=label)
    fig.get_layout_engine().set(wspace=0.12)             # room between one panel's 1.0 and the next one's -1.0
    fig.suptitle(title)
    save_figure(fig, path)


def plot_analysis(records: list, path: str, title: str) -> None:
    """Per block: attention distance with one dot per head (as Dosovitskiy et al. draw it), attention entropy,
    feature variance; one colour per run, the mean over heads as a line."""
    keys = [k for k in ("attention_distance", "attention_entropy", "feature_variance", "gradients") if k in records[0]]
    labels = {"attention_distance": "mean attention distance (pixels)", "attention_entropy": "attention entropy (nats)",
              "feature_variance": "feature map variance"}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False, constrained_layout=True)
    for ax, k in zip(axes[0], keys):
        if k == "gradients":
            plot_correction(ax, records)
            continue
        for c, rec in enumerate(records):
            v = torch.tensor(rec[k], dtype=torch.float64)                          # [depth] or [depth, heads]
            blocks = torch.arange(1, len(v) + 1)
            name = f"{os.path.basename(rec['run'])} ({rec['method']})"
            if v.ndim == 2:
                ax.scatter(blocks.repeat_interleave(v.shape[1]), v.flatten(), s=12, color=f"C{c}", alpha=0.6)
                v = v.mean(dim=1)
            ax.plot(blocks, v, color=f"C{c}", label=name)
        ax.set(xlabel="block", ylabel=labels[k], title=labels[k].split(" (")[0], xticks=blocks.tolist())
    if keys[0] != "gradients":   # one colour per run; the correction panel has a legend of its own
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=min(len(records), 4))
    fig.suptitle(title)
    save_figure(fig, path)


def plot_correction(ax, records: list) -> None:
    """The teacher's correction against the input's similarity to the previous batch, mean +- sd per probe."""
    for c, rec in enumerate(records):
        probes = {k: v for k, v in rec["gradients"].items() if "correction_cosine" in v}
        xs, ys = ([v[key] for v in probes.values()] for key in ("input_similarity", "correction_cosine"))
        ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                    fmt="o", color=f"C{c}", capsize=3)
        for k, (name, x, y) in enumerate(zip(probes, xs, ys)):   # staggered: nearby probes' names apart
            ax.annotate(name, (x[0], y[0]), fontsize=7, xytext=(-40, 10 + 11 * (k % 4)), textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", lw=0.4, color="grey"))
    s = torch.linspace(-1, 1, 101)       # the linear model: c = a lr^2 s e0 x1^T against u = -lr e0 x0^T
    ax.plot(s, -s.abs(), color="black", lw=0.8, ls="--", label="linear model (Prop. 4.1): -|s|")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7, loc="lower left")
    ax.set(xlabel="input similarity s (cosine of the pixels)", ylabel="cos(correction, previous update)",
           title="the teacher's correction")


def plot_spectrum(slq: dict, path: str, title: str) -> None:
    """The Hessian's eigenvalue density (slq_density) on a log scale, zero marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    ax.semilogy(slq["grid"].numpy(), slq["density"].clamp_min(1e-12).numpy())
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlabel="eigenvalue", ylabel="density (SLQ, log scale)", title=title)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# CLI


REFERENCE_FLAGS = {"--output_dir": "--out", "--data_path": "--data-dir", "--input_size": "--img-size"}   # MAE's


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of usage + error, no abbreviated flags, and a 'did
    you mean' for a flag written with _ or under the MAE reference's name; under torchrun rank 0 alone says it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **{"allow_abbrev": False, **kw})

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{self.suggestion(message)} (see --help)\n"
                  if int(os.environ.get("RANK", 0)) == 0 else None)

    def parse_args(self, args=None, namespace=None):
        """Flags that the chosen command does not know are refused by that command's parser."""
        args, extra = self.parse_known_args(args, namespace)
        if extra:
            parser = getattr(self, "commands", {}).get(getattr(args, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args

    def suggestion(self, message: str) -> str:
        if not message.startswith("unrecognized arguments: "):
            return ""
        names = [t.split("=")[0] for t in message.split(": ", 1)[1].split() if t.startswith("--")]
        guesses = [REFERENCE_FLAGS.get(n, n.replace("_", "-")) for n in names]
        known = [g for n, g in zip(names, guesses) if g != n and g in self._option_string_actions]
        return f"; did you mean {' '.join(known)}?" if known else ""


def checked(cast, ok, need: str):
    """An argparse type that refuses, at parse time, numbers outside a flag's range:
    `argument --blr: -1 is not a positive number`."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {need}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {need}")
        return value
    return parse


COUNT = checked(int, lambda v: v >= 1, "a positive integer")


NATURAL = checked(int, lambda v: v >= 0, "a non-negative integer")


SEED = checked(int, lambda v: 0 <= v < 2 ** 63, "a seed in [0, 2**63)")


POSITIVE = checked(float, lambda v: 0 < v < math.inf, "a positive number")


NONNEGATIVE = checked(float, lambda v: 0 <= v < math.inf, "a non-negative number")


def in_interval(spec: str):
    """An argparse type for a number in an interval written as in mathematics, e.g. '(0, 1]'."""
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return checked(float, lambda v: (lo < v if spec[0] == "(" else lo <= v) and (v < hi if spec[-1] == ")" else v <= hi),
                   f"in {spec}")


OUT_FILE = checked(str, lambda p: os.path.isdir(os.path.dirname(os.path.abspath(p))), "in an existing directory")


PROBE_FILE = checked(str, lambda n: re.fullmatch(r"probe[\w.-]*\.pt", n) is not None,   # inside the run directory
                     "a file name of the form probe*.pt, without a directory (e.g. probe-reference.pt)")


def add_data_flags(p, from_ckpt: bool = False):
    note = " (default: the run's)" if from_ckpt else ""
    p.add_argument("--data", choices=DATASETS,
                   help=f"data set{note or ' (default: digits, embedded in scikit-learn)'}; fashion-mnist reads "
                        f"the IDX files, cifar10/cifar100 the python archives, folder an ImageNet-style tree, "
                        f"synthetic random images")
    p.add_argument("--data-dir", help=f"where the data files are{note} (also $MIMLAND_DATA; fashion-mnist also "
                                      f"{FASHION_DEBIAN})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when there is one)")


def add_train_flags(p, finetune: bool = False):
    if not finetune:
        p.add_argument("--method", choices=METHODS, help="sup: supervised ViT; mae; rcmae: MAE + EMA teacher; "
                                                         "ssat: classification + MAE auxiliary; moco: MoCo v3, "
                                                         "contrastive (required)")
    p.add_argument("--model", choices=PRESETS, help="ViT preset (default: vit_digits for digits, vit_fashion "
                                                    "for fashion-mnist, ssat_tiny for CIFAR, vit_base for folder)")
    p.add_argument("--img-size", type=COUNT, help="input resolution (default: the preset's)")
    add_data_flags(p)
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="defaults: quick (sized for digits on a CPU) or reference (the paper's recipe); flags win")
    add_optimization_flags(p, finetune)
    add_run_flags(p)


def add_optimization_flags(p, finetune: bool) -> None:
    """The optimizer, schedule and augmentation flags; then those of fine-tuning or of the methods."""
    q = "(default %s in the quick recipe)"
    g = p.add_argument_group("optimization (AdamW betas 0.9, 0.95; lr = blr * batch / 256)")
    g.add_argument("--epochs", type=COUNT, help=f"{q % 100}; reference 800-1600 (MAE, RC-MAE), 100 (SSAT)")
    g.add_argument("--batch-size", type=COUNT, help=f"GLOBAL batch per optimizer step, split over processes and "
                                                  f"accumulation {q % 128}; reference 4096 (MAE, RC-MAE)")
    g.add_argument("--accum-iter", type=COUNT, help="gradient accumulation steps per optimizer step (default 1)")
    g.add_argument("--blr", type=POSITIVE, help="base lr (quick: 1.5e-3 MAE/RC-MAE, 1e-3 SSAT/sup); reference 1.5e-4 "
                                             "MAE/RC-MAE, 1e-3 SSAT")
    g.add_argument("--min-lr", type=NONNEGATIVE, help="floor of the cosine schedule (default 0; SSAT reference 1e-6)")
    g.add_argument("--warmup-epochs", type=NONNEGATIVE, help=f"linear warm-up {q % 5}; reference 40 (MAE), 5 (SSAT)")
    g.add_argument("--weight-decay", type=NONNEGATIVE, help="AdamW decay, none on 1-D params and biases (0.05, reference; "
                                                                "MoCo 0.1)")
    g.add_argument("--clip-grad", type=POSITIVE, help="clip the global gradient norm (default off, as the reference)")
    g.add_argument("--smoothing", type=in_interval("[0, 1)"), help="label smoothing for sup / SSAT / fine-tuning (0.1, reference)")
    g.add_argument("--min-crop-scale", type=in_interval("(0, 1]"), help="random resized crop area scale lower bound (quick 1.0; "
                                                       "reference 0.2)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (quick off: digits are chiral; reference on)")
    if finetune:
        g.add_argument("--layer-decay", type=in_interval("(0, 1]"), help="layer-wise lr decay (quick 0.75; reference 0.65 ViT-B, "
                                                         "0.75 ViT-L/H)")
        g.add_argument("--drop-path", type=in_interval("[0, 1)"), help="stochastic depth rate (0.1, reference ViT-B)")
        g.add_argument("--global-pool", action=argparse.BooleanOptionalAction, default=True,
                       help="classify the mean patch token through fc_norm (default on, as the reference)")
    else:
        m = p.add_argument_group("masked image modeling and the EMA")
        m.add_argument("--mask-ratio", type=in_interval("(0, 1)"), help="share of patches removed (0.75, reference)")
        m.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                       help="per-patch normalized pixel targets (default off; the reference recipe turns it on)")
        m.add_argument("--gamma", type=NONNEGATIVE, help="RC-MAE consistency weight (1.0, reference)")
        m.add_argument("--ema-momentum", type=in_interval("[0, 1)"), help="EMA momentum: RC-MAE's teacher (0.996), MoCo's "
                                                            "momentum encoder (0.99)")
        m.add_argument("--ema-schedule", choices=("constant", "cosine"),
                       help="the momentum throughout (RC-MAE's default, as its reference ran) or a cosine from it to "
                            "1 over the run (MoCo's default, as its reference)")
        m.add_argument("--teacher-mask", choices=("same", "different"),
                       help="RC-MAE teacher mask: same (RC-MAE-S, default) or different (RC-MAE-D)")
        m.add_argument("--lam", type=in_interval("[0, 1]"), help="SSAT weight of the classification loss: lam*CE + (1-lam)*rec "
                                                 "(0.1, reference)")
        c = p.add_argument_group("contrastive (MoCo v3)")
        c.add_argument("--tau", type=POSITIVE, help="temperature of the contrastive loss (0.2, reference for ViT)")
        c.add_argument("--random-patch-projection", action=argparse.BooleanOptionalAction, default=None,
                       help="freeze the patch embedding at its random init (the reference's stabilizing option; off)")


def add_run_flags(p) -> None:
    """Where a run goes and how it runs: directory, seed, resume, checkpoints, evaluation, precision."""
    r = p.add_argument_group("run")
    r.add_argument("--out", help="run directory (default runs/<method>-<data>-<time>)")
    r.add_argument("--train-size", type=COUNT, help="train on a fixed class-balanced subset of N images (limited-"
                                                    "data runs; the same N images for every seed and method)")
    r.add_argument("--seed", type=SEED, default=None, help="seed of the weights, data order, crops and masks (default 0)")
    r.add_argument("--resume", help="continue the run in this directory (or checkpoint.pt) exactly where it stopped")
    r.add_argument("--ckpt-every", type=COUNT, help="write checkpoint.pt every N optimizer steps (default 500) and at the end")
    r.add_argument("--eval-every", type=COUNT, help="test metrics every N epochs (default: a tenth of the run)")
    r.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=None,
                   help="linear probe, k-NN and test accuracy at the end (default on)")
    r.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU; fp16 uses a grad scaler)")
    r.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    r.add_argument("--workers", type=NATURAL, help="DataLoader workers (default: 8 for folder data, else 0)")


def cmd_train(args):
    if args.method is None and not args.resume:
        raise BadInput(f"train needs --method: {', '.join(METHODS)} (sup: a supervised ViT; rcmae: MAE + an EMA "
                       f"teacher; ssat: classification + MAE as an auxiliary task; moco: MoCo v3, contrastive)")
    args.init = args.layer_decay = args.drop_path = args.global_pool = None
    args.seed = 0 if args.seed is None and not args.resume else args.seed
    train(args)


def cmd_finetune(args):
    """Fine-tune = supervised training from a pre-trained encoder with layer-wise lr decay."""
    if not args.resume:
        ckpt = read_checkpoint(checkpoint_path(args.ckpt))
        if ckpt.get("format") == CKPT_FORMAT:   # by default, the pre-trained run's model and data
            for k in ("model", "img_size", "data", "data_dir", "train_size"):
                if getattr(args, k) is None:
                    setattr(args, k, ckpt["args"].get(k))
    args.method, args.init = "sup", None if args.resume else checkpoint_path(args.ckpt)
    args.seed = 0 if args.seed is None and not args.resume else args.seed
    for k in ("mask_ratio", "norm_pix_loss", "gamma", "ema_momentum", "ema_schedule", "teacher_mask", "lam",
              "tau", "random_patch_projection"):
        setattr(args, k, None)
    train(args)


def load_run(path: str, data: str | None = None, data_dir: str | None = None, ckpt: dict | None = None):
    """A trained mimland run: (model in eval mode, checkpoint, config, data, run arguments)."""
    path = checkpoint_path(path)
    ckpt = ckpt or read_checkpoint(path)
    if ckpt.get("format") != CKPT_FORMAT:
        raise BadInput(f"{path} is not a mimland run checkpoint (official MAE / RC-MAE / timm weights: use "
                       f"`finetune --ckpt` or `probe --ckpt` with --model)")
    a = {**ckpt["args"], **{k: v for k, v in (("data", data), ("data_dir", data_dir)) if v is not None}}
    cfg = ViTConfig(**ckpt["config"])
    d = limit_train(load_data(a["data"], a.get("data_dir"), cfg), a.get("train_size"))
    if d.chans != cfg.in_chans:
        raise BadInput(f"{a['data']} has {d.chans}-channel images; the run was trained on {cfg.in_chans} channels")
    d.mean, d.std = tuple(ckpt["data_stats"]["mean"]), tuple(ckpt["data_stats"]["std"])
    model = build_model(ckpt["method"], cfg, **method_kwargs(ckpt["method"], a))
    load_pretrained(model, ckpt)
    return model.eval(), ckpt, cfg, d, a


def need_masked(ckpt, command: str):
    if ckpt["method"] not in MIM_METHODS:
        raise BadInput(f"{command} needs a masked model ({', '.join(MIM_METHODS)}); this checkpoint is a "
                       f"'{ckpt['method']}' run")


def finish_command(command: str, summary: str, record: dict, path: str | None, as_json: bool) -> None:
    """How an analysis command ends: the full record to `path` (JSON), and on the terminal one summary line
    naming the files, or with --json the record itself."""
    if path:
        atomic_write_text(path, json.dumps(record, indent=2))
    print(json.dumps(record) if as_json else f"mimland {command}: {summary}" + (f"; -> {path}" if path else ""))


def cmd_eval(args):
    model, ckpt, cfg, data, a = load_run(args.ckpt, args.data, args.data_dir)
    device = resolve_device(args.device)
    if data.num_classes != cfg.num_classes and hasattr(model, "head"):
        raise BadInput(f"{a['data']} has {data.num_classes} classes; the run's head has {cfg.num_classes}")
    metrics = evaluate(model.to(device), ckpt["method"], data, cfg, device, a)
    record = {"ckpt": args.ckpt, "method": ckpt["method"], "data": a["data"], "step": ckpt["step"], **metrics}
    finish_command("eval", f"{ckpt['method']} at step {ckpt['step']} on the {a['data']} test set: " +
                   ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                   record, os.path.join(run_directory(args.ckpt), "eval.json"), args.json)


def cmd_probe(args):
    """Linear probe and k-NN on frozen features of a run, an official checkpoint or a random encoder. On a
    run, the head goes to RUN/<--probe-file> (default probe.pt, the head `landscape --loss probe` reads) and
    the numbers beside it (.json)."""
    device = resolve_device(args.device)
    name = args.probe_file or "probe.pt"
    run_dir, ckpt = None, None
    if args.ckpt:
        ckpt = read_checkpoint(checkpoint_path(args.ckpt))
    if args.random_init or (ckpt is not None and ckpt.get("format") != CKPT_FORMAT):
        a = {"model": args.model, "data": args.data or "digits", "data_dir": args.data_dir, "img_size": args.img_size}
        cfg, data = run_config(a)
        torch.manual_seed(args.seed)
        net, which = ViT(cfg), "random-init"
        if ckpt is not None:
            report = load_pretrained(net, ckpt, strict=False)
            if report["missing"] or report["mismatched"]:
                raise BadInput(f"{args.ckpt} does not hold a {a['model'] or DEFAULT_MODEL[a['data']]} encoder; pick "
                               f"the --model preset it was trained with")
            which = "pretrained"
    elif ckpt is not None:
        model, ckpt, cfg, data, a = load_run(args.ckpt, args.data, args.data_dir, ckpt)
        run_dir = run_directory(args.ckpt)
        net, which = model, "model"
        if hasattr(model, "student"):   # RC-MAE
            net, which = (model.teacher, "teacher") if args.which == "teacher" else (model.student, "student")
    else:
        raise BadInput("probe needs --ckpt RUN (or an official checkpoint with --model) or --random-init")
    if run_dir is None and args.probe_file is not None:
        raise BadInput("--probe-file names a head saved in a mimland run; a random-init or official encoder's "
                       "probe is not saved: drop --probe-file")
    net = net.to(device).eval()
    feats = frozen_features(net.features, data, cfg.img_size, device)
    knn = knn_accuracy(*feats, data.num_classes, k=args.k)
    probe = {**RECIPES[args.recipe]["probe"], **{k: v for k, v in (("epochs", args.epochs), ("blr", args.blr),
                                                                  ("batch_size", args.batch_size)) if v is not None}}
    acc, head = linear_probe(*feats, data.num_classes, probe["epochs"], probe["blr"], probe["batch_size"],
                             seed=args.seed, max_steps=None if args.epochs else probe.get("max_steps"))   # --epochs: all
    out = {"features": which, "data": data.name, "probe_acc": acc, "knn_acc": knn}
    if run_dir:
        atomic_save({"head": head.state_dict(), "features": which, "probe_acc": acc}, os.path.join(run_dir, name))
    finish_command("probe", f"{which} features on {data.name}: linear probe {acc:.4f}, k-NN {knn:.4f} (k = {args.k})"
                   + (f"; head -> {os.path.join(run_dir, name)}" if run_dir else ""), out,
                   os.path.join(run_dir, name.removesuffix(".pt") + ".json") if run_dir else None, args.json)


def cmd_recon(args):
    model, ckpt, cfg, data, a = load_run(args.ckpt, args.data, args.data_dir)
    need_masked(ckpt, "recon")
    device = resolve_device(args.device)
    net = model.student if args.which == "student" and hasattr(model, "student") else model.encoder
    ratio = args.mask_ratio or a["mask_ratio"]
    out = args.out or os.path.join(run_directory(args.ckpt), "recon.png")
    which = f"the RC-MAE {args.which}" if hasattr(model, "student") else ckpt["method"]
    plot_reconstructions(net.to(device), data, cfg, device, out, ratio, args.seed, args.n,
                         title=f"{os.path.basename(run_directory(args.ckpt))} ({which}, step {ckpt['step']})")
    print(f"mimland recon: wrote {out}")


def landscape_problem(run: str, kind: str, n_images: int, split: str, device, chunk: int = 256,
                      probe_name: str = "probe.pt"):
    """(network, loss_fn(network), info) for a landscape or the Hessian of a run, on the first n_images
    of a split without augmentation and with fixed masks. The network's trainable parameters are exactly
    those the loss uses: kind 'pretrain' (the method's own loss; RC-MAE's teacher and MoCo's momentum branch
    held fixed; MoCo on two fixed views, the other images of each chunk its negatives), 'cls'
    (cross-entropy of the sup / SSAT head), 'probe' (the encoder with its trained linear probe, RUN/probe_name;
    info names the head's file and the start of its SHA-256, so a surface never resumes with another head)."""
    model, ckpt, cfg, data, a = load_run(run)
    method = ckpt["method"]
    ds = data.train if split == "train" else data.test
    u8, y = ds.__getitems__(list(range(min(n_images, len(ds)))))
    imgs, y = eval_view(u8.to(device), data, cfg.img_size), y.to(device)
    g = lambda s: step_generator(a["seed"], 0, s, device)                                   # noqa: E731
    noise = torch.rand(len(y), cfg.num_patches, generator=g("landscape-mask"), device=device)
    t_noise = torch.rand(len(y), cfg.num_patches, generator=g("landscape-teacher-mask"), device=device)
    head_id = {}   # which probe head ('probe' only)
    if kind == "pretrain":
        x = fixed_views(u8.to(device), lambda s: g("landscape-" + s), a, data, cfg.img_size) if method == "moco" \
            else imgs
        net, loss_fn, _ = pretraining_loss(model, Batch(x, y, noise, t_noise), chunk)
    elif kind == "cls":
        if not hasattr(model, "head"):
            raise BadInput(f"--loss cls needs a classifier (sup or ssat); this run is '{method}'")
        net, loss_fn, _ = classification_loss(model, imgs, y, chunk)
    elif kind == "probe":
        run_dir = run_directory(run)
        path = os.path.join(run_dir, probe_name)
        if not os.path.isfile(path):
            flag = "" if probe_name == "probe.pt" else f" --probe-file {probe_name}"
            raise BadInput(f"no linear probe {probe_name} in {run_dir}: run `python mimland.py probe --ckpt {run}{flag}` first")
        saved = read_checkpoint(path)
        with open(path, "rb") as f:
            head_id = {"probe_file": probe_name, "probe_sha256": hashlib.sha256(f.read()).hexdigest()[:16]}
        encoder = model.student if saved["features"] == "student" else model.encoder
        head = probe_head(cfg.dim, cfg.num_classes)
        head.load_state_dict(saved["head"])
        net, loss_fn, _ = probe_loss(encoder, head, imgs, y, chunk)
    else:
        raise BadInput(f"unknown --loss {kind!r}: choose pretrain, probe or cls")
    info = {"run": os.path.abspath(run), "method": method, "step": ckpt["step"], "loss": kind, "data": data.name,
            "split": split, "images": len(y), "mask_seed": a["seed"], **head_id}
    return net.to(device).eval(), loss_fn, info


def loss_name(args) -> str:
    """The loss in the names of the files landscape and hessian write: probe losses by their head's file."""
    return args.probe_file.removesuffix(".pt") if args.loss == "probe" else args.loss


def saved_surface(prefix: str, meta: dict, points: int, rank: int) -> torch.Tensor:
    """[points] of the surface saved at prefix.npz with the same settings (NaN where not computed yet), or all
    NaN: a surface cut short continues where it stopped."""
    import numpy as np
    surface = torch.full((points,), float("nan"))
    if os.path.isfile(prefix + ".npz"):
        with np.load(prefix + ".npz") as z:
            old = json.loads(str(z["meta"]))
            if {k: v for k, v in old.items() if k != "seconds"} == meta:
                surface = torch.from_numpy(z["surface"]).flatten().float()
            elif rank == 0:
                differ = ", ".join(k for k in meta if old.get(k) != meta[k])
                print(f"mimland landscape: {prefix}.npz holds another surface ({differ} differ); computing afresh",
                      file=sys.stderr)
    return surface


def save_surface(prefix: str, xs, ys, surface, meta: dict, final: bool) -> dict:
    """prefix.npz, replaced whole: coordinates, the surface so far, settings and, once final, its metrics."""
    import numpy as np
    s = surface.view(len(xs), -1) if ys is not None else surface
    metrics = surface_metrics(s, xs, ys) if final else {}
    buf = f"{prefix}.npz.tmp{os.getpid()}.npz"
    np.savez(buf, xs=xs.numpy(), ys=(ys if ys is not None else xs).numpy(), surface=s.numpy(),
             meta=json.dumps(meta), metrics=json.dumps(metrics))
    os.replace(buf, prefix + ".npz")
    return metrics


def compute_surface(run: str, args, device, rank: int = 0, world: int = 1) -> tuple:
    """The surface of one run, written to an .npz as it goes (saved_surface resumes it); under torchrun each
    round of points is split over the processes and rank 0 gathers and writes. -> (xs, ys, surface, metrics,
    path prefix, info)."""
    net, loss_fn, info = landscape_problem(run, args.loss, args.data_size, args.split, device,
                                           probe_name=args.probe_file)
    xs = torch.linspace(-args.range, args.range, args.grid)
    ys = xs.clone() if args.dim == 2 else None
    gen = torch.Generator().manual_seed(args.seed)
    directions = [filter_normalized_direction(net, gen, args.ignore) for _ in range(args.dim)]
    prefix = os.path.join(run_directory(run), f"landscape-{loss_name(args)}-{args.dim}d" +
                          (f"-seed{args.seed}" if args.seed else ""))          # one file per directions seed
    meta = {**info, "grid": args.grid, "range": args.range, "dim": args.dim, "direction_seed": args.seed,
            "ignore": args.ignore, "filter_normalized": True}
    coords = grid_coords(xs, ys)
    surface = saved_surface(prefix, meta, len(coords), rank)
    todo = torch.nonzero(surface.isnan()).flatten()
    from tqdm import tqdm
    bar = tqdm(total=len(coords), initial=len(coords) - len(todo), desc=f"{info['method']} {args.loss}",
               unit="pt", disable=rank != 0, dynamic_ncols=True)
    evaluator = GridEvaluator(net, loss_fn, directions, batch_points=args.points_per_batch, compiled=args.compile)
    t0, per_round = time.perf_counter(), (evaluator.batch_points or 8) * world * max(1, args.rounds_per_save)
    save = lambda final: save_surface(prefix, xs, ys, surface, {**meta, "seconds": time.perf_counter() - t0},   # noqa: E731
                                      final) if rank == 0 else None
    stop = StopFlag()
    try:
        for start in range(0, len(todo), per_round):
            chunk = todo[start:start + per_round]
            vals = torch.zeros(len(chunk))
            if len(chunk[rank::world]):
                vals[rank::world] = evaluator(coords[chunk[rank::world]])
            if world > 1:
                vals = vals.to(device)
                torch.distributed.all_reduce(vals)
                vals = vals.cpu()
            surface[chunk] = vals
            bar.update(len(chunk))
            save(False)
            if stop.requested:
                raise RunStopped(f"interrupted: {int((~surface.isnan()).sum())}/{len(coords)} points saved in "
                                 f"{prefix}.npz; run the same command again to finish", 130)
    finally:
        stop.restore()
        bar.close()
    metrics = save(True)
    return xs, ys, surface.view(len(xs), -1) if ys is not None else surface, metrics, prefix, info


ANALYSES = {"attention": (attention_distance, attention_entropy), "features": (feature_variance,), "gradients": ()}
ANALYSIS_LIST = checked(lambda text: text.split(","), lambda v: set(v) <= set(ANALYSES),
               f"a comma-separated list of {', '.join(ANALYSES)}")


def gradient_record(model: RCMAE, data, cfg: ViTConfig, device, batches: int = 4, batch: int = 32) -> dict:
    """gradient_correction and mask_gradient_angles over `batches` batches of test images, as [mean, standard
    deviation]. X_prev is a batch; its probes: the same images and masks, the same images with new masks,
    other test images of the same classes, random other test images, Gaussian noise images."""
    y = data.test.labels
    if len(y) < 2 * batches * batch:
        raise BadInput(f"--what gradients needs {2 * batches * batch} test images; {data.name} has {len(y)}")
    images = lambda rows: eval_view(data.test.__getitems__(rows.tolist())[0].to(device), data, cfg.img_size)  # noqa: E731
    runs = []
    for b in range(batches):
        g = step_generator(0, b, "analyze", device)
        noise = lambda: torch.rand(batch, cfg.num_patches, generator=g, device=device)     # noqa: E731
        rows = torch.arange(b * batch, (b + 1) * batch)
        same_class = torch.stack([torch.nonzero((y == y[r]) & (torch.arange(len(y)) != r))[0, 0] for r in rows])
        x, n = images(rows), noise()
        probes = {"same images and masks": (x, n), "same images, new masks": (x, noise()),
                  "other images, same classes": (images(same_class), noise()),
                  "other images": (images(rows + batches * batch), noise()),
                  "noise images": (torch.randn(x.shape, generator=g, device=device), noise())}
        runs.append({**gradient_correction(model, x, n, probes),
                     "mask angles": mask_gradient_angles(model.eval(), x, n, noise())})
    stats = lambda v: [float(torch.tensor(v).mean()), float(torch.tensor(v).std())]          # noqa: E731
    return {name: {k: stats([r[name][k] for r in runs]) for k in runs[0][name]} for name in runs[0]}


def analyze_run(run: str, what: list, n_images: int, device, chunk: int = 32) -> dict:
    """The analyses of one run on the first n_images test images, chunk by chunk (attention maps are
    [N, heads, T, T] per block), averaged over images -> its record."""
    model, ckpt, cfg, data, a = load_run(run)
    model.to(device)
    u8, _ = data.test.__getitems__(list(range(min(n_images, len(data.test)))))
    fns = [fn for w in what for fn in ANALYSES[w]]
    sums = {fn.__name__: 0.0 for fn in fns}
    if "gradients" in what and not isinstance(model, RCMAE):
        raise BadInput(f"--what gradients measures RC-MAE's teacher correction; {run} is a '{ckpt['method']}' run")
    for i in range(0, len(u8), chunk):
        imgs = eval_view(u8[i:i + chunk].to(device), data, cfg.img_size)
        trace = encoder_trace(model, imgs) if fns else None                 # one encoder pass for all of them
        for fn in fns:
            sums[fn.__name__] = sums[fn.__name__] + fn(model, imgs, trace).cpu() * len(imgs)
    grads = {"gradients": gradient_record(model, data, cfg, device)} if "gradients" in what else {}
    return {"run": os.path.abspath(run), "method": ckpt["method"], "step": ckpt["step"], "data": data.name,
            "images": len(u8), **{k: (v / len(u8)).tolist() for k, v in sums.items()}, **grads}


def chosen_runs(args, command: str, one: str) -> list:
    """The runs of --ckpt RUN or --compare RUN_A RUN_B ..., which exclude each other."""
    if args.ckpt and args.compare:
        raise BadInput(f"{command} takes --ckpt RUN ({one}) or --compare RUN_A RUN_B ... (several), not both")
    if not (args.ckpt or args.compare):
        raise BadInput(f"{command} needs --ckpt RUN or --compare RUN_A RUN_B ...")
    return args.compare or [args.ckpt]


def cmd_analyze(args):
    """Attention distance and entropy per block and head, feature variance per block: one run, or several
    on one figure."""
    runs = chosen_runs(args, "analyze", "one run")
    device, records = resolve_device(args.device), []
    by_block = lambda v: ", ".join(f"{sum(x) / len(x) if isinstance(x, list) else x:.3g}" for x in v)  # noqa: E731
    per_head = {"attention_distance", "attention_entropy"}
    for run in runs:
        rec = analyze_run(run, args.what, args.data_size, device)
        plot_analysis([rec], os.path.join(run_directory(run), "analysis.png"),
                      f"{os.path.basename(run_directory(run))} ({rec['method']})")
        summary = "; ".join([f"{fn.__name__.replace('_', ' ')} by block{' (mean over heads)' if fn.__name__ in per_head else ''}"
                             f" {by_block(rec[fn.__name__])}" for w in args.what for fn in ANALYSES[w]] +
                            [f"correction cosine, {k}: {v['correction_cosine'][0]:.3f}" for k, v in
                             rec.get("gradients", {}).items() if "correction_cosine" in v])
        finish_command("analyze", f"{run} ({rec['method']}, {rec['images']} test images): {summary}; figure "
                       f"analysis.png", rec, os.path.join(run_directory(run), "analysis.json"), args.json)
        records.append(rec)
    if args.compare:
        out = args.out or "analysis-compare.png"
        plot_analysis(records, out, f"{len(records)} runs, {records[0]['images']} test images each")
        print(f"mimland analyze: wrote {out}")


def cmd_landscape(args):
    """Filter-normalized loss surfaces of one run (--ckpt) or several side by side (--compare)."""
    runs = chosen_runs(args, "landscape", "one surface")
    rank, world, device = setup_distributed(args.device)
    items = []
    for run in runs:
        xs, ys, s, metrics, prefix, info = compute_surface(run, args, device, rank, world)
        if rank == 0:
            title = f"{os.path.basename(os.path.normpath(run))} ({info['method']}): {args.loss} loss"
            figures = plot_landscape(xs, ys, s, prefix, title) if args.figures else []
            shape = f"{len(xs)} x {len(ys)} grid" if ys is not None else f"{len(xs)}-point line"
            finish_command("landscape", f"{run} ({info['method']}, {args.loss} loss, {shape}): centre loss "
                           f"{metrics['centre_loss']:.4g}, basin width {metrics['basin_width_0.1']:.3g} (rise 0.1) / "
                           f"{metrics['basin_width_1.0']:.3g} (rise 1.0)" +
                           (f", convex share {metrics['convex_share']:.2f}" if "convex_share" in metrics else "") +
                           f"; figures {', '.join(os.path.basename(f) for f in figures) or 'none'}",
                           {**info, "direction_seed": args.seed, "grid": args.grid, "range": args.range,
                            "npz": prefix + ".npz", "figures": figures, **metrics}, prefix + ".json", args.json)
            items.append((f"{info['method']} ({os.path.basename(os.path.normpath(run))})", xs, ys, s))
    if rank == 0 and args.compare and args.dim == 2:
        out = args.out or f"landscape-compare-{loss_name(args)}.png"
        plot_landscape_comparison(items, out, f"{args.loss} loss, filter-normalized directions (seed {args.seed})")
        print(f"mimland landscape: wrote {out}")


def cmd_hessian(args):
    """Curvature numbers at a run's weights: top eigenvalues, lambda_min and |lambda_min/lambda_max|,
    Hutchinson trace, SLQ spectral density and its negative share."""
    device = resolve_device(args.device)
    net, loss_fn, info = landscape_problem(args.ckpt, args.loss, args.data_size, args.split, device,
                                           probe_name=args.probe_file)
    from tqdm import tqdm
    at_most = args.top_k * args.iters + args.slq_steps * (1 + args.slq_runs) + args.trace_samples   # products
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    with tqdm(total=at_most, unit="Hv", dynamic_ncols=True) as bar:   # Hessian-vector products, at most
        H = Hessian(net, loss_fn, progress=bar)
        phase = lambda name: bar.set_description(f"{info['method']} {args.loss} Hessian: {name}")  # noqa: E731
        phase("top eigenvalues")
        top, _ = top_eigenvalues(H, args.top_k, args.iters, args.tol, g)
        phase("lambda_min, lambda_max")
        ext = extreme_eigenvalues(H, args.slq_steps, g)
        phase("trace")
        trace, trace_se = hutchinson_trace(H, args.trace_samples, g)
        phase("spectral density")
        slq = slq_density(H, args.slq_steps, args.slq_runs, g)
        bar.total = bar.n                        # power iteration and Lanczos stopped early: end at 100%
        phase("done")
    out = {**info, "parameters": H.dim, "top_eigenvalues": top.tolist(), **ext, "trace": trace,
           "trace_stderr": trace_se, "negative_share": slq["negative_share"], "negative_mass": slq["negative_mass"],
           "seconds": round(time.perf_counter() - t0, 1)}
    path = os.path.join(run_directory(args.ckpt), f"hessian-{loss_name(args)}")
    if args.figures:
        plot_spectrum(slq, path + ".png", f"{os.path.basename(run_directory(args.ckpt))} ({info['method']}): Hessian "
                                          f"of the {args.loss} loss")
    finish_command("hessian", f"{args.ckpt} ({info['method']}, {args.loss} loss, {H.dim:,} parameters, "
                   f"{bar.n} Hessian-vector products, {out['seconds']:g} s): lambda_max {ext['lambda_max']:.4g}, "
                   f"lambda_min {ext['lambda_min']:.4g}, |min / max| {ext['ratio_min_max']:.3g}, trace {trace:.4g} "
                   f"+- {trace_se:.2g}, negative share {slq['negative_share']:.2f}" + (f"; figure {path}.png" if args.figures else ""),
                   {**out, "slq_nodes": slq["nodes"].tolist(), "slq_weights": slq["weights"].tolist()},
                   path + ".json", args.json)


def train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a method end to end (torchrun for several processes)")
    add_train_flags(t)
    t.set_defaults(run=cmd_train)


def finetune_parser(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a pre-trained encoder end to end with layer-wise lr decay")
    f.add_argument("--ckpt", required=True, help="a mimland run (RC-MAE: its teacher) or an official MAE / "
                                                 "RC-MAE / timm checkpoint (give its --model)")
    add_train_flags(f, finetune=True)
    f.set_defaults(run=cmd_finetune)


def probe_parser(sub) -> None:
    pr = sub.add_parser("probe", help="linear probe (BatchNorm + Linear, LARS) and k-NN on frozen features")
    pr.add_argument("--ckpt", help="a mimland run, or an official encoder checkpoint with --model")
    pr.add_argument("--random-init", action="store_true", help="probe a randomly initialized encoder (baseline)")
    pr.add_argument("--model", choices=PRESETS, help="preset for --random-init or an official checkpoint")
    pr.add_argument("--img-size", type=COUNT, help="input resolution for --random-init (default: the preset's)")
    pr.add_argument("--which", choices=("teacher", "student"), default="teacher",
                    help="RC-MAE network to probe (default teacher, as the reference)")
    pr.add_argument("--recipe", choices=RECIPES, default="quick",
                    help="probe defaults: quick (300 epochs but at most 7020 steps, blr 6.4, batch 256) or "
                         "reference (90, 0.1, 16384)")
    pr.add_argument("--epochs", type=COUNT, help="probe epochs, all of them run (quick 300, or fewer to stay within "
                                                 "7020 steps; reference 90)")
    pr.add_argument("--blr", type=POSITIVE, help="LARS base lr, lr = blr * batch / 256 (quick 6.4; reference 0.1)")
    pr.add_argument("--batch-size", type=checked(int, lambda v: v >= 2, "an integer of at least 2 (BatchNorm needs two)"),
                    help="probe batch, capped at the data size (quick 256; reference 16384)")
    pr.add_argument("--k", type=COUNT, default=20, help="neighbours for k-NN (20)")
    pr.add_argument("--probe-file", type=PROBE_FILE, metavar="NAME",
                    help="file name in the run directory for the head and, beside it, the numbers (.json); "
                         "default probe.pt, which `landscape --loss probe` reads")
    pr.add_argument("--seed", type=SEED, default=0)
    add_data_flags(pr, from_ckpt=True)
    pr.add_argument("--json", action="store_true", help="print the full record as JSON instead of the summary line")
    pr.set_defaults(run=cmd_probe)


def eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="test loss (fixed masks), head accuracy and k-NN accuracy of a run")
    e.add_argument("--ckpt", required=True, help="run directory or its checkpoint.pt")
    add_data_flags(e, from_ckpt=True)
    e.add_argument("--json", action="store_true", help="print the full record as JSON instead of the summary line")
    e.set_defaults(run=cmd_eval)


def recon_parser(sub) -> None:
    rc = sub.add_parser("recon", help="original / masked / reconstruction figure of a masked model")
    rc.add_argument("--ckpt", required=True, help="run directory or its checkpoint.pt")
    rc.add_argument("--out", type=OUT_FILE, help="PNG path (default RUN/recon.png)")
    rc.add_argument("--n", type=COUNT, default=8, help="images (default 8)")
    rc.add_argument("--mask-ratio", type=in_interval("(0, 1)"), help="default: the run's")
    rc.add_argument("--which", choices=("teacher", "student"), default="teacher", help="RC-MAE network (default teacher)")
    rc.add_argument("--seed", type=SEED, default=0, help="seed of the masks")
    add_data_flags(rc, from_ckpt=True)
    rc.set_defaults(run=cmd_recon)


def add_problem_flags(q) -> None:
    """The loss, data and directions flags that landscape and hessian share."""
    q.add_argument("--loss", choices=("pretrain", "probe", "cls"), default="pretrain",
                   help="pretrain: the method's own loss (RC-MAE: reconstruction + consistency, teacher fixed); "
                        "probe: cross-entropy through the trained linear probe (RUN/probe.pt); cls: the "
                        "sup / SSAT classifier")
    q.add_argument("--probe-file", type=PROBE_FILE, default="probe.pt", metavar="NAME",
                   help="--loss probe: the head's file in each run directory (default probe.pt, the one "
                        "training writes; `probe --probe-file NAME` writes others)")
    q.add_argument("--data-size", type=COUNT, default=512, help="images the loss averages over (default 512)")
    q.add_argument("--split", choices=("train", "test"), default="train", help="which split (default train)")
    q.add_argument("--seed", type=SEED, default=0, help="seed of the random directions / probe vectors")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="print the full record as JSON instead of the summary line")
    q.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the PNGs (default on; --no-figures: only the .json / .npz, as the studies do)")


def landscape_parser(sub) -> None:
    la = sub.add_parser("landscape", help="filter-normalized loss surface (.npz + contour, filled contour, 3-D PNGs)")
    la.add_argument("--ckpt", help="run directory or its checkpoint.pt")
    la.add_argument("--compare", nargs="+", metavar="RUN", help="several runs side by side, one colour scale and "
                                                                 "directions seed")
    add_problem_flags(la)
    la.add_argument("--dim", type=int, choices=(1, 2), default=2, help="1-D curve or 2-D surface (default 2)")
    la.add_argument("--grid", type=checked(int, lambda v: v >= 3, "an integer of at least 3"), default=51,
                    help="points per axis (51, reference)")
    la.add_argument("--range", type=POSITIVE, default=1.0, help="coordinates in [-range, range] (1.0, reference)")
    la.add_argument("--ignore", choices=("biasbn", "copy"), default="biasbn",
                    help="1-D parameters: not perturbed (biasbn, reference default) or along themselves (copy)")
    la.add_argument("--points-per-batch", type=COUNT, help="grid points per call, 1 for one at a time (default: both "
                                                         "paths timed on the first points, the faster kept)")
    la.add_argument("--rounds-per-save", type=COUNT, default=4, help="batches of points between saves of the .npz")
    la.add_argument("--compile", action="store_true", help="torch.compile the per-call loss once per surface "
                                                           "(fuses the element-wise work; the compile takes tens of seconds)")
    la.add_argument("--out", type=OUT_FILE, help="comparison figure path (default landscape-compare-<loss>.png)")
    la.set_defaults(run=cmd_landscape)


def hessian_parser(sub) -> None:
    he = sub.add_parser("hessian", help="top eigenvalues, |lambda_min/lambda_max|, trace, SLQ density")
    he.add_argument("--ckpt", required=True, help="run directory or its checkpoint.pt")
    add_problem_flags(he)
    he.add_argument("--top-k", type=COUNT, default=3, help="eigenvalues of largest magnitude (3)")
    he.add_argument("--iters", type=COUNT, default=100, help="power iterations at most (100, PyHessian)")
    he.add_argument("--tol", type=POSITIVE, default=1e-3, help="relative tolerance of power iteration (1e-3)")
    he.add_argument("--trace-samples", type=COUNT, default=50, help="Hutchinson Rademacher samples (50)")
    he.add_argument("--slq-steps", type=COUNT, default=64, help="Lanczos steps per SLQ run and for lambda_min/max (64)")
    he.add_argument("--slq-runs", type=COUNT, default=4, help="SLQ runs (4)")
    he.set_defaults(run=cmd_hessian)


def analyze_parser(sub) -> None:
    an = sub.add_parser("analyze", help="attention distance and entropy per head, feature variance per block")
    an.add_argument("--ckpt", help="run directory or its checkpoint.pt")
    an.add_argument("--compare", nargs="+", metavar="RUN", help="several runs on one figure")
    an.add_argument("--what", type=ANALYSIS_LIST, default=["attention", "features"],
                    help="comma-separated: attention (distance in pixels, entropy), features (variance), gradients "
                         "(RC-MAE runs: the teacher's correction, the mask angles); default attention,features")
    an.add_argument("--data-size", type=COUNT, default=256, help="test images averaged over (default 256)")
    an.add_argument("--out", type=OUT_FILE, help="comparison figure path (default analysis-compare.png)")
    an.add_argument("--device", default="auto")
    an.add_argument("--json", action="store_true", help="print the full record as JSON instead of the summary line")
    an.set_defaults(run=cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mimland", description="Masked image modeling with ViTs: MAE, RC-MAE, SSAT, a supervised "
                                           "ViT and MoCo v3; training, probes, loss landscapes, curvature.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (train_parser, finetune_parser, probe_parser, eval_parser, recon_parser, landscape_parser,
                hessian_parser, analyze_parser):
        add(sub)
    p.commands = sub.choices   # name -> its parser, which refuses the flags it does not know
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = args.run
    del args.run, args.command   # the rest are the command's settings (saved with a run)
    keep_freed_memory()
    try:
        run(args)
    except (BadInput, RunStopped, KeyboardInterrupt) as e:   # Ctrl-C outside the loop: it stops at a step itself
        code, msg = (2, f"error: {e}") if isinstance(e, BadInput) else (130, "interrupted") \
            if isinstance(e, KeyboardInterrupt) else (e.code, str(e))
        if int(os.environ.get("RANK", 0)) == 0:   # under torchrun every process would say the same
            print(f"mimland {run.__name__[4:]}: {msg}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
