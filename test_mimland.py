"""mimland's tests: tiny models, few steps, 2 CPU cores. Run: python -m pytest -q"""
import copy
import math
import os
import pathlib
import re
from unittest import mock

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bench as Bn
import mimland as M

torch.set_num_threads(2)
FAST = settings(max_examples=25, deadline=None)


def tiny_cfg(**kw):
    base = dict(img_size=8, patch_size=2, in_chans=3, dim=16, depth=2, heads=2, num_classes=5,
                decoder_dim=8, decoder_depth=1, decoder_heads=2)
    return M.ViTConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------
# building blocks


@FAST
@given(n=st.integers(1, 3), c=st.integers(1, 3), grid=st.integers(1, 4), p=st.integers(1, 4))
def test_patchify_layout_and_round_trip(n, c, grid, p):
    imgs = torch.randn(n, c, grid * p, grid * p)
    x = M.patchify(imgs, p)
    assert x.shape == (n, grid * grid, p * p * c)
    for b in range(n):  # explicit loop: patches row-major, inside a patch (row, column, channel)
        for i in range(grid):
            for j in range(grid):
                for pi in range(p):
                    for pj in range(p):
                        for ch in range(c):
                            assert x[b, i * grid + j, (pi * p + pj) * c + ch] == imgs[b, ch, i * p + pi, j * p + pj]
    assert torch.equal(M.unpatchify(x, p), imgs)


@FAST
@given(n=st.integers(1, 3), c=st.integers(1, 3), grid=st.integers(1, 4), p=st.integers(1, 4),
       dim=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_patch_embed_equals_the_reference_conv(n, c, grid, p, dim, seed):
    torch.manual_seed(seed)
    pe, imgs = M.PatchEmbed(p, c, dim), torch.randn(n, c, grid * p, grid * p)
    ref = F.conv2d(imgs, pe.proj.weight, pe.proj.bias, stride=p).flatten(2).transpose(1, 2)   # [N, L, D]
    torch.testing.assert_close(pe(pe.patches(imgs)), ref, rtol=1e-5, atol=1e-5)


@FAST
@given(n=st.integers(1, 4), L=st.integers(1, 50), d=st.integers(1, 3), ratio=st.floats(0.01, 0.99),
       seed=st.integers(0, 2 ** 16))
def test_random_masking_properties(n, L, d, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, d, generator=g)
    noise = torch.rand(n, L, generator=g)
    kept, mask, ids_restore = M.random_masking(x, ratio, noise)
    keep = int(L * (1 - ratio))
    assert kept.shape == (n, keep, d)
    assert torch.equal(mask.sum(1), torch.full((n,), float(L - keep)))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_restore[torch.arange(n)[:, None], ids_shuffle], torch.arange(L).expand(n, L))
    for b in range(n):
        smallest = set(torch.topk(noise[b], keep, largest=False).indices.tolist())
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == smallest
        # kept tokens are those patches, in order of increasing noise
        order = sorted(smallest, key=lambda i: noise[b, i].item())
        assert torch.equal(kept[b], x[b, order])


@FAST
@given(quarter=st.integers(1, 8), grid=st.integers(1, 6), cls=st.booleans())
def test_sincos_pos_embed_matches_formula(quarter, grid, cls):
    D = 4 * quarter
    emb = M.sincos_pos_embed_2d(D, grid, cls_token=cls).numpy()
    want = np.zeros((grid * grid, D))
    for i in range(grid):          # row
        for j in range(grid):      # column
            for c in range(D):
                pos, cc = (j, c) if c < D // 2 else (i, c - D // 2)   # first half: column
                k = cc % (D // 4)
                angle = pos / 10000 ** (k / (D / 4))
                want[i * grid + j, c] = math.sin(angle) if cc < D // 4 else math.cos(angle)
    if cls:
        want = np.concatenate([np.zeros((1, D)), want])
    np.testing.assert_allclose(emb, want, atol=1e-6, rtol=0)


@FAST
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 8), T=st.integers(1, 10), seed=st.integers(0, 999))
def test_sdpa_attention_and_bench_explicit_form_equal_the_reference_softmax(heads, head_dim, T, seed):
    torch.manual_seed(seed)
    D = heads * head_dim
    attn = M.Attention(D, heads)
    x = torch.randn(2, T, D)
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(2, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1)
    want = (a @ v).transpose(1, 2).reshape(2, T, D) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
    with mock.patch.object(M.F, "scaled_dot_product_attention", Bn.explicit_attention):   # bench.py's variant
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_config_rejects_bad_shapes():
    with pytest.raises(M.BadInput, match="not divisible by patch size"):
        tiny_cfg(img_size=10, patch_size=4)
    with pytest.raises(M.BadInput, match="heads"):
        tiny_cfg(dim=18, heads=4)
    with pytest.raises(M.BadInput, match="unknown model preset"):
        M.preset("vit_gigantic")


# ----------------------------------------------------------------------------------------------------
# an independent implementation of the reference MAE forward (reshape/einsum, explicit attention), used
# to check mimland's models with the same weights and the same noise


def ref_pos_embed(D, G):
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(G, dtype=np.float64), np.arange(G, dtype=np.float64))  # w goes first
    emb = np.concatenate([one_d(D // 2, gw), one_d(D // 2, gh)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, D)), emb])).float()[None]


def ref_block(sd, pre, x, heads):
    N, T, D = x.shape
    h = F.layer_norm(x, (D,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-6)
    qkv = (h @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]).reshape(N, T, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
    x = x + (a @ v).transpose(1, 2).reshape(N, T, D) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
    h = F.layer_norm(x, (D,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], 1e-6)
    h = F.gelu(h @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
    return x + h @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]


def ref_mae(sd, cfg, imgs, mask_ratio, noise, norm_pix):
    p, C, N = cfg.patch_size, cfg.in_chans, imgs.shape[0]
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + ref_pos_embed(cfg.dim, cfg.grid)[:, 1:]
    L, D = x.shape[1], x.shape[2]
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = sd["cls_token"] + ref_pos_embed(cfg.dim, cfg.grid)[:, :1]
    x = torch.cat([cls.expand(N, -1, -1), x], dim=1)
    for i in range(cfg.depth):
        x = ref_block(sd, f"blocks.{i}.", x, cfg.heads)
    x = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    mt = sd["mask_token"].repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.gather(torch.cat([x[:, 1:], mt], 1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], 1) + ref_pos_embed(cfg.decoder_dim, cfg.grid)
    for i in range(cfg.decoder_depth):
        x = ref_block(sd, f"decoder_blocks.{i}.", x, cfg.decoder_heads)
    x = F.layer_norm(x, (x.shape[-1],), sd["decoder_norm.weight"], sd["decoder_norm.bias"], 1e-6)
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    h = imgs.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(N, C, h, p, h, p)).reshape(N, h * h, p * p * C)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_mae_equals_reference_forward(norm_pix, ratio):
    torch.manual_seed(0)
    cfg = tiny_cfg(depth=2, decoder_depth=2)
    model = M.MAE(cfg, norm_pix_loss=norm_pix).eval()
    for p in model.parameters():   # non-trivial weights everywhere (biases and norms too)
        p.data.add_(0.1 * torch.randn_like(p)) if p.requires_grad else None
    imgs, noise = torch.randn(3, 3, 8, 8), torch.rand(3, cfg.num_patches)
    loss, pred, mask = model(imgs, ratio, noise)
    sd = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in model.named_parameters()}
    want_loss, want_pred, want_mask = ref_mae(sd, cfg, imgs, ratio, noise, norm_pix)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)
    # the gradients too: mimland masks the patches before embedding them, the reference after
    loss.backward()
    want_loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, sd[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_mae_loss_equals_hand_computation():
    torch.manual_seed(1)
    cfg = tiny_cfg(in_chans=1, img_size=4, patch_size=2)
    model = M.MAE(cfg, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 1, 4, 4), torch.rand(2, 4)
    loss, pred, mask = model(imgs, 0.5, noise)
    total, count = 0.0, 0
    for n in range(2):
        for patch in range(4):
            if noise[n].argsort().tolist().index(patch) < 2:   # among the 2 smallest: kept
                assert mask[n, patch] == 0
                continue
            i, j = divmod(patch, 2)
            t = imgs[n, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].flatten().double().numpy()
            t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
            total += float(((pred[n, patch].double().detach().numpy() - t) ** 2).mean())
            count += 1
    assert count == 4
    assert abs(loss.item() - total / count) < 1e-5


def test_init_follows_reference():
    torch.manual_seed(0)
    cfg = M.preset("vit_small", img_size=32, depth=2, decoder_depth=1)
    model = M.MAE(cfg)
    w = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))   # xavier uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.norm.weight == 1)
    assert abs(model.cls_token.std().item() - 0.02) < 0.005 and abs(model.mask_token.std().item() - 0.02) < 0.005
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed, ref_pos_embed(384, 2))
    conv = model.patch_embed.proj                  # its bias keeps PyTorch's Conv2d init, as the reference
    fan_in = conv.weight[0].numel()
    assert conv.bias.abs().max() <= fan_in ** -0.5 and conv.bias.abs().max() > 0.5 * fan_in ** -0.5
    assert conv.bias.std() > 0.3 * fan_in ** -0.5   # uniform in +-1/sqrt(fan_in): std 0.577/sqrt(fan_in)
    w = conv.weight.flatten(1)
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape)) and w.abs().max() > 0.9 * math.sqrt(6 / sum(w.shape))


# ----------------------------------------------------------------------------------------------------
# RC-MAE and SSAT


def test_rcmae_equals_two_reference_forwards_and_grads_reach_student_only():
    torch.manual_seed(2)
    cfg = tiny_cfg()
    model = M.RCMAE(cfg, gamma=1.0)
    with torch.no_grad():   # make the teacher differ from the student
        for name, p in model.teacher.named_parameters():
            if "pos_embed" not in name:   # the sin-cos tables stay fixed
                p.add_(0.05 * torch.randn_like(p))
    imgs, noise = torch.randn(2, 3, 8, 8), torch.rand(2, cfg.num_patches)
    loss, pred, mask, parts = model(imgs, 0.75, noise)
    rec, s_pred, s_mask = ref_mae(model.student.state_dict(), cfg, imgs, 0.75, noise, False)
    _, t_pred, _ = ref_mae(model.teacher.state_dict(), cfg, imgs, 0.75, noise, False)
    cons = (((s_pred - t_pred) ** 2).mean(-1) * s_mask).sum() / s_mask.sum()
    torch.testing.assert_close(loss, rec + cons, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts["cons"], cons.detach(), atol=1e-6, rtol=1e-5)
    assert cons.item() > 1e-4
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert not model.teacher.training
    model.train()
    assert model.student.training and not model.teacher.training


def test_rcmae_different_mask_variant_uses_its_own_teacher_mask():
    torch.manual_seed(3)
    cfg = tiny_cfg()
    same, diff = M.RCMAE(cfg), M.RCMAE(cfg, teacher_mask="different")
    diff.load_state_dict(same.state_dict())
    imgs, noise, t_noise = torch.randn(2, 3, 8, 8), torch.rand(2, 16), torch.rand(2, 16)
    _, _, _, p_same = same(imgs, 0.75, noise)
    _, _, _, p_diff = diff(imgs, 0.75, noise, teacher_noise=t_noise)
    assert p_same["cons"].item() == 0.0            # equal weights, same mask: zero consistency
    assert p_diff["cons"].item() > 0.0


def test_ema_update_moves_the_teacher_by_the_ema_formula_exactly():
    torch.manual_seed(4)
    model = M.RCMAE(tiny_cfg()).double()
    with torch.no_grad():
        for p in model.student.parameters():
            p.copy_(torch.randn_like(p))
    t0 = [p.clone() for p in model.teacher.parameters()]
    s = [p.clone() for p in model.student.parameters()]
    m = 0.9973
    model.ema_update(m)
    for t_new, t_old, s_p in zip(model.teacher.parameters(), t0, s):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s_p, atol=1e-15, rtol=1e-15)
    assert any(not torch.equal(a, b) for a, b in zip(model.teacher.parameters(), t0))


def test_momentum_schedule_is_constant_by_default_or_a_cosine_from_base_to_one():
    T = 100
    assert [M.momentum_at(t, T, 0.996) for t in (0, 50, 100)] == [0.996] * 3     # RC-MAE as its reference ran
    ms = [M.momentum_at(t, T, 0.996, "cosine") for t in range(T + 1)]
    assert ms[0] == pytest.approx(0.996) and ms[-1] == pytest.approx(1.0)
    assert ms[50] == pytest.approx(0.998)
    assert all(b >= a for a, b in zip(ms, ms[1:]))


@FAST
@given(ms=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=40))
def test_teacher_lag_is_the_mean_age_of_an_ema_of_the_step_count(ms):
    """An EMA of theta_t = t (theta_0 = 0) ends at T - (mean age); the initialization keeps prod(m)."""
    teacher = 0.0
    for t, m in enumerate(ms, 1):
        teacher = m * teacher + (1 - m) * t
    lag, init = M.teacher_lag(ms)
    assert lag == pytest.approx(len(ms) - teacher, abs=1e-9) and init == pytest.approx(math.prod(ms))
    if ms and all(m == ms[0] for m in ms) and 0 < ms[0] < 1:    # a constant m: m / (1 - m) (1 - m^T) in the sum
        m, T = ms[0], len(ms)
        assert lag == pytest.approx(sum((1 - m) * m ** k * k for k in range(T)) + m ** T * T)


def test_rcmae_updates_its_teacher_after_every_micro_batch_as_its_reference():
    """Under accumulation the reference's loop runs forward, backward, (the optimizer step on the last
    micro-batch), then the EMA, for every micro-batch: the teacher moves between micro-batches."""
    torch.manual_seed(0)
    cfg, m, lr = tiny_cfg(), 0.9, 1e-3
    model = M.RCMAE(cfg).double()                  # float64: Adam would magnify rounding in the key biases
    ref = copy.deepcopy(model)
    imgs = torch.randn(2, 4, cfg.in_chans, cfg.img_size, cfg.img_size, dtype=torch.float64)
    noise = torch.rand(2, 4, cfg.num_patches)
    opt = torch.optim.AdamW(M.param_groups(model, 0.05), lr=lr, betas=(0.9, 0.95))
    M.train_step(model, opt, [M.Batch(imgs[i], None, noise[i]) for i in range(2)], lr, m, accum=2)
    ref_opt = torch.optim.AdamW(M.param_groups(ref, 0.05), lr=lr, betas=(0.9, 0.95))
    for i in range(2):                                                     # the reference's order
        s_loss, s_pred, s_mask = ref.student(imgs[i], 0.75, noise[i])
        with torch.no_grad():
            t_pred = ref.teacher(imgs[i], 0.75, noise[i])[1]
        cons = ((s_pred - t_pred) ** 2).mean(-1)
        ((s_loss + (cons * s_mask).sum() / s_mask.sum()) / 2).backward()
        if i == 1:
            ref_opt.step()
        with torch.no_grad():
            for pt, ps in zip(ref.teacher.parameters(), ref.student.parameters()):
                pt.mul_(m).add_((1 - m) * ps)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10, msg=n)


@FAST
@given(n=st.integers(1, 5), extra=st.integers(0, 4), d=st.integers(2, 6), tau=st.floats(0.05, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_contrastive_loss_equals_a_loop_over_queries(n, extra, d, tau, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n + extra, d, generator=g, dtype=torch.float64)
    first = int(torch.randint(0, extra + 1, (1,), generator=g))
    total = 0.0
    for i in range(n):                       # -log softmax of the positive key among all keys, cosine / tau
        sims = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / tau for j in range(n + extra)]
        total += -sims[first + i] + math.log(sum(math.exp(v) for v in sims))
    assert M.contrastive_loss(q, k, tau, first).item() == pytest.approx(2 * tau * total / n, rel=1e-10)


def moco_cfg():
    return tiny_cfg(proj_hidden=12, proj_dim=6)


def test_moco_loss_is_symmetric_and_no_gradient_reaches_the_momentum_branch():
    torch.manual_seed(5)
    model = M.MoCo(moco_cfg(), tau=0.3).double()
    with torch.no_grad():   # a momentum branch that differs from the online one
        for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    views = torch.randn(2, 6, 3, 8, 8, dtype=torch.float64)
    loss = model(views)
    q = [model.predictor(model.projector(model.features(x))) for x in views]
    k = [model.momentum_projector(model.momentum_encoder.features(x)) for x in views]
    hand = M.contrastive_loss(q[0], k[1], 0.3) + M.contrastive_loss(q[1], k[0], 0.3)
    torch.testing.assert_close(loss, hand, atol=1e-12, rtol=1e-12)
    loss.backward()
    assert all(p.grad is None for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()])
    online = [p for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} >= {"patch_embed", "blocks",
                                                                                         "projector", "predictor"}
    assert all(p.grad is not None for p in online) and sum(p.grad.abs().sum() for p in online) > 0
    old = {n: p.clone() for n, p in model.named_parameters()}
    model.update_momentum(0.9)                                            # the EMA pairs each tensor with its twin
    for n, p in model.named_parameters():
        twin = n.removeprefix("momentum_encoder.").replace("momentum_projector.", "projector.")
        want = 0.9 * old[n] + 0.1 * old[twin] if twin != n else old[n]
        torch.testing.assert_close(p, want, atol=1e-15, rtol=1e-15)
    frozen = M.MoCo(moco_cfg(), random_patch_projection=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())


def test_global_batch_norm_computes_batch_norm_from_summed_statistics(monkeypatch):
    torch.manual_seed(6)
    ours, theirs, x = M.GlobalBatchNorm(5), torch.nn.BatchNorm1d(5), torch.randn(7, 5) * 3 + 1
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    import torch.distributed.nn.functional as dnf
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)   # a world of 2 whose other
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)      # process holds no rows
    monkeypatch.setattr(dnf, "all_reduce", lambda t: t.clone())
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-6, rtol=1e-6)


def test_two_views_crop_then_jitter_brightness_and_contrast():
    data = M.synthetic_data(4, 2, 8, 1, 2)
    u8 = data.train.images[:4]
    boxes = torch.tensor([[0, 0, 8, 8, 0], [1, 2, 5, 6, 1], [0, 0, 8, 8, 0], [2, 1, 6, 6, 0]] * 2).float().view(2, 4, 5)
    jitter = torch.tensor([[[0.9, 0.3, 0.7]] * 4, [[0.1, 0.25, 0.75]] * 4])   # view 1: coin off; view 2: on
    views = M.two_views(u8, boxes, jitter, data, 8)
    assert views.shape == (2, 4, 1, 8, 8)
    x = u8.float() / 255
    torch.testing.assert_close(views[0], M.normalize(M.resized_crop(x, boxes[0], 8), data))
    c = M.resized_crop(x, boxes[1], 8)
    b = (c * 0.8).clamp(0, 1)                                                # brightness 0.6 + 0.8 * 0.25
    m = b.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(views[1], M.normalize(((b - m) * 1.2 + m).clamp(0, 1), data))   # contrast 1.2


def test_ssat_loss_is_convex_combination():
    torch.manual_seed(5)
    cfg = tiny_cfg()
    model = M.SSAT(cfg, lam=0.3)
    imgs, labels, noise = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 4]), torch.rand(4, 16)
    loss, pred, mask, parts = model(imgs, labels, 0.75, noise)
    rec = M.MAE.forward(model, imgs, 0.75, noise)[0]
    ce = F.cross_entropy(model.logits(imgs), labels)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * rec)
    want, _, _ = ref_mae(model.state_dict(), cfg, imgs, 0.75, noise, False)
    torch.testing.assert_close(parts["rec"], want.detach(), atol=1e-6, rtol=1e-5)
    # the classifier reads the cls token after the final norm of an unmasked pass
    x = model.forward_encoder(imgs)[0]
    torch.testing.assert_close(model.logits(imgs), model.head(x[:, 0]))


def test_supervised_vit_global_pool_matches_reference_layout():
    cfg = tiny_cfg(global_pool=True)
    model = M.SupervisedViT(cfg)
    keys = set(model.state_dict())
    assert "fc_norm.weight" in keys and "norm.weight" not in keys
    imgs = torch.randn(2, 3, 8, 8)
    x = model.forward_encoder(imgs)[0]
    torch.testing.assert_close(model(imgs), model.head(model.fc_norm(x[:, 1:].mean(1))))


# ----------------------------------------------------------------------------------------------------
# checkpoints


def reference_names(cfg, decoder=True, head=False):
    """Key -> shape of the reference MAE / timm layout, written out from the official code."""
    D, Dd, P, C, L = cfg.dim, cfg.decoder_dim, cfg.patch_size, cfg.in_chans, cfg.num_patches
    out = {"cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "patch_embed.proj.weight": (D, C, P, P),
           "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,)}

    def block(pre, d):
        h = int(d * cfg.mlp_ratio)
        return {pre + "norm1.weight": (d,), pre + "norm1.bias": (d,), pre + "attn.qkv.weight": (3 * d, d),
                pre + "attn.qkv.bias": (3 * d,), pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,),
                pre + "norm2.weight": (d,), pre + "norm2.bias": (d,), pre + "mlp.fc1.weight": (h, d),
                pre + "mlp.fc1.bias": (h,), pre + "mlp.fc2.weight": (d, h), pre + "mlp.fc2.bias": (d,)}
    for i in range(cfg.depth):
        out.update(block(f"blocks.{i}.", D))
    if decoder:
        out.update({"decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd),
                    "decoder_pos_embed": (1, L + 1, Dd), "decoder_norm.weight": (Dd,),
                    "decoder_norm.bias": (Dd,), "decoder_pred.weight": (P * P * C, Dd),
                    "decoder_pred.bias": (P * P * C,)})
        for i in range(cfg.decoder_depth):
            out.update(block(f"decoder_blocks.{i}.", Dd))
    if head:
        out.update({"head.weight": (cfg.num_classes, D), "head.bias": (cfg.num_classes,)})
    return out


def random_state(names, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in names.items()}


def test_reference_state_dicts_load_strictly():
    cfg = tiny_cfg()
    mae_sd = random_state(reference_names(cfg))                 # mae_visualize_vit_*.pth layout
    mae = M.MAE(cfg)
    assert {k: tuple(v.shape) for k, v in mae.state_dict().items()} == reference_names(cfg)
    assert M.load_pretrained(mae, {"model": mae_sd}) == {"missing": [], "unexpected": [], "mismatched": []}
    assert all(torch.equal(mae.state_dict()[k], v) for k, v in mae_sd.items())

    timm_sd = random_state(reference_names(cfg, decoder=False, head=True), seed=1)   # timm: bare dict
    sup = M.SupervisedViT(cfg)
    M.load_pretrained(sup, timm_sd)
    assert torch.equal(sup.head.weight, timm_sd["head.weight"])

    teacher_sd = random_state(reference_names(cfg), seed=2)    # RC-MAE: DDP-wrapped student + teacher
    rc = M.RCMAE(cfg)
    M.load_pretrained(rc, {"student": {"module." + k: v for k, v in mae_sd.items()}, "teacher": teacher_sd})
    assert torch.equal(rc.student.blocks[0].attn.qkv.weight, mae_sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(rc.teacher.blocks[0].attn.qkv.weight, teacher_sd["blocks.0.attn.qkv.weight"])
    enc = M.MAE(cfg)   # any single network takes the RC-MAE teacher
    M.load_pretrained(enc, {"model": mae_sd, "teacher": teacher_sd})
    assert torch.equal(enc.norm.weight, teacher_sd["norm.weight"])


def test_encoder_only_checkpoint_loads_non_strictly_with_report(capsys):
    cfg = tiny_cfg()
    enc_sd = random_state(reference_names(cfg, decoder=False))     # mae_pretrain_vit_*.pth: encoder only
    sup = M.SupervisedViT(cfg)
    with pytest.raises(M.BadInput, match="missing head.weight, head.bias"):
        M.load_pretrained(sup, {"model": enc_sd})
    report = M.load_pretrained(sup, {"model": enc_sd}, strict=False)
    assert report["missing"] == ["head.weight", "head.bias"] and not report["unexpected"]
    assert torch.equal(sup.blocks[1].mlp.fc2.weight, enc_sd["blocks.1.mlp.fc2.weight"])
    assert "missing head.weight" in capsys.readouterr().out


def test_mis_shaped_checkpoint_gives_clear_error_and_loads_nothing():
    cfg = tiny_cfg()
    sd = random_state(reference_names(cfg))
    sd["pos_embed"] = torch.zeros(1, 5, cfg.dim)
    model = M.MAE(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(M.BadInput) as e:
        M.load_pretrained(model, {"model": sd})
    assert "mis-shaped pos_embed (checkpoint [1, 5, 16], model [1, 17, 16])" in str(e.value)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):   # unpickling this would create the marker file
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, path)
    with pytest.raises(M.BadInput, match="pickled"):
        M.read_checkpoint(str(path))
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(M.BadInput, match="not a readable PyTorch checkpoint"):
        M.read_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(M.BadInput, match="no checkpoint file"):
        M.read_checkpoint(str(tmp_path / "absent.pt"))


# ----------------------------------------------------------------------------------------------------
# data: loaders on small files the tests make, augmentation, sampling


def write_idx(path, array, gz=True):
    import gzip
    arr = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(raw)


def make_fashion(root, n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train))
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz=False)
    write_idx(root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test), gz=False)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), seed=st.integers(0, 99), data=st.data())
def test_balanced_subset_is_balanced_nested_and_fixed(counts, seed, data):
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    n = data.draw(st.integers(1, len(labels)))
    rows = M.balanced_subset(labels, n)
    assert len(rows) == n and len(set(rows.tolist())) == n
    got = torch.bincount(labels[rows], minlength=len(counts)).tolist()
    for g, k in zip(got, counts):     # a class not yet exhausted is at most one image behind every other
        assert g <= k and (g == k or max(got) <= g + 1)
    m = data.draw(st.integers(n, len(labels)))
    assert M.balanced_subset(labels, m)[:n].tolist() == rows.tolist()       # nested, and the same every call


def test_train_size_trains_on_the_fixed_subset_and_finetune_keeps_it(tmp_path, capsys):
    run = train_run(tmp_path / "small", "--method", "mae", "--train-size", "64", "--batch-size", "32", "--final-eval")
    res = json.load(open(os.path.join(run, "results.json")))
    assert res["steps"] == 2 * 2                                          # 2 epochs of 64 images at batch 32
    _, ckpt, _, data, a = M.load_run(run)
    full = M.load_digits_data()
    rows = M.balanced_subset(full.train.labels, 64)
    assert a["train_size"] == 64 and torch.equal(data.train.images, full.train.images[rows])
    counts = torch.bincount(data.train.labels)
    assert counts.sum() == 64 and counts.max() - counts.min() <= 1
    assert len(data.test) == len(full.test)
    assert M.main(["finetune", "--ckpt", run, "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "ft")]) == 0
    assert json.load(open(tmp_path / "ft" / "config.json"))["args"]["train_size"] == 64
    assert json.load(open(tmp_path / "ft" / "results.json"))["steps"] == 2
    capsys.readouterr()
    assert "--train-size 5000 is more than the 1437 training images" in bad(
        capsys, ["train", "--method", "sup", "--train-size", "5000", "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x" / "checkpoint.pt")


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fashion-mnist")
    d = M.load_fashion_mnist(str(tmp_path / "fashion-mnist"))
    assert (len(d.train), len(d.test), d.chans, d.num_classes) == (40, 20, 1, 10)
    x, y = d.train.__getitems__([0, 3])
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    monkeypatch.setenv("MIMLAND_DATA", str(tmp_path))          # found through $MIMLAND_DATA/fashion-mnist
    assert len(M.load_fashion_mnist().train) == 40


def test_missing_or_corrupt_data_says_what_is_expected_where(tmp_path, monkeypatch):
    monkeypatch.delenv("MIMLAND_DATA", raising=False)
    monkeypatch.setattr(M, "FASHION_DEBIAN", str(tmp_path / "nowhere"))
    with pytest.raises(M.BadInput, match="train-images-idx3-ubyte.*not found.*apt-get install dataset-fashion-mnist"):
        M.load_fashion_mnist()
    make_fashion(tmp_path / "nowhere")                          # a wrong --data-dir never falls back to Debian's
    with pytest.raises(M.BadInput, match=f"not found in {tmp_path}, {tmp_path}/fashion-mnist; .*--data-dir or "
                                         f"\\$MIMLAND_DATA \\({tmp_path}\\) must hold them"):
        M.load_fashion_mnist(str(tmp_path))
    monkeypatch.setenv("MIMLAND_DATA", str(tmp_path / "empty"))
    with pytest.raises(M.BadInput, match="empty/fashion-mnist; "):
        M.load_fashion_mnist()
    make_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(M.BadInput, match="not a valid uint8 IDX file"):
        M.load_fashion_mnist(str(tmp_path / "fm"))
    with pytest.raises(M.BadInput, match="cifar-10-batches-py"):
        M.load_cifar("cifar10", str(tmp_path))
    with pytest.raises(M.BadInput, match="DIR/train/<class>"):
        M.load_folder(str(tmp_path), 32)


def cifar_batch(n, key, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, 10, n))}


def make_cifar10(root, tar=False):
    import io
    import pickle
    import tarfile
    files = {f"data_batch_{i}": cifar_batch(4, b"labels", i) for i in range(1, 6)}
    files["test_batch"] = cifar_batch(3, b"labels", 9)
    if not tar:
        os.makedirs(root / "cifar-10-batches-py")
        for name, d in files.items():
            (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(d, protocol=2))
        return
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as t:
        for name, d in files.items():
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("tar", [False, True])
def test_cifar10_from_directory_or_archive(tmp_path, tar):
    make_cifar10(tmp_path, tar)
    d = M.load_cifar("cifar10", str(tmp_path))
    assert (len(d.train), len(d.test), d.chans) == (20, 3, 3)
    want = cifar_batch(4, b"labels", 1)
    x, y = d.train.__getitems__([0])
    assert torch.equal(x[0], torch.from_numpy(want[b"data"][0].reshape(3, 32, 32)))
    assert y[0].item() == want[b"labels"][0]


def test_cifar100_and_a_pickle_carrying_code_is_refused(tmp_path):
    import pickle
    os.makedirs(tmp_path / "cifar-100-python")
    for name, n in (("train", 6), ("test", 2)):
        (tmp_path / "cifar-100-python" / name).write_bytes(pickle.dumps(cifar_batch(n, b"fine_labels", n)))
    d = M.load_cifar("cifar100", str(tmp_path))
    assert (len(d.train), d.num_classes) == (6, 100)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": _Payload(str(marker))}))
    with pytest.raises(M.BadInput, match="corrupt or not a CIFAR batch"):
        M.load_cifar("cifar100", str(tmp_path))
    assert not marker.exists()


def test_folder_tree_decodes_with_pillow(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            os.makedirs(tmp_path / split / c)
            Image.new("RGB", (40, 30), colour).save(tmp_path / split / c / "a.png")
    d = M.load_folder(str(tmp_path), 28)
    assert (len(d.train), d.num_classes, d.train.side) == (2, 2, 32)   # 28 * 256/224
    x, y = d.train.__getitems__([0, 1])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    assert x[0, 0].min() == 255 and x[1, 2].min() == 255
    assert M.eval_view(x, d, 28).shape == (2, 3, 28, 28)


@FAST
@given(n=st.integers(1, 16), H=st.integers(4, 40), W=st.integers(4, 40), scale=st.floats(0.05, 1.0),
       seed=st.integers(0, 999))
def test_random_resized_crop_boxes_lie_inside_the_image(n, H, W, scale, seed):
    boxes = M.sample_crops(n, H, W, torch.Generator().manual_seed(seed), scale)
    top, left, h, w, flip = boxes.unbind(1)
    assert torch.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W))
    assert torch.all(top == top.round()) and set(flip.tolist()) <= {0.0, 1.0}
    assert torch.all(h * w <= H * W * 1.0 + 2 * (H + W))   # rounding of sqrt(area*ratio)


def test_resized_crop_geometry():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0, 0, 8, 8, 0], [0, 0, 8, 8, 1]], dtype=torch.float)
    y = M.resized_crop(x, full, 8)
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[1], x[1].flip(-1))                       # the flip coin mirrors
    quarter = torch.tensor([[4, 0, 4, 4, 0]], dtype=torch.float)           # bottom-left quadrant at 2x
    z = M.resized_crop(x[:1], quarter, 4)
    torch.testing.assert_close(z[0], x[0, :, 4:, :4])


def test_global_batch_sampler_splits_each_global_batch_over_processes_and_accumulation():
    n, B = 50, 12
    one = iter(M.GlobalBatchSampler(n, B, world=1, rank=0, accum=1, seed=3))
    steps = [next(one) for _ in range(8)]                          # 4 steps per epoch, 2 epochs
    assert all(len(set(s)) == B for s in steps) and len(set(sum(steps[:4], []))) == 48
    assert steps[:4] != steps[4:8]                                # a new permutation each epoch
    split = [iter(M.GlobalBatchSampler(n, B, world=2, rank=r, accum=3, seed=3)) for r in range(2)]
    for s in steps:
        got = [next(split[r]) for r in range(2) for _ in range(3)]   # rank 0's 3 micro-batches, then rank 1's
        assert sum(got, []) == s
    resumed = iter(M.GlobalBatchSampler(n, B, world=1, rank=0, accum=1, seed=3, start_step=5))
    assert next(resumed) == steps[5]


def test_lr_schedule_warmup_then_half_cosine():
    assert M.lr_at(0, 1.0, 0.1, 5, 100) == 0
    assert M.lr_at(2.5, 1.0, 0.1, 5, 100) == pytest.approx(0.5)
    assert M.lr_at(5, 1.0, 0.1, 5, 100) == pytest.approx(1.0)
    assert M.lr_at(52.5, 1.0, 0.1, 5, 100) == pytest.approx(0.55)
    assert M.lr_at(100, 1.0, 0.1, 5, 100) == pytest.approx(0.1)


def test_param_groups_weight_decay_and_layer_decay():
    model = M.SupervisedViT(tiny_cfg(depth=3))
    groups = M.param_groups(model, 0.05, layer_decay=0.5, depth=3)
    where = {id(p): (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    assert where[id(model.blocks[0].attn.qkv.weight)] == (0.05, 0.5 ** 3)
    assert where[id(model.blocks[0].attn.qkv.bias)] == (0.0, 0.5 ** 3)
    assert where[id(model.blocks[2].norm1.weight)] == (0.0, 0.5)
    assert where[id(model.cls_token)] == (0.05, 0.5 ** 4)     # tokens do get weight decay, as the reference
    assert where[id(model.head.weight)] == (0.05, 1.0)
    assert id(model.pos_embed) not in where                   # frozen
    model.pos_embed.requires_grad_(True)                      # fine-tuning: trained, and with timm's no-decay list
    tuned = M.param_groups(model, 0.05, layer_decay=0.5, depth=3, no_decay=M.FINETUNE_NO_DECAY)
    where = {id(p): (g["weight_decay"], g["lr_scale"]) for g in tuned for p in g["params"]}
    assert where[id(model.cls_token)] == where[id(model.pos_embed)] == (0.0, 0.5 ** 4)
    assert where[id(model.blocks[0].attn.qkv.weight)] == (0.05, 0.5 ** 3)
    plain = M.param_groups(M.MAE(tiny_cfg()), 0.05)
    assert {g["lr_scale"] for g in plain} == {1.0}


def test_flops_per_image_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny_cfg(dim=32, decoder_dim=16, num_classes=7)
    for method, model, run in [("mae", M.MAE(cfg), lambda m, x: m(x, 0.75)),
                               ("sup", M.SupervisedViT(cfg), lambda m, x: m(x))]:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:   # the counter sees bmm
            run(model, torch.randn(4, 3, 8, 8))
        assert fc.get_total_flops() / 4 == M.flops_per_image(cfg, method, 0.75, train=False)
    assert M.flops_per_image(cfg, "rcmae") == M.flops_per_image(cfg, "mae") * 4 / 3
    mcfg, n = replace(cfg, proj_hidden=12, proj_dim=6), 4
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:   # online and momentum branches
        M.MoCo(mcfg).eval()(torch.randn(2, n, 3, 8, 8))
    logits = 2 * 2 * n * mcfg.proj_dim                                       # q k^T of both losses, per image
    online, train = M.flops_per_image(mcfg, "moco", train=False), M.flops_per_image(mcfg, "moco")
    assert fc.get_total_flops() / n == online + (train - 3 * online) + logits


# ----------------------------------------------------------------------------------------------------
# evaluation


def test_extract_features_keeps_no_batch_output_alive():
    import weakref
    data, refs, alive = M.synthetic_data(40, 8, 8, 1, 3), [], []

    def features(x):   # like the cls column of an encoder's [N, T, D] output: a view
        out = torch.randn(len(x), 50, 4)
        refs.append(weakref.ref(out))
        alive.append(sum(r() is not None for r in refs))
        return out[:, 0]
    f, y = M.extract_features(features, data.train, data, 8, torch.device("cpu"), batch=4)
    assert f.shape == (40, 4) and len(y) == 40 and len(alive) == 10
    assert max(alive) == 1                                   # each batch's output is freed once read


def test_knn_and_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=g)
    y = torch.arange(200) % 4
    x = centres[y] + 0.5 * torch.randn(200, 16, generator=g)
    assert M.knn_accuracy(x[:150], y[:150], x[150:], y[150:], 4) == 1.0
    acc, head = M.linear_probe(x[:150], y[:150], x[150:], y[150:], 4, epochs=50)
    assert acc == 1.0
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    shuffled = y[torch.randperm(200, generator=g)]              # labels unrelated to features: chance level
    assert M.knn_accuracy(x[:150], shuffled[:150], x[150:], shuffled[150:], 4) < 0.6


def test_linear_probe_stops_at_the_epoch_that_reaches_max_steps(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(120, 8, generator=g), torch.arange(120) % 3
    steps = []
    monkeypatch.setattr(M.LARS, "step", lambda self, *a, _step=M.LARS.step: (steps.append(1), _step(self, *a))[1])
    acc, head = M.linear_probe(x[:100], y[:100], x[100:], y[100:], 3, epochs=300, batch=20, max_steps=12)
    assert len(steps) == 15                                     # 5 steps an epoch: 3 epochs reach 12
    acc3, head3 = M.linear_probe(x[:100], y[:100], x[100:], y[100:], 3, epochs=3, batch=20)
    assert acc == acc3 and torch.equal(head[1].weight, head3[1].weight)
    M.linear_probe(x[:100], y[:100], x[100:], y[100:], 3, epochs=4, batch=20, max_steps=100)
    assert len(steps) == 15 + 15 + 20                           # under the cap: every epoch


def test_lars_rescales_matrix_updates_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))        # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = M.LARS([w, b], lr=1.0, momentum=0.0, trust_coefficient=0.1)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 5 / 2 * 2]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.5]))   # 1-D: plain SGD


# ----------------------------------------------------------------------------------------------------
# training: the run directory, exact resume, processes, failure modes


import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--epochs", "2", "--batch-size", "256", "--eval-every", "1", "--ckpt-every", "3"]


def train_run(out, *extra):
    code = M.main(["train", "--out", str(out), *SMALL, *extra])
    assert code == 0
    return str(out)


def tensors(ckpt_path):
    ck = M.read_checkpoint(ckpt_path)
    flat = {f"model.{k}": v for k, v in ck["model"].items()}
    flat.update({f"teacher.{k}": v for k, v in ck.get("teacher", {}).items()})
    for i, s in ck["optimizer"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return flat, ck


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("runs") / "mae", "--method", "mae", "--norm-pix-loss")


@pytest.fixture(scope="module")
def sup_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("runs") / "sup", "--method", "sup")


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("runs") / "moco", "--method", "moco")


FAULTS_OF_A_REPEATED_STEP = """
import resource, sys, torch, mimland
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step = lambda: torch.empty(16 * 2 ** 20).fill_(1.0)   # a 64 MiB activation, written, freed
if sys.argv[1] == "keep":
    assert mimland.keep_freed_memory()
for _ in range(8):   # the steady state: small allocations may split the first freed blocks, so the heap
    step()           # grows by a block or two over the first steps, then serves every step from them
before = faults()
for _ in range(4):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_serves_a_big_tensor_again_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_OF_A_REPEATED_STEP, mode], check=True,
                                       capture_output=True, text=True, cwd=REPO).stdout)
              for mode in ("glibc", "keep")}   # fresh processes: the heap as a program starts it
    assert faults["glibc"] >= 4 * 16_000      # over 32 MiB, glibc maps it afresh: 16,384 faults every step
    assert faults["keep"] < 1000


def test_run_directory_holds_config_metrics_checkpoint_and_pictures(mae_run):
    cfg = json.load(open(os.path.join(mae_run, "config.json")))
    assert cfg["per_process_batch"] == 256 and cfg["lr"] == pytest.approx(1.5e-3) and cfg["steps"] == 10
    rows = M.read_jsonl(os.path.join(mae_run, "metrics.jsonl"))
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(r["loss"] == r["rec"] and r["img_s"] > 0 for r in train)
    assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0                  # warm-up from zero
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1.0, 2.0] and all(0 <= r["knn_acc"] <= 1 for r in evals)
    ck = M.read_checkpoint(os.path.join(mae_run, "checkpoint.pt"))       # weights_only loads it
    assert ck["step"] == 10 and ck["method"] == "mae" and set(ck["rng"]) == {"cpu", "cuda"}
    res = json.load(open(os.path.join(mae_run, "results.json")))
    assert 0.1 < res["probe_acc"] <= 1 and 0 < res["knn_acc"] <= 1
    assert 0 < res["train_steps_s"] < res["train_wall_s"] and res["final_eval_s"] > 0     # evaluations apart
    assert res["img_s"] == pytest.approx(10 * 256 / res["train_steps_s"], rel=1e-3)       # the training steps alone
    assert sum(256 / r["img_s"] for r in train) == pytest.approx(res["train_steps_s"], abs=0.01)
    for png in ("loss.png", "recon.png"):
        assert os.path.getsize(os.path.join(mae_run, png)) > 5000
    assert M.read_checkpoint(os.path.join(mae_run, "probe.pt"))["features"] == "model"


def test_rcmae_logs_its_parts_and_the_ema_momentum(tmp_path):
    run = train_run(tmp_path / "rc", "--method", "rcmae", "--epochs", "1", "--no-final-eval")
    train = [r for r in M.read_jsonl(os.path.join(run, "metrics.jsonl")) if r["kind"] == "train"]
    assert all(r["loss"] == pytest.approx(r["rec"] + r["cons"]) for r in train)
    assert [r["momentum"] for r in train] == [0.996] * len(train)           # constant, as the reference ran
    res = json.load(open(os.path.join(run, "results.json")))
    lag, init = M.teacher_lag([0.996] * len(train))
    assert (res["teacher_lag_steps"], res["teacher_init_weight"]) == (lag, init)
    assert res["teacher_lag_share"] == lag / len(train) and init == pytest.approx(0.996 ** len(train))
    ck = M.read_checkpoint(os.path.join(run, "checkpoint.pt"))
    assert set(ck["teacher"]) == set(ck["model"])                          # the RC-MAE reference layout
    assert any(not torch.equal(ck["teacher"][k], ck["model"][k]) for k in ck["model"])


def test_moco_trains_logs_its_momentum_and_keeps_the_encoder_under_plain_vit_names(moco_run, capsys):
    run = moco_run
    rows = M.read_jsonl(os.path.join(run, "metrics.jsonl"))
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["loss"] == r["ctr"] and r["loss"] > 0 for r in train)
    ms = [r["momentum"] for r in train]
    assert ms[0] == pytest.approx(0.99) and all(b > a for a, b in zip(ms, ms[1:])) and ms[-1] < 1
    evals = [r for r in rows if r["kind"] == "eval"]
    assert all(r["test_loss"] == r["test_ctr"] > 0 and 0 < r["knn_acc"] <= 1 for r in evals)
    ck = M.read_checkpoint(os.path.join(run, "checkpoint.pt"))
    vit = M.ViT(M.ViTConfig(**ck["config"])).state_dict()
    assert set(vit) < set(ck["model"]) and {k.split(".")[0] for k in set(ck["model"]) - set(vit)} == {
        "projector", "predictor", "momentum_encoder", "momentum_projector"}
    res = json.load(open(os.path.join(run, "results.json")))
    assert 0.1 < res["probe_acc"] <= 1 and 0 < res["knn_acc"] <= 1
    assert not os.path.exists(os.path.join(run, "recon.png"))              # nothing to reconstruct
    capsys.readouterr()
    assert "needs a masked model (mae, rcmae, ssat); this checkpoint is a 'moco' run" in bad(capsys, ["recon", "--ckpt", run])
    assert "--accum-iter: MoCo's loss couples" in bad(capsys, ["train", "--method", "moco", "--accum-iter", "2"])


@pytest.mark.parametrize("method", ["ssat", "rcmae", "finetune"])
def test_results_json_equals_the_checkpoint_evaluated_again(method, tmp_path, capsys):
    """What a run reports is what its saved weights give: `eval` and `probe` recompute every number of
    results.json from checkpoint.pt alone (a --train-size subset; RC-MAE through its teacher; a fine-tuned
    MAE, which inherits the subset)."""
    run = train_run(tmp_path / method, "--method", "mae" if method == "finetune" else method, "--train-size", "300",
                    "--seed", "1", *(["--no-final-eval"] if method == "finetune" else []))
    if method == "finetune":
        run, source = str(tmp_path / "ft"), run
        assert M.main(["finetune", "--ckpt", source, "--out", run, "--epochs", "1", "--batch-size", "256"]) == 0
    res = json.load(open(os.path.join(run, "results.json")))
    capsys.readouterr()
    assert M.main(["eval", "--ckpt", run, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert M.main(["probe", "--ckpt", run, "--json", "--probe-file", "probe-again.pt"]) == 0
    pr = json.loads(capsys.readouterr().out)
    tests = sorted(k for k in res if k.startswith("test_"))
    assert len(tests) >= (4 if method == "ssat" else 3)                     # loss, its parts, (accuracy)
    assert {k: ev[k] for k in tests} == {k: res[k] for k in tests}
    assert (pr["probe_acc"], pr["knn_acc"]) == (res["probe_acc"], res["knn_acc"])


def interrupt_after(monkeypatch, k):
    """Deliver a real SIGINT once step k has been logged."""
    original = M.RunLog.step

    def step(self, record):
        original(self, record)
        if record["step"] == k:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(M.RunLog, "step", step)


@pytest.mark.parametrize("method,k,extra", [("rcmae", 2, ["--accum-iter", "2"]), ("ssat", 4, []),
                                            ("sup", 7, ["--smoothing", "0.2"]), ("moco", 5, ["--model", "vit_digits"])])
def test_interrupted_and_resumed_run_equals_the_run_left_alone(tmp_path, monkeypatch, capsys, method, k, extra):
    flags = ["--method", method, "--no-final-eval", *extra]
    alone = train_run(tmp_path / "alone", *flags)
    interrupt_after(monkeypatch, k)
    assert M.main(["train", "--out", str(tmp_path / "cut"), *SMALL, *flags]) == 130
    assert f"interrupted at step {k + 1}/10" in capsys.readouterr().err
    monkeypatch.undo()
    assert M.read_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["step"] == k + 1
    assert M.main(["train", "--resume", str(tmp_path / "cut")]) == 0
    a, ck_a = tensors(os.path.join(alone, "checkpoint.pt"))
    b, ck_b = tensors(str(tmp_path / "cut" / "checkpoint.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)   # bit for bit
    strip = lambda rows: [{k2: v for k2, v in r.items() if k2 != "img_s"} for r in rows]  # noqa: E731
    assert strip(M.read_jsonl(os.path.join(alone, "metrics.jsonl"))) == \
        strip(M.read_jsonl(str(tmp_path / "cut" / "metrics.jsonl")))


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    run = train_run(tmp_path / "done", "--method", "mae")
    files = ("checkpoint.pt", "results.json", "probe.pt", "metrics.jsonl")
    before = {f: (tmp_path / "done" / f).read_bytes() for f in files}
    capsys.readouterr()
    assert M.main(["train", "--resume", run]) == 0
    assert f"mimland train: {run} is finished (step 10, results.json written)" in capsys.readouterr().err
    assert all((tmp_path / "done" / f).read_bytes() == before[f] for f in files)


def test_flags_are_never_abbreviated_and_reference_names_get_a_suggestion(capsys):
    err = bad(capsys, ["train", "--method", "mae", "--epoch", "3"])                 # not taken as --epochs
    assert err.startswith("mimland train: error: unrecognized arguments: --epoch 3") and "did you mean" not in err
    assert "did you mean --mask-ratio?" in bad(capsys, ["train", "--method", "mae", "--mask_ratio", "0.5"])
    assert "did you mean --out --accum-iter?" in bad(capsys, ["train", "--method", "mae", "--output_dir", "x",
                                                              "--accum_iter", "2"])
    assert bad(capsys, ["probe", "--data_path", "x"]).startswith("mimland probe: error: unrecognized arguments: "
                                                                 "--data_path x; did you mean --data-dir?")
    assert "did you mean --img-size?" in bad(capsys, ["finetune", "--ckpt", "x", "--input_size", "32"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    original, calls = M.MAE.training_loss, [0]

    def poisoned(*a, **kw):
        loss, parts = original(*a, **kw)
        calls[0] += 1
        return (loss * float("nan"), parts) if calls[0] == 5 else (loss, parts)
    monkeypatch.setattr(M.MAE, "training_loss", poisoned)
    assert M.main(["train", "--out", str(tmp_path / "r"), *SMALL, "--method", "mae"]) == 1
    err = capsys.readouterr().err   # the progress bar, then one line
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("mimland train: loss is nan at step 4")
    assert "last good checkpoint (step 3)" in last
    assert M.read_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["step"] == 3


def test_two_gloo_processes_end_equal_to_one(tmp_path):
    common = ["--epochs", "1", "--batch-size", "128", "--no-final-eval", "--eval-every", "9", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(name, *launcher_and_flags):
        *launcher, flags = launcher_and_flags
        r = subprocess.run([sys.executable, *launcher, "mimland.py", "train", "--out", str(tmp_path / name), *flags,
                            *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return tensors(str(tmp_path / name / "checkpoint.pt"))[0], r.stdout
    two_procs = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    one, _ = run("one", ["--method", "rcmae"])
    two, out = run("two", *two_procs, ["--method", "rcmae"])
    # MAE: RC-MAE's reference moves its teacher after every micro-batch, so accumulation changes its run
    accumulated, _ = run("acc", ["--method", "mae", "--accum-iter", "2"])
    two_mae, _ = run("two-mae", *two_procs, ["--method", "mae"])
    assert "2 process(es) x 64 images x 1 accumulation = global batch 128" in out
    for n in accumulated:
        if n.startswith("model."):
            # the same micro-batches in one process (accumulated) or two (all-reduced): bit for bit
            assert torch.equal(two_mae[n], accumulated[n]), n
    for n in one:
        if n.startswith(("model.", "teacher.")):
            # one 64-image batch: float summation order differs; Adam turns the rounding noise of the
            # key biases (whose exact gradient is zero) into steps of about lr, hence atol 1e-4
            torch.testing.assert_close(two[n], one[n], atol=1e-4, rtol=1e-3, msg=n)


def test_two_gloo_processes_train_moco_as_one(tmp_path):
    flags = ["--method", "moco", "--epochs", "1", "--batch-size", "256", "--no-final-eval", "--eval-every", "9",
             "--device", "cpu"]
    ends, losses = [], []
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        r = subprocess.run([sys.executable, *launcher, "mimland.py", "train", "--out", str(tmp_path / name), *flags],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        ends.append(tensors(str(tmp_path / name / "checkpoint.pt"))[0])
        losses.append([r["loss"] for r in M.read_jsonl(str(tmp_path / name / "metrics.jsonl")) if r["kind"] == "train"])
    # keys from both processes and batch norms over both: the global batch of one process, to float round-off
    # (per-process statistics of 128 images instead of 256 move the first loss by about 3e-4, 7e-5 of it)
    assert len(losses[1]) == 5 and losses[1][:2] == pytest.approx(losses[0][:2], rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)   # later steps: the round-off of earlier ones grows
    for n in ends[0]:   # Adam turns round-off in near-zero gradients into steps of about lr, and BN keeps it;
        # the cls token's gradient average differs by up to 2.4e-3 of 0.044 on some AVX2 machines
        torch.testing.assert_close(ends[1][n], ends[0][n], atol=5e-3, rtol=1e-2, msg=n)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "mimland.py", "train", "--method", "mae", "--epochs", "40",
                             "--out", str(out), "--ckpt-every", "100000"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time
    deadline = time.time() + 120
    while time.time() < deadline and len(M.read_jsonl(str(out / "metrics.jsonl"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert "Traceback" not in err and "interrupted at step" in err
    ck = M.read_checkpoint(str(out / "checkpoint.pt"))
    logged = [r for r in M.read_jsonl(str(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert 3 <= ck["step"] == len(logged) < 440


def bad(capsys, argv, main=M.main):
    try:
        code = main(argv)
    except SystemExit as e:   # argparse refuses a flag as it parses it
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_and_status_2(tmp_path, capsys, mae_run, sup_run, monkeypatch):
    assert "not divisible by patch size" in bad(capsys, ["train", "--method", "mae", "--img-size", "9"])
    assert "--mask-ratio: 1.0 is not in (0, 1)" in bad(capsys, ["train", "--mask-ratio", "1.0"])
    assert "--mask-ratio: 0 is not in (0, 1)" in bad(capsys, ["train", "--method", "ssat", "--mask-ratio", "0"])
    out = tmp_path / "never"
    for argv, says in ((["train", "--blr", "-1"], "--blr: -1 is not a positive number"),
                       (["train", "--method", "rcmae", "--ema-momentum", "1.5"], "--ema-momentum: 1.5 is not in [0, 1)"),
                       (["train", "--epochs", "0"], "--epochs: 0 is not a positive integer"),
                       (["train", "--seed", "-1"], "--seed: -1 is not a seed"),
                       (["train", "--smoothing", "1"], "--smoothing: 1 is not in [0, 1)"),
                       (["finetune", "--ckpt", mae_run, "--layer-decay", "0"], "--layer-decay: 0 is not in (0, 1]"),
                       (["probe", "--ckpt", mae_run, "--k", "0"], "--k: 0 is not a positive integer"),
                       (["probe", "--ckpt", mae_run, "--batch-size", "1"], "1 is not an integer of at least 2"),
                       (["recon", "--ckpt", mae_run, "--n", "0"], "--n: 0 is not a positive integer"),
                       (["landscape", "--ckpt", mae_run, "--data-size", "0"], "--data-size: 0 is not a positive integer"),
                       (["landscape", "--ckpt", mae_run, "--grid", "2"], "--grid: 2 is not an integer of at least 3"),
                       (["landscape", "--ckpt", mae_run, "--range", "nan"], "--range: nan is not a positive number"),
                       (["hessian", "--ckpt", mae_run, "--top-k", "0"], "--top-k: 0 is not a positive integer"),
                       (["hessian", "--ckpt", mae_run, "--slq-steps", "x"], "--slq-steps: 'x' is not a positive integer")):
        assert says in bad(capsys, argv + (["--out", str(out)] if argv[0] in ("train", "finetune") else []))
    assert not out.exists()
    (tmp_path / "a-file").write_text("")
    for argv, says in ((["train", "--method", "mae", "--out", str(tmp_path / "a-file")], "cannot make the run directory"),
                       (["train", "--method", "mae", "--device", "tpu", "--out", str(out)], "--device 'tpu' is not a device"),
                       (["recon", "--ckpt", mae_run, "--out", str(tmp_path / "no" / "r.png")], "not in an existing directory"),
                       (["landscape", "--compare", mae_run, sup_run, "--out", str(tmp_path / "no" / "c.png")],
                        "not in an existing directory")):
        assert says in bad(capsys, argv)
    assert not out.exists() and (tmp_path / "a-file").read_text() == ""
    assert "larger than the 1437 training images" in bad(capsys, ["train", "--method", "mae", "--batch-size", "5000"])
    assert "does not split" in bad(capsys, ["train", "--method", "mae", "--batch-size", "100", "--accum-iter", "3"])
    assert "cifar-10-batches-py" in bad(capsys, ["train", "--method", "mae", "--data", "cifar10", "--data-dir", str(tmp_path)])
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert "not a readable PyTorch checkpoint" in bad(capsys, ["probe", "--ckpt", str(tmp_path / "junk.pt")])
    assert "no checkpoint file" in bad(capsys, ["eval", "--ckpt", str(tmp_path / "absent.pt")])
    assert "needs a masked model" in bad(capsys, ["recon", "--ckpt", sup_run])
    assert "wrong-method checkpoint" in bad(capsys, ["train", "--resume", mae_run, "--method", "rcmae"])
    before = {f: open(os.path.join(mae_run, f), "rb").read() for f in os.listdir(mae_run)}
    assert "already holds a run" in bad(capsys, ["train", "--method", "mae", "--out", mae_run])
    assert bad(capsys, ["train", "--out", str(out)]) == ("mimland train: error: train needs --method: sup, mae, rcmae, "
                                                        "ssat, moco (sup: a supervised ViT; rcmae: MAE + an EMA teacher; "
                                                        "ssat: classification + MAE as an auxiliary task; moco: MoCo v3, "
                                                        "contrastive)")
    err = bad(capsys, ["train", "--method", "mae", "--model", "vit_base", "--out", str(out)])
    assert err.startswith("mimland train: error: --model vit_base runs at 224x224, 28x the 8x8 images of digits: give "
                          "--img-size (e.g. --img-size 8) or a preset near that size (") and "vit_digits" in err
    assert "ssat_tiny" in err and "vit_small" not in err                       # 32 is 4x: near enough
    err = bad(capsys, ["landscape", "--ckpt", mae_run, "--compare", mae_run, sup_run])
    assert err == "mimland landscape: error: landscape takes --ckpt RUN (one surface) or --compare RUN_A RUN_B ... " \
                  "(several), not both"
    assert before == {f: open(os.path.join(mae_run, f), "rb").read() for f in os.listdir(mae_run)}
    for argv in (["train", "--method", "byol"], ["train", "--model", "vit_gigantic"], ["train", "--epochs", "x"]):
        with pytest.raises(SystemExit) as e:
            M.main(argv)
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    monkeypatch.setenv("RANK", "1")   # under torchrun every process exits with 2, and rank 0 alone says why
    with pytest.raises(SystemExit) as e:
        M.main(["train", "--blr", "-1"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    assert M.main(["recon", "--ckpt", sup_run]) == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("method,flag,takers", [
    ("mae", ["--teacher-mask", "different"], "rcmae only"), ("ssat", ["--gamma", "2"], "rcmae only"),
    ("sup", ["--ema-momentum", "0.9"], "rcmae, moco only"), ("rcmae", ["--lam", "0.5"], "ssat only"),
    ("mae", ["--tau", "0.1"], "moco only"), ("ssat", ["--random-patch-projection"], "moco only"),
    ("sup", ["--mask-ratio", "0.5"], "mae, rcmae, ssat only"), ("sup", ["--norm-pix-loss"], "mae, rcmae, ssat only"),
    ("mae", ["--smoothing", "0.1"], "sup, ssat only")])
def test_a_flag_the_method_does_not_read_is_refused(tmp_path, capsys, method, flag, takers):
    out = tmp_path / "never"
    err = bad(capsys, ["train", "--method", method, *flag, "--out", str(out)])
    name = flag[0][2:]
    assert err == f"mimland train: error: --{name} is read by {takers}; --method {method} does not use it: drop it"
    assert not out.exists()


def test_bad_input_in_a_fresh_process_prints_no_traceback():
    r = subprocess.run([sys.executable, "mimland.py", "train", "--mask-ratio", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        "mimland train: error: argument --mask-ratio: 2 is not in (0, 1) (see --help)"


# ----------------------------------------------------------------------------------------------------
# eval, probe, recon, finetune on a trained run


def test_training_on_folder_and_synthetic_data_in_bf16_with_clipping(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "tree" / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "tree" / split / c / f"{i}.png")
    assert M.main(["train", "--data", "folder", "--data-dir", str(tmp_path / "tree"), "--model", "vit_digits",
                   "--img-size", "16", "--method", "ssat", "--epochs", "2", "--batch-size", "8", "--workers", "0",
                   "--out", str(tmp_path / "f"), "--precision", "bf16", "--clip-grad", "1.0"]) == 0
    res = json.load(open(tmp_path / "f" / "results.json"))
    assert res["steps"] == 6 and 0 <= res["test_acc"] <= 1
    cfg = M.read_checkpoint(str(tmp_path / "f" / "checkpoint.pt"))["config"]
    assert (cfg["in_chans"], cfg["num_classes"], cfg["img_size"]) == (3, 2, 16)
    assert M.main(["train", "--data", "synthetic", "--method", "sup", "--epochs", "1", "--batch-size", "1024",
                   "--out", str(tmp_path / "s"), "--no-final-eval"]) == 0
    assert M.read_checkpoint(str(tmp_path / "s" / "checkpoint.pt"))["step"] == 4


def test_eval_probe_and_recon_commands(mae_run, capsys, tmp_path):
    assert M.main(["eval", "--ckpt", mae_run]) == 0                   # a summary line, the record to RUN/eval.json
    ev = json.load(open(os.path.join(mae_run, "eval.json")))
    assert ev["method"] == "mae" and ev["test_loss"] > 0 and 0 <= ev["knn_acc"] <= 1
    assert capsys.readouterr().out == (f"mimland eval: mae at step 10 on the digits test set: test_loss "
                                       f"{ev['test_loss']:.4g}, test_rec {ev['test_rec']:.4g}, knn_acc "
                                       f"{ev['knn_acc']:.4g}; -> {os.path.join(mae_run, 'eval.json')}\n")
    assert M.main(["eval", "--ckpt", mae_run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ev
    assert M.main(["probe", "--ckpt", mae_run, "--epochs", "20"]) == 0
    pr = json.load(open(os.path.join(mae_run, "probe.json")))
    assert pr["features"] == "model" and 0 < pr["probe_acc"] <= 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"mimland probe: model features on digits: linear probe {pr['probe_acc']:.4f}, k-NN {pr['knn_acc']:.4f} "
        f"(k = 20); head -> {os.path.join(mae_run, 'probe.pt')}; -> {os.path.join(mae_run, 'probe.json')}")
    assert M.main(["probe", "--random-init", "--epochs", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == "random-init"
    enc = M.ViT(M.preset("vit_digits"))                  # an official-style encoder-only checkpoint
    torch.save({"model": enc.state_dict()}, tmp_path / "enc.pth")
    assert M.main(["probe", "--ckpt", str(tmp_path / "enc.pth"), "--model", "vit_digits", "--epochs", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == "pretrained"
    assert M.main(["probe", "--ckpt", str(tmp_path / "enc.pth"), "--model", "ssat_tiny", "--data", "digits"]) == 2
    assert "does not hold a ssat_tiny encoder" in capsys.readouterr().err
    assert M.main(["recon", "--ckpt", mae_run, "--out", str(tmp_path / "r.png"), "--n", "3"]) == 0
    assert os.path.getsize(tmp_path / "r.png") > 3000


def test_every_figure_is_written_with_a_title(mae_run, tmp_path, monkeypatch):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(mae_run, run)
    seen, original = {}, M.save_figure

    def record(fig, path):
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        seen[os.path.basename(path)] = [t for t in titles if t]
        original(fig, path)
    monkeypatch.setattr(M, "save_figure", record)
    M.plot_curves(run)
    model, ckpt, cfg, data, a = M.load_run(run)
    M.plot_reconstructions(model, data, cfg, torch.device("cpu"), str(tmp_path / "recon.png"), 0.75, 0, n=2, title="run")
    xs, s = torch.linspace(-1, 1, 5), torch.rand(5, 5) + 0.1
    M.plot_landscape(xs, None, s[0], str(tmp_path / "one"), "a line")
    M.plot_landscape(xs, xs, s, str(tmp_path / "two"), "a surface")
    M.plot_landscape_comparison([("a", xs, xs, s), ("b", xs, xs, 2 * s)], str(tmp_path / "cmp.png"), "two surfaces")
    H = M.Hessian(MatrixLoss(torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64))), lambda m: m.loss())
    M.plot_spectrum(M.slq_density(H, steps=3, runs=1), str(tmp_path / "spectrum.png"), "a spectrum")
    assert set(seen) == {"loss.png", "recon.png", "one.png", "two-contour.png", "two-filled.png", "two-surface.png",
                         "cmp.png", "spectrum.png"}
    assert all(seen.values()), seen
    assert seen["recon.png"][0] == "run: 2 test images, 75% of the patches removed"
    for name in seen:
        path = os.path.join(run if name == "loss.png" else str(tmp_path), name)
        assert os.path.getsize(path) > 5000, name


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_is_unnormalized_with_each_patch_statistics(norm_pix):
    torch.manual_seed(0)
    net = M.MAE(tiny_cfg(in_chans=1), norm_pix_loss=norm_pix).eval()
    imgs, noise = torch.randn(2, 1, 8, 8) * 3 + 5, torch.rand(2, 16)
    rec, mask = M.reconstruct(net, imgs, 0.75, noise)
    _, pred, mask2 = net(imgs, 0.75, noise)                      # what the decoder predicts (and the loss sees)
    assert torch.equal(mask, mask2)
    t = M.patchify(imgs, 2)
    want = pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True) if norm_pix else pred
    torch.testing.assert_close(M.patchify(rec, 2), want)


def test_finetune_starts_from_the_pretrained_encoder(mae_run, tmp_path, capsys, monkeypatch):
    model = M.SupervisedViT(M.ViTConfig(**M.read_checkpoint(os.path.join(mae_run, "checkpoint.pt"))["config"]))
    M.init_from_pretrained(model, os.path.join(mae_run, "checkpoint.pt"))
    pre = M.read_checkpoint(os.path.join(mae_run, "checkpoint.pt"))["model"]
    assert torch.equal(model.blocks[3].mlp.fc1.weight, pre["blocks.3.mlp.fc1.weight"])
    assert model.head.weight.abs().max() < 1e-4
    out = tmp_path / "ft"
    assert M.main(["finetune", "--ckpt", mae_run, "--out", str(out), "--epochs", "1", "--batch-size", "256",
                   "--no-global-pool"]) == 0
    res = json.load(open(out / "results.json"))
    assert res["method"] == "sup" and 0 < res["test_acc"] <= 1
    cfg = json.load(open(out / "config.json"))["args"]
    assert cfg["layer_decay"] == 0.75 and cfg["drop_path"] == 0.1 and cfg["init"].endswith("checkpoint.pt")
    tuned = M.read_checkpoint(str(out / "checkpoint.pt"))
    assert not torch.equal(tuned["model"]["pos_embed"], pre["pos_embed"])      # trained from the loaded table
    state = tuned["optimizer"]
    n_trainable = sum(1 for p in M.SupervisedViT(M.ViTConfig(**tuned["config"])).parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in state["param_groups"]) == n_trainable + 1   # + pos_embed
    no_decay = [g for g in state["param_groups"] if g["weight_decay"] == 0 and g["lr_scale"] == 0.75 ** 5]
    assert len(no_decay) == 1 and len(no_decay[0]["params"]) == 3   # cls_token, pos_embed, the patch bias
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)                                   # no --out: runs/finetune-<source>-<time>
    assert M.main(["finetune", "--ckpt", mae_run, "--epochs", "1", "--batch-size", "256", "--no-final-eval"]) == 0
    said = capsys.readouterr().out
    (made,) = os.listdir(tmp_path / "runs")
    assert made.startswith(f"finetune-{os.path.basename(mae_run)}-")
    assert json.load(open(tmp_path / "runs" / made / "config.json"))["finetuned_from"] == os.path.abspath(mae_run)
    assert "mimland finetune: loaded the encoder (" in said and f"tensors) of {mae_run}/checkpoint.pt; the classifier " \
        "(fc_norm, head) is new, as fine-tuning expects; it does not use the checkpoint's decoder, mask, norm (" in said
    assert f"mimland finetune: fine-tuning the encoder of {mae_run} on digits (1437 images) with vit_digits (8x8 " \
        "images, 16 tokens, " in said
    assert "mimland finetune: note: all 1 epochs lie inside the 5-epoch warm-up, so the lr never reaches its peak" in said
    assert "load_pretrained" not in said and "mimland train" not in said and "mimland finetune: done" in said


# ----------------------------------------------------------------------------------------------------
# analyses: attention distance and entropy, feature variance


def ref_encoder_trace(sd, cfg, imgs):
    """The reference encoder on full images, written out: each block's attention weights and output."""
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2) + ref_pos_embed(cfg.dim, cfg.grid)[:, 1:]
    cls = sd["cls_token"] + ref_pos_embed(cfg.dim, cfg.grid)[:, :1]
    x = torch.cat([cls.expand(len(imgs), -1, -1), x], dim=1)
    maps, outs = [], []
    for i in range(cfg.depth):
        pre, (N, T, D) = f"blocks.{i}.", x.shape
        h = F.layer_norm(x, (D,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-6)
        qkv = (h @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]).reshape(N, T, 3, cfg.heads, D // cfg.heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        maps.append(((q @ k.transpose(-2, -1)) * (D // cfg.heads) ** -0.5).softmax(dim=-1))
        x = ref_block(sd, pre, x, cfg.heads)
        outs.append(x)
    return maps, outs


@FAST
@given(grid=st.integers(2, 3), p=st.integers(1, 3), heads=st.integers(1, 3), depth=st.integers(1, 2),
       seed=st.integers(0, 999))
def test_attention_distance_entropy_and_feature_variance_equal_explicit_loops(grid, p, heads, depth, seed):
    torch.manual_seed(seed)
    cfg = M.ViTConfig(img_size=grid * p, patch_size=p, in_chans=2, dim=4 * heads, depth=depth, heads=heads,
                      decoder_dim=8, decoder_depth=1, decoder_heads=2)
    model = M.MAE(cfg)
    imgs = torch.randn(2, 2, grid * p, grid * p)
    maps, outs = ref_encoder_trace(model.state_dict(), cfg, imgs)
    L = grid * grid
    dist = torch.zeros(depth, heads, dtype=torch.float64)
    ent = torch.zeros(depth, heads, dtype=torch.float64)
    for b in range(depth):
        for n in range(2):
            for h in range(heads):
                for qi in range(L):
                    row = maps[b][n, h, 1 + qi, 1:].double()
                    row = row / row.sum()                                    # the cls key dropped, renormalized
                    for ki in range(L):
                        d = p * math.hypot(qi // grid - ki // grid, qi % grid - ki % grid)
                        dist[b, h] += row[ki] * d / (2 * L)
                        ent[b, h] -= row[ki] * math.log(row[ki]) / (2 * L) if row[ki] > 0 else 0.0
    torch.testing.assert_close(M.attention_distance(model, imgs).double(), dist, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M.attention_entropy(model, imgs).double(), ent, atol=1e-5, rtol=1e-5)
    var = torch.tensor([float(np.mean([np.var(o[n, 1:].numpy()) for n in range(2)])) for o in outs])
    torch.testing.assert_close(M.feature_variance(model, imgs), var, atol=1e-5, rtol=1e-4)


def test_uniform_attention_gives_the_mean_pairwise_distance_and_attention_on_itself_gives_zero():
    torch.manual_seed(0)
    cfg = M.ViTConfig(img_size=8, patch_size=4, in_chans=1, dim=16, depth=2, heads=2, decoder_dim=8,
                      decoder_depth=1, decoder_heads=2)
    model, imgs = M.SupervisedViT(cfg), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for blk in model.blocks:   # q = k = 0: every key weighs the same
            blk.attn.qkv.weight[:32] = 0
            blk.attn.qkv.bias[:32] = 0
    # a 2 x 2 grid of 4-pixel patches: from each patch, 0, 4, 4 and 4 sqrt(2) pixels to the four
    torch.testing.assert_close(M.attention_distance(model, imgs), torch.full((2, 2), (8 + 4 * math.sqrt(2)) / 4))
    torch.testing.assert_close(M.attention_entropy(model, imgs), torch.full((2, 2), math.log(4)))
    cfg = replace(cfg, heads=1)
    model = M.MAE(cfg)
    with torch.no_grad():
        for blk in model.blocks:   # q = k = 30 x: after LayerNorm every token's norm is the same, so each
            blk.attn.qkv.weight[:32] = 30 * torch.cat([torch.eye(16), torch.eye(16)])   # attends to itself alone
            blk.attn.qkv.bias[:32] = 0
    rc = M.RCMAE(cfg)
    rc.teacher.load_state_dict(model.state_dict())
    for net in (model, rc):                                    # RC-MAE: its teacher's encoder
        torch.testing.assert_close(M.attention_distance(net, imgs), torch.zeros(2, 1), atol=1e-4, rtol=0)
        torch.testing.assert_close(M.attention_entropy(net, imgs), torch.zeros(2, 1), atol=1e-3, rtol=0)
    assert model.training and M.feature_variance(model, imgs).shape == (2,)   # eval inside, the mode restored


def test_gradient_correction_takes_one_student_step_and_measures_the_consistency_gradient_there():
    torch.manual_seed(0)
    cfg = tiny_cfg(in_chans=1)
    model = M.RCMAE(cfg)
    with torch.no_grad():   # a teacher that differs from the student, as after training
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, noise, other = torch.randn(4, 1, 8, 8), torch.rand(4, 16), torch.randn(4, 1, 8, 8)
    out = M.gradient_correction(model, x, noise, {"same": (x, noise), "other": (other, noise)}, lr=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())       # the model is untouched
    # by hand: the teacher set to the student, one SGD step on the reconstruction, then autograd of the
    # consistency through RCMAE's own forward (loss - reconstruction, gamma 1)
    m = copy.deepcopy(model).eval()
    m.teacher.load_state_dict(m.student.state_dict())
    params = [p for p in m.student.parameters() if p.requires_grad]
    rec = m.student(x, 0.75, noise)[0]
    update = [-0.01 * g for g in torch.autograd.grad(rec, params)]
    with torch.no_grad():
        for p, u in zip(params, update):
            p.add_(u)
    for name, imgs in (("same", x), ("other", other)):
        g_loss = torch.autograd.grad(m(imgs, 0.75, noise)[0], params)
        g_rec = torch.autograd.grad(m.student(imgs, 0.75, noise)[0], params)
        g = torch.cat([(a - b).flatten() for a, b in zip(g_loss, g_rec)])
        u = torch.cat([v.flatten() for v in update])
        assert out[name]["correction_cosine"] == pytest.approx(F.cosine_similarity(-g, u, dim=0).item(), abs=1e-3)
        assert out[name]["correction_norm"] == pytest.approx((g.norm() / u.norm()).item(), rel=1e-3)
    assert out["same"]["input_similarity"] == pytest.approx(1.0)
    assert out["other"]["input_similarity"] == pytest.approx(F.cosine_similarity(other.flatten(), x.flatten(), dim=0).item())
    assert out["same"]["correction_cosine"] < 0                 # the correction opposes the previous update
    angles = M.mask_gradient_angles(model, x, noise, torch.rand(4, 16))
    g_rec, g_cons = M.rcmae_gradients(model.eval(), x, noise)
    assert angles["same_mask"] == pytest.approx(F.cosine_similarity(g_rec, g_cons, dim=0).item())
    assert -1 <= angles["different_mask"] <= 1 and angles["different_mask"] != angles["same_mask"]


def test_analyze_cli_writes_each_run_and_a_comparison(mae_run, sup_run, tmp_path, capsys):
    import shutil
    runs = [str(tmp_path / "mae"), str(tmp_path / "sup")]
    shutil.copytree(mae_run, runs[0])
    shutil.copytree(sup_run, runs[1])
    fig = str(tmp_path / "cmp.png")
    assert M.main(["analyze", "--compare", *runs, "--data-size", "40", "--out", fig]) == 0   # two chunks of 32 and 8
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"mimland analyze: wrote {fig}" and os.path.getsize(fig) > 5000
    for run, line in zip(runs, lines):
        rec = json.load(open(os.path.join(run, "analysis.json")))
        model, ckpt, cfg, data, a = M.load_run(run)
        imgs = M.eval_view(data.test.__getitems__(list(range(40)))[0], data, cfg.img_size)
        torch.testing.assert_close(torch.tensor(rec["attention_distance"]), M.attention_distance(model, imgs))
        torch.testing.assert_close(torch.tensor(rec["attention_entropy"]), M.attention_entropy(model, imgs))
        torch.testing.assert_close(torch.tensor(rec["feature_variance"]), M.feature_variance(model, imgs))
        assert rec["images"] == 40 and line.startswith(f"mimland analyze: {run} ({ckpt['method']}, 40 test images): ")
        assert os.path.getsize(os.path.join(run, "analysis.png")) > 5000
    assert M.main(["analyze", "--ckpt", runs[0], "--what", "features", "--data-size", "8", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert set(rec) == {"run", "method", "step", "data", "images", "feature_variance"}
    with mock.patch.object(M, "encoder_trace", wraps=M.encoder_trace) as trace:
        assert M.main(["analyze", "--ckpt", runs[0], "--data-size", "40", "--json"]) == 0
    assert trace.call_count == 2 and json.loads(capsys.readouterr().out)["images"] == 40   # one pass a chunk
    assert "not both" in bad(capsys, ["analyze", "--ckpt", runs[0], "--compare", *runs])
    assert "--what: attention,grads is not a comma-separated list of attention, features, gradients" in \
        bad(capsys, ["analyze", "--ckpt", runs[0], "--what", "attention,grads"])
    assert "measures RC-MAE's teacher correction; " in bad(capsys, ["analyze", "--ckpt", runs[0], "--what", "gradients"])
    rc = train_run(tmp_path / "rc", "--method", "rcmae", "--epochs", "1", "--no-final-eval")
    assert M.main(["analyze", "--ckpt", rc, "--what", "gradients"]) == 0
    grads = json.load(open(os.path.join(rc, "analysis.json")))["gradients"]
    probes = ["same images and masks", "same images, new masks", "other images, same classes", "other images",
              "noise images"]
    assert list(grads) == probes + ["mask angles"]
    for name in probes:   # [mean, sd] over 4 batches
        assert -1 <= grads[name]["correction_cosine"][0] <= 1 and grads[name]["correction_cosine"][1] >= 0
    assert grads["same images and masks"]["input_similarity"] == pytest.approx([1.0, 0.0], abs=1e-6)
    assert set(grads["mask angles"]) == {"same_mask", "different_mask"}
    assert "correction cosine, noise images: " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# loss landscapes and curvature


class Shapes(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in shapes)
        self.frozen = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)


@FAST
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), min_size=1, max_size=5),
       seed=st.integers(0, 999))
def test_filter_normalized_direction_matches_weight_slice_norms(shapes, seed):
    torch.manual_seed(seed)
    model = Shapes(shapes)
    d = M.filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    assert set(d) == {f"ps.{i}" for i in range(len(shapes))}           # frozen parameters never perturbed
    for i, w in enumerate(model.ps):
        if w.dim() == 1:
            assert torch.equal(d[f"ps.{i}"], torch.zeros_like(w))
        else:
            torch.testing.assert_close(d[f"ps.{i}"].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1))
    copy = M.filter_normalized_direction(model, torch.Generator().manual_seed(seed), ignore="copy")
    assert all(torch.equal(copy[f"ps.{i}"], w.detach()) for i, w in enumerate(model.ps) if w.dim() == 1)


@FAST
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), min_size=1, max_size=5),
       points=st.integers(1, 4), seed=st.integers(0, 999))
def test_grid_parameters_are_the_origin_plus_the_weighted_directions(shapes, points, seed):
    """params_at: every tensor of every point is theta + sum_k c_k d_k, each point's tensors contiguous, all
    views into one buffer that the next call reuses."""
    torch.manual_seed(seed)
    model = Shapes(shapes)
    g = torch.Generator().manual_seed(seed)
    ds = [M.filter_normalized_direction(model, g, ignore="copy") for _ in range(2)]
    ev = M.GridEvaluator(model, None, ds, batch_points=4)
    c = torch.randn(points, 2, generator=g)
    params = ev.params_at(c)
    assert set(params) == {f"model.ps.{i}" for i in range(len(shapes))}
    for i, w in enumerate(model.ps):
        got = params[f"model.ps.{i}"]
        assert got.shape == (points, *w.shape)
        for p in range(points):
            want = w.detach() + c[p, 0] * ds[0][f"ps.{i}"] + c[p, 1] * ds[1][f"ps.{i}"]
            torch.testing.assert_close(got[p], want, atol=1e-5, rtol=1e-5)
            assert got[p].is_contiguous()
        assert got.untyped_storage().data_ptr() == ev.buffer.untyped_storage().data_ptr()


class Quadratic(torch.nn.Module):
    """loss = 0.5 vec(W)^T A vec(W) + c^T vec(W) + |b|^2, exactly quadratic in the parameters."""

    def __init__(self, A, c):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.A, self.c = A, c

    def loss(self):
        w = self.W.flatten()
        return 0.5 * w @ self.A @ w + self.c @ w + (self.b ** 2).sum()


def test_surface_of_an_exact_quadratic_is_the_analytic_quadratic():
    torch.manual_seed(0)
    Q = torch.randn(12, 12, dtype=torch.float64)
    model = Quadratic(Q @ Q.T, torch.randn(12, dtype=torch.float64))
    xs, ys = torch.linspace(-1, 1, 7, dtype=torch.float64), torch.linspace(-0.5, 1.5, 5, dtype=torch.float64)
    d1, d2 = (M.filter_normalized_direction(model, torch.Generator().manual_seed(s)) for s in (1, 2))
    surf = M.landscape_2d(model, lambda m: m.loss(), xs, ys, [d1, d2], batch_points=8)
    w, b = model.W.detach().flatten(), model.b.detach()
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            v = w + x * d1["W"].flatten() + y * d2["W"].flatten()
            want = 0.5 * v @ model.A @ v + model.c @ v + (b ** 2).sum()
            assert surf[i, j].item() == pytest.approx(want.item(), rel=1e-6)
    assert surf.shape == (7, 5)                                            # indexing 'ij'
    assert M.landscape_2d(model, lambda m: m.loss(), xs[3:4], ys[1:2], [d1, d2])[0, 0].item() == \
        pytest.approx(model.loss().item(), rel=1e-6)                       # the origin is the model itself


@pytest.mark.parametrize("method", ["mae", "rcmae", "ssat"])
def test_the_plain_landscape_loop_equals_the_fast_paths(method):
    torch.manual_seed(0)
    model = M.build_model(method, tiny_cfg()).eval()
    imgs, y, noise = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0]), torch.rand(6, 16)
    net, loss_fn, params = M.pretraining_loss(model, M.Batch(imgs, y, noise, torch.rand(6, 16)), chunk=4)
    assert set(params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher.") for n in params) and "pos_embed" not in params
    before = [p.clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(1)
    ds = [M.filter_normalized_direction(net, g) for _ in range(2)]
    xs, ys = torch.linspace(-1, 1, 4), torch.linspace(-0.5, 0.5, 3)
    plain = M.landscape_loop(net, loss_fn, xs, ys, ds)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))      # the loop puts the weights back
    assert plain[1, 1] != plain[0, 0]
    for k in (1, 5):                                                              # one point a call, and vmapped
        torch.testing.assert_close(M.landscape_2d(net, loss_fn, xs, ys, ds, batch_points=k), plain, atol=2e-5,
                                   rtol=2e-5)
    if method == "ssat":                      # the classifier's loss: encoder and head, never the decoder
        _, cls_fn, cls_params = M.classification_loss(model, imgs, y)
        assert {n.split(".")[0] for n in cls_params} == {"patch_embed", "cls_token", "blocks", "norm", "head"}
        assert cls_fn(model).item() == pytest.approx(F.cross_entropy(model.logits(imgs), y).item())
    head = M.probe_head(16, 5).eval()                # its BatchNorm at its running statistics
    probe_net, probe_fn, probe_params = M.probe_loss(model.encoder, head, imgs, y, chunk=4)
    assert {n.split(".")[0] for n in probe_params} == {"encoder", "head"} and "encoder.pos_embed" not in probe_params
    assert not any(".decoder" in n or "mask_token" in n for n in probe_params)
    assert probe_fn(probe_net).item() == pytest.approx(F.cross_entropy(head(model.encoder.features(imgs)), y).item(),
                                                       rel=1e-6)


@pytest.mark.parametrize("method", ["mae", "rcmae", "ssat"])
def test_batched_landscape_equals_sequential_and_origin_equals_the_loss(method):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = M.build_model(method, cfg).eval()
    imgs, y, noise = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0]), torch.rand(6, 16)
    loss_fn = lambda m: m.training_loss(M.Batch(imgs, y, noise))[0]     # noqa: E731
    xs = torch.linspace(-1, 1, 5)
    g = torch.Generator().manual_seed(0)
    ds = [M.filter_normalized_direction(model, g) for _ in range(2)]
    batched = M.landscape_2d(model, loss_fn, xs, xs, ds, batch_points=7)
    sequential = M.landscape_2d(model, loss_fn, xs, xs, ds, batch_points=1)
    torch.testing.assert_close(batched, sequential, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        assert batched[2, 2].item() == pytest.approx(loss_fn(model).item(), rel=1e-5)
    assert batched.std() > 0
    if method == "rcmae":   # the teacher is held fixed: not among the perturbed parameters
        assert not any(n.startswith("teacher.") for n in M.trainable(model))


@pytest.mark.parametrize("faster", [1, 8])
def test_the_default_evaluator_times_both_paths_on_its_own_points_and_keeps_the_faster(faster, monkeypatch):
    torch.manual_seed(0)
    model = M.MAE(tiny_cfg()).eval()
    imgs, noise = torch.randn(4, 3, 8, 8), torch.rand(4, 16)
    loss_fn = lambda m: m(imgs, 0.75, noise)[0]                                       # noqa: E731
    g = torch.Generator().manual_seed(0)
    ds = [M.filter_normalized_direction(model, g) for _ in range(2)]
    coords = M.grid_coords(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6))         # 36 points
    want = M.evaluate_points(model, loss_fn, coords, ds, batch_points=1)
    small = M.GridEvaluator(model, loss_fn, ds)
    torch.testing.assert_close(small(coords[:24]), want[:24], atol=2e-5, rtol=2e-5)
    assert small.batch_points is None                             # too few points to tell: one at a time, undecided
    ev = M.GridEvaluator(model, loss_fn, ds)
    clock, run = iter(range(100)), ev.run
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock) * 1.0)

    def run_timed(c, k):   # a call of the path meant to be slower moves the clock on by 7 ticks
        for _ in range(7 if k != faster else 0):
            next(clock)
        return run(c, k)
    monkeypatch.setattr(ev, "run", run_timed)
    got = ev(coords)
    assert ev.batch_points == faster
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)   # every point, the timed ones included
    torch.testing.assert_close(M.landscape_2d(model, loss_fn, torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6), ds),
                               want.view(6, 6), atol=2e-5, rtol=2e-5)


def test_interpolation_between_two_models_hits_both_ends():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    a, b = M.MAE(cfg).eval(), M.MAE(cfg).eval()
    imgs, noise = torch.randn(4, 3, 8, 8), torch.rand(4, 16)
    loss_fn = lambda m: m(imgs, 0.75, noise)[0]                                 # noqa: E731
    curve = M.interpolate(a, loss_fn, M.trainable(a), M.trainable(b), torch.tensor([0.0, 0.5, 1.0]))
    with torch.no_grad():
        assert curve[0].item() == pytest.approx(loss_fn(a).item(), rel=1e-5)
        assert curve[2].item() == pytest.approx(loss_fn(b).item(), rel=1e-5)


class MatrixLoss(torch.nn.Module):
    """loss = 0.5 w^T A w: its Hessian is exactly A."""

    def __init__(self, A):
        super().__init__()
        self.A = A
        self.w = torch.nn.Parameter(torch.randn(len(A), dtype=torch.float64))

    def loss(self):
        return 0.5 * self.w @ self.A @ self.w


def spectrum_matrix(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.linspace(-3, 3, n - 3)]).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(lam) @ Q.T


def test_curvature_tools_match_numpy_on_an_explicit_symmetric_matrix():
    A = spectrum_matrix()
    H = M.Hessian(MatrixLoss(A), lambda m: m.loss())
    v = torch.randn(30, dtype=torch.float64)
    torch.testing.assert_close(H.mv(v), A @ v)
    evals = np.linalg.eigh(A.numpy())[0]
    by_magnitude = sorted(evals, key=abs, reverse=True)
    g = torch.Generator().manual_seed(1)
    top, vecs = M.top_eigenvalues(H, 3, iters=1000, tol=1e-10, generator=g)
    np.testing.assert_allclose(top.numpy(), by_magnitude[:3], rtol=1e-4)
    ext = M.extreme_eigenvalues(H, steps=30, generator=g)
    assert ext["lambda_max"] == pytest.approx(evals.max(), rel=1e-3)
    assert ext["lambda_min"] == pytest.approx(evals.min(), rel=1e-3)
    assert ext["ratio_min_max"] == pytest.approx(0.3, rel=1e-3)
    trace, se = M.hutchinson_trace(H, 3000, g)
    assert abs(trace - np.trace(A.numpy())) < 4 * se and se < 1.0
    slq = M.slq_density(H, steps=30, runs=40, generator=g)     # full Lanczos: nodes are the eigenvalues
    for run in slq["nodes"].view(40, -1):
        np.testing.assert_allclose(np.sort(run.numpy()), evals, atol=1e-8)
    assert slq["weights"].sum().item() == pytest.approx(1.0)
    assert (slq["weights"] * slq["nodes"]).sum().item() == pytest.approx(np.trace(A.numpy()) / 30, abs=0.4)
    assert slq["negative_share"] == pytest.approx((evals < 0).mean(), abs=0.08)
    grid, dens = slq["grid"], slq["density"]
    assert (dens * (grid[1] - grid[0])).sum().item() == pytest.approx(1.0, abs=0.02)   # a density


def test_extreme_eigenvalues_resolve_a_spectrum_clustered_near_zero():
    # a network-like spectrum: a few large eigenvalues, hundreds clustered in [-1, 0.5]; far fewer Lanczos
    # steps than dimensions still pin both ends
    g = torch.Generator().manual_seed(3)
    lam = torch.cat([torch.tensor([10.0, 7.0, 5.0]), -1 + 1.5 * torch.rand(297, generator=g)]).double()
    lam[3] = -1.0
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    H = M.Hessian(MatrixLoss(Q @ torch.diag(lam) @ Q.T), lambda m: m.loss())
    ext = M.extreme_eigenvalues(H, steps=60, generator=g)
    assert ext["lambda_max"] == pytest.approx(10.0, rel=1e-6)
    assert ext["lambda_min"] == pytest.approx(-1.0, abs=0.02) and ext["ratio_min_max"] == pytest.approx(0.1, abs=0.002)


def test_surface_measures_on_analytic_surfaces():
    xs = torch.linspace(-1, 1, 41)
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    bowl, saddle = 1 + X ** 2 + Y ** 2, 1 + X ** 2 - Y ** 2
    assert M.convex_share(bowl, xs, xs) == 1.0 and M.convex_share(saddle, xs, xs) == 0.0
    width = M.basin_width(bowl, xs, xs, rise=0.1)             # loss <= 1.1 on the disc of radius 0.316
    assert width == pytest.approx(2 * math.sqrt(0.1), abs=1e-6)   # (0.3, 0.1) is on the grid
    assert M.basin_width(1 + xs ** 2, xs, rise=0.1) == pytest.approx(0.6, abs=1e-6)   # grid step 0.05
    # an absolute rise works at a zero centre loss: 2(x^2 + y^2) <= 0.6 inside radius sqrt(0.3); the grid
    # point nearest inside is at 0.05 * sqrt(117) (no grid point lies on the circle)
    assert M.basin_width(2 * (X ** 2 + Y ** 2), xs, xs, rise=0.6) == pytest.approx(2 * 0.05 * math.sqrt(117), rel=1e-6)
    m = M.surface_metrics(bowl, xs, xs)
    assert m["centre_loss"] == 1.0 and m["basin_width_1.0"] > m["basin_width_0.1"] == pytest.approx(width)
    # convex width: the bowl is convex to the grid's interior edge (0.95 from the centre), the saddle nowhere;
    # r^2 - r^4 curves down radially beyond r = 1/sqrt(6) = 0.408 (d2f/dr2 = 2 - 12 r^2)
    assert m["convex_width"] == pytest.approx(1.9) and M.convex_width(saddle, xs, xs) == 0.0
    R2 = X ** 2 + Y ** 2
    assert 2 * 0.35 < M.convex_width(R2 - R2 ** 2, xs, xs) <= 2 / 6 ** 0.5


@pytest.mark.parametrize("points", [1, 4])
def test_compiled_grid_evaluator_matches_eager_and_pads_the_last_call(points):
    """--compile: one torch.compile'd vmap graph serves every call (one point per call included), the last
    one padded to batch_points."""
    torch.manual_seed(0)
    model = M.build_model("mae", tiny_cfg()).eval()
    imgs, noise = torch.randn(4, 3, 8, 8), torch.rand(4, 16)
    loss_fn = lambda m: m(imgs, 0.75, noise)[0]                                  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ds = [M.filter_normalized_direction(model, g) for _ in range(2)]
    coords = M.grid_coords(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3))    # 9 points: calls of 4, 4, 1+3
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = M.GridEvaluator(model, loss_fn, ds, batch_points=points, compiled=True)
    got = torch.cat([compiled(coords[:5]), compiled(coords[5:])])
    torch.testing.assert_close(got, M.evaluate_points(model, loss_fn, coords, ds, batch_points=1), atol=1e-5, rtol=1e-5)
    assert got.std() > 0 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_landscape_cli_resumes_a_cut_surface_and_matches_the_library(mae_run, tmp_path, monkeypatch, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(mae_run, run)
    argv = ["landscape", "--ckpt", run, "--grid", "5", "--data-size", "40", "--points-per-batch", "3",
            "--rounds-per-save", "1", "--json"]
    original, calls = M.GridEvaluator.__call__, [0]

    def cut(self, coords):
        calls[0] += 1
        if calls[0] == 2:
            signal.raise_signal(signal.SIGINT)
        return original(self, coords)
    monkeypatch.setattr(M.GridEvaluator, "__call__", cut)
    assert M.main(argv) == 130
    z = np.load(os.path.join(run, "landscape-pretrain-2d.npz"))
    assert np.isnan(z["surface"]).sum() == 25 - 6                # two rounds of 3 points were saved
    monkeypatch.setattr(M.GridEvaluator, "__call__", original)
    assert M.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    z = np.load(os.path.join(run, "landscape-pretrain-2d.npz"))
    net, loss_fn, _ = M.landscape_problem(run, "pretrain", 40, "train", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    want = M.landscape_2d(net, loss_fn, torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 5),
                          [M.filter_normalized_direction(net, g) for _ in range(2)])
    np.testing.assert_allclose(z["surface"], want.numpy(), rtol=1e-5)
    assert out["centre_loss"] == pytest.approx(float(want[2, 2]), rel=1e-6) and 0 <= out["convex_share"] <= 1
    for kind in ("contour", "filled", "surface"):
        assert os.path.getsize(os.path.join(run, f"landscape-pretrain-2d-{kind}.png")) > 5000


def test_landscape_compare_probe_and_cls_losses(mae_run, sup_run, tmp_path, capsys):
    import shutil
    runs = [str(tmp_path / "mae"), str(tmp_path / "sup")]
    shutil.copytree(mae_run, runs[0])
    shutil.copytree(sup_run, runs[1])
    fig = str(tmp_path / "cmp.png")
    assert M.main(["landscape", "--compare", *runs, "--loss", "probe", "--grid", "3", "--data-size", "16",
                   "--out", fig]) == 0
    assert os.path.getsize(fig) > 5000
    assert M.main(["landscape", "--ckpt", runs[1], "--loss", "cls", "--dim", "1", "--grid", "5",
                   "--data-size", "16"]) == 0
    assert os.path.isfile(os.path.join(runs[1], "landscape-cls-1d.png"))
    rec = json.load(open(os.path.join(runs[1], "landscape-cls-1d.json")))
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"mimland landscape: {runs[1]} (sup, cls loss, 5-point line): centre loss {rec['centre_loss']:.4g}, basin width "
        f"{rec['basin_width_0.1']:.3g} (rise 0.1) / {rec['basin_width_1.0']:.3g} (rise 1.0); figures landscape-cls-1d.png; "
        f"-> {os.path.join(runs[1], 'landscape-cls-1d.json')}")
    assert M.main(["landscape", "--ckpt", runs[0], "--loss", "cls", "--grid", "3"]) == 2
    assert "needs a classifier" in capsys.readouterr().err
    # another directions seed is another file; --no-figures draws nothing
    assert M.main(["landscape", "--ckpt", runs[1], "--loss", "cls", "--dim", "1", "--grid", "5", "--data-size", "16",
                   "--seed", "1", "--no-figures"]) == 0
    other = json.load(open(os.path.join(runs[1], "landscape-cls-1d-seed1.json")))
    assert other["direction_seed"] == 1 and other["figures"] == [] and other["centre_loss"] == rec["centre_loss"]
    assert not os.path.exists(os.path.join(runs[1], "landscape-cls-1d-seed1.png"))
    assert capsys.readouterr().out.strip().endswith("; figures none; -> " + os.path.join(runs[1], "landscape-cls-1d-seed1.json"))


def test_probe_file_keeps_each_head_and_its_surfaces_apart(mae_run, tmp_path, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(mae_run, run)
    default = open(os.path.join(run, "probe.pt"), "rb").read()
    assert M.main(["probe", "--ckpt", run, "--epochs", "3", "--blr", "0.01", "--probe-file", "probe-short.pt", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["probe_acc"]
    assert open(os.path.join(run, "probe.pt"), "rb").read() == default            # the training's head untouched
    assert json.load(open(os.path.join(run, "probe-short.json")))["probe_acc"] == acc
    assert M.read_checkpoint(os.path.join(run, "probe-short.pt"))["probe_acc"] == acc
    centre = {}
    for name in ("probe.pt", "probe-short.pt"):
        assert M.main(["landscape", "--ckpt", run, "--loss", "probe", "--probe-file", name, "--grid", "3",
                       "--data-size", "16", "--points-per-batch", "1", "--json"]) == 0
        centre[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["centre_loss"]
        with np.load(os.path.join(run, f"landscape-{name[:-3]}-2d.npz")) as z:
            assert json.loads(str(z["meta"]))["probe_file"] == name
    assert centre["probe.pt"] != pytest.approx(centre["probe-short.pt"], rel=1e-3)
    assert M.main(["hessian", "--ckpt", run, "--loss", "probe", "--probe-file", "probe-short.pt", "--data-size", "8",
                   "--top-k", "1", "--iters", "2", "--trace-samples", "1", "--slq-steps", "2", "--slq-runs", "1"]) == 0
    assert json.load(open(os.path.join(run, "hessian-probe-short.json")))["probe_file"] == "probe-short.pt"
    capsys.readouterr()
    # a head replaced under a finished surface: the surface is computed afresh, never resumed with it
    shutil.copy(os.path.join(run, "probe-short.pt"), os.path.join(run, "probe.pt"))
    assert M.main(["landscape", "--ckpt", run, "--loss", "probe", "--grid", "3", "--data-size", "16",
                   "--points-per-batch", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "probe_sha256" in err and "computing afresh" in err
    assert json.loads(out.strip().splitlines()[-1])["centre_loss"] == pytest.approx(centre["probe-short.pt"], rel=1e-6)
    probe_loss = ["landscape", "--ckpt", run, "--loss", "probe", "--probe-file"]
    for argv, says in ((probe_loss + ["probe-none.pt"], "no linear probe probe-none.pt"),
                       (probe_loss + ["../probe.pt"], "probe*.pt"),
                       (["probe", "--ckpt", run, "--probe-file", "head.pt"], "probe*.pt"),
                       (["probe", "--random-init", "--probe-file", "probe-x.pt"], "drop --probe-file")):
        assert says in bad(capsys, argv)
    assert not {"head.pt", "probe-x.pt", "probe-none.pt"} & set(os.listdir(run))


def test_hessian_cli_reports_curvature(mae_run, tmp_path, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(mae_run, run)
    assert M.main(["hessian", "--ckpt", run, "--data-size", "16", "--top-k", "2", "--iters", "20",
                   "--trace-samples", "4", "--slq-steps", "8", "--slq-runs", "2"]) == 0
    captured = capsys.readouterr()
    out = json.load(open(os.path.join(run, "hessian-pretrain.json")))
    assert "/68 [" in captured.err                     # the progress bar: at most 2 x 20 + 8 x 3 + 4 products
    done = re.findall(r"Hessian: done: 100%\|[^|]*\| (\d+)/(\d+) \[", captured.err)   # it ends at 100%
    assert done and done[-1][0] == done[-1][1] and 4 + 2 < int(done[-1][0]) <= 68
    for phase in ("top eigenvalues", "lambda_min, lambda_max", "trace", "spectral density"):
        assert f"Hessian: {phase}" in captured.err
    line = captured.out.strip()
    assert line.startswith(f"mimland hessian: {run} (mae, pretrain loss, {out['parameters']:,} parameters, {done[-1][0]} "
                           f"Hessian-vector products") and f"lambda_max {out['lambda_max']:.4g}" in line
    assert line.endswith(f"figure {run}/hessian-pretrain.png; -> {run}/hessian-pretrain.json")
    assert abs(out["top_eigenvalues"][0]) >= abs(out["top_eigenvalues"][1])
    assert out["lambda_max"] >= out["lambda_min"] and 0 <= out["negative_share"] <= 1
    assert out["parameters"] == sum(p.numel() for p in M.load_run(run)[0].parameters() if p.requires_grad)
    assert os.path.isfile(os.path.join(run, "hessian-pretrain.json"))


def test_probe_landscape_hessian_and_analyze_read_a_moco_run(moco_run, tmp_path, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(moco_run, run)
    model, _, cfg, data, a = M.load_run(run)
    assert M.main(["probe", "--ckpt", run, "--epochs", "3", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["features"] == "model" and 0 < rec["probe_acc"] <= 1 and 0 < rec["knn_acc"] <= 1
    net, loss_fn, info = M.landscape_problem(run, "pretrain", 20, "test", torch.device("cpu"), chunk=8)
    names = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert names == {"patch_embed", "cls_token", "blocks", "norm", "projector", "predictor"}   # the momentum branch fixed
    views = M.fixed_views(data.test.__getitems__(list(range(20)))[0],
                          lambda s: M.step_generator(0, 0, "landscape-" + s, torch.device("cpu")), a, data, cfg.img_size)
    chunks = [(0, 8), (8, 16), (16, 20)]   # negatives within each chunk, each image weighing the same
    with torch.no_grad():
        want = sum(model(views[:, i:j]) * (j - i) for i, j in chunks) / 20
        torch.testing.assert_close(loss_fn(net), want)
    assert M.main(["landscape", "--ckpt", run, "--grid", "3", "--data-size", "16"]) == 0
    surface = np.load(os.path.join(run, "landscape-pretrain-2d.npz"))["surface"]
    assert np.isfinite(surface).all() and surface.shape == (3, 3)
    assert M.main(["landscape", "--ckpt", run, "--loss", "probe", "--dim", "1", "--grid", "3", "--data-size", "16"]) == 0
    assert M.main(["hessian", "--ckpt", run, "--data-size", "16", "--top-k", "1", "--iters", "5",
                   "--trace-samples", "2", "--slq-steps", "4", "--slq-runs", "1"]) == 0
    out = json.load(open(os.path.join(run, "hessian-pretrain.json")))
    assert out["parameters"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert M.main(["analyze", "--ckpt", run, "--data-size", "8"]) == 0
    assert len(json.load(open(os.path.join(run, "analysis.json")))["attention_distance"]) == 4


def test_landscape_split_over_two_processes_equals_one(mae_run, tmp_path):
    import shutil
    surfaces = []
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        run = str(tmp_path / name)
        shutil.copytree(mae_run, run)
        r = subprocess.run([sys.executable, *launcher, "mimland.py", "landscape", "--ckpt", run, "--grid", "5",
                            "--data-size", "24", "--points-per-batch", "2", "--device", "cpu"], cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        surfaces.append(np.load(os.path.join(run, "landscape-pretrain-2d.npz"))["surface"])
    assert not np.isnan(surfaces[1]).any()
    np.testing.assert_allclose(surfaces[0], surfaces[1], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# linear_theory.py: each check passes at small sizes, and fails when its prediction is wrong


import linear_theory as T  # noqa: E402


def all_pass(rows):
    return rows and all(r.passed for r in rows)


def test_rcmae_conditional_momentum_checks():
    assert all_pass(T.check_rcmae(steps=12))
    off_by_one = lambda deltas, a: sum((a ** (k - 1) * deltas[len(deltas) - k]            # noqa: E731
                                        for k in range(1, len(deltas) + 1)), torch.zeros_like(deltas[0]) if deltas else 0)
    rows = T.check_rcmae(steps=12, predict=off_by_one)
    assert not rows[0].passed and not rows[1].passed     # the gap and the gradient identities fail
    c = T.conditional_correction([0.0, 0.5, 1.0])
    assert c["norm"][0] < 1e-15 and c["norm"][2] == pytest.approx(2 * c["norm"][1])


def test_ssl_landscape_checks():
    assert all_pass(T.check_landscapes(samples=50_000, batches=60))
    doubled_quartic = lambda W, a, s, N, tau: T.infonce_expansion(W, a, s, N, tau) + \
        (torch.trace((W @ torch.diag(a + s) @ W.T) @ (W @ torch.diag(a + s) @ W.T)) / (2 * tau ** 2)).item()  # noqa: E731
    assert not all_pass(T.check_landscapes(samples=50_000, batches=60, infonce=doubled_quartic))
    no_noise = lambda W, a, s: T.spectral_exact(W, a, torch.zeros_like(s))                  # noqa: E731
    assert not all_pass(T.check_landscapes(samples=50_000, batches=60, spectral=no_noise))


def test_weight_decay_optima_and_collapse_checks():
    assert all_pass(T.check_optima(steps=1500))
    wrong = lambda a, s, gamma, tau: T.optimum_infonce(a, s, gamma / 2, tau)                # noqa: E731
    assert not all_pass(T.check_optima(steps=1500, infonce=wrong))
    assert all_pass(T.check_barlow(samples=50_000))
    assert not all_pass(T.check_barlow(samples=50_000, formula=lambda W, a, s: torch.ones(3, dtype=torch.float64)))
    rows, (weak, strong) = T.check_collapse(steps=3000)
    assert all_pass(rows) and strong[8] / strong[7] > 10 and weak[8] / weak[7] < 1.1


def test_normalization_bias_and_imbalance_checks():
    assert all_pass(T.check_effects(steps=1500))


def test_linear_theory_cli_exits_non_zero_when_a_check_fails(monkeypatch, tmp_path, capsys):
    bad = T.Check("a claim", "1", "2", "0", False)
    monkeypatch.setattr(T, "run_all", lambda: ([bad, T.Check("fine", "1", "1", "0", True)], None))
    assert T.main(["--json", str(tmp_path / "rows.json")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 passed, 1 failed" in out
    assert json.load(open(tmp_path / "rows.json"))[0]["passed"] is False
    (tmp_path / "f").write_text("")
    for argv, says in ((["--json", str(tmp_path / "no" / "rows.json")], "there is no directory"),
                       (["--plots", str(tmp_path / "f")], "is a file")):
        assert T.main(argv) == 2 and says in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# bench.py: its building blocks (timings themselves are measured there, never asserted here)




def test_bench_flop_count_step_and_projection_helpers():
    cfg = tiny_cfg(dim=32, decoder_dim=16)
    cpu = torch.device("cpu")
    for method in Bn.METHODS:
        assert Bn.counted_flops(method, cfg, cpu) == M.flops_per_image(cfg, method, train=False)
    step, model = Bn.make_step("rcmae", cfg, 4, cpu, "bf16")
    before = [p.clone() for p in model.teacher.parameters()]
    step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))   # EMA ran
    step, model = Bn.make_step("rcmae", cfg, 4, cpu, ema="loop")
    with mock.patch.object(M, "train_step", wraps=M.train_step) as train_step:
        step()                                                                   # bench times mimland's own step
    assert train_step.call_count == 1
    loop = [p.clone() for p in model.teacher.parameters()]
    step, model = Bn.make_step("rcmae", cfg, 4, cpu)
    step()
    for a, b in zip(loop, model.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)    # the reference's loop EMA: the same teacher
    assert 0 < Bn.half_matmul_slowdown(torch.bfloat16, n=64) < math.inf
    calls = {"a": 0, "b": 0}

    def counted(k):
        def call():
            calls[k] += 1
        return call
    times = Bn.time_interleaved({k: counted(k) for k in calls}, cpu, rounds=2, per_round=3, warmup=2, once={"b"})
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 2 + 2 * 3, "b": 1 + 2}             # "once": one warm-up, one call a round
    with mock.patch.object(Bn, "peak_probes", return_value={"fp32": (counted("peak"), 1e9)}):
        calls["peak"] = 0
        times, peaks = Bn.time_with_peaks({"a": counted("a")}, cpu, dtypes=("fp32",), rounds=3, per_round=4)
    assert set(times) == {"a"} and set(peaks) == {"fp32"} and calls["peak"] == 1 + 3
    probes = Bn.peak_probes(cpu)   # not run: a CPU with no bf16 hardware takes seconds for one bf16 probe
    assert {k: flops for k, (_, flops) in probes.items()} == {"fp32": 2 * 4096 ** 3, "bf16": 2 * 2048 ** 3}
    times, peaks = Bn.time_with_peaks({"a": lambda: None}, cpu, dtypes=("fp32",), rounds=1, per_round=1, warmup=0)
    assert set(times) == {"a"} and set(peaks) == {"fp32"} and peaks["fp32"] > 1e9
    assert Bn.hours(800, Bn.IMAGENET_TRAIN / 3600) == pytest.approx(800.0)     # one epoch an hour
    assert Bn.hours(800, Bn.IMAGENET_TRAIN / 3600, devices=8) == pytest.approx(100.0)
    rows = Bn.projection_rows("ViT-B/16", {"mae": 100.0, "sup": 100.0})
    assert [r[2] for r in rows] == ["800 ep", "1600 ep", "300 ep"] and rows[0][6] == Bn.fmt(Bn.hours(800, 100.0, 64))
    a, x = torch.randn(256, 256), torch.randn(1 << 16)
    assert Bn.matmul_time_share(lambda: x.exp().sin()) == 0.0
    assert 0.5 < Bn.matmul_time_share(lambda: [a @ a for _ in range(4)]) <= 1.0

    with mock.patch.object(F, "scaled_dot_product_attention", side_effect=AssertionError("the explicit form ran SDPA")):
        Bn.make_step("mae", cfg, 4, cpu, "fp32", attention="explicit")[0]()
        with pytest.raises(AssertionError):
            Bn.make_step("mae", cfg, 4, cpu, "fp32")[0]()                    # mimland runs SDPA
        with pytest.raises(AssertionError):
            Bn.make_step("mae", cfg, 4, cpu, "fp32", attention="math")[0]()  # SDPA, its math kernel


def test_bench_cpu_memory_grows_with_the_batch_and_a_failed_child_raises():
    cfg, cpu = tiny_cfg(img_size=32, patch_size=4, dim=64), torch.device("cpu")
    small, big = (Bn.peak_memory_mb("mae", cfg, b, cpu, "fp32", True) for b in (8, 512))
    assert 0 < small and big > small + 50          # MB: the activations of 504 more images
    with pytest.raises(RuntimeError, match="exit code"):
        Bn.peak_memory_mb("byol", cfg, 8, cpu, "fp32", True)


def test_bench_landscape_split_raises_with_what_the_failed_child_said():
    import subprocess
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="mae pretrain: 10pt/s\nRuntimeError: gloo timed out\n")
    with mock.patch.object(subprocess, "run", return_value=failed) as run:
        with pytest.raises(RuntimeError, match=r"`python mimland.py train .*` exited with status 1: RuntimeError: gloo timed out$"):
            Bn.landscape_split(9)
    assert run.call_count == 1                                      # nothing run after the failure


def test_bench_landscape_throughput_reports_each_path_and_the_peer():
    cfg = tiny_cfg()
    out = Bn.landscape_throughput(cfg, torch.device("cpu"), images=2, points=8, compiled=False, rounds=1)
    paths = ("vmap, 8 points per call", "one point per call")
    assert out["auto choice"] in ("vmap", "one at a time") and out["best path"] in paths
    assert out["best"] == out[out["best path"]] and out["library defaults"] > 0
    fwd = M.flops_per_image(cfg, "mae", train=False) * 2
    for name in paths:   # points per second, and forward FLOP/s from the analytic count
        assert out[name] > 0 and out[f"{name} forward FLOP/s"] == pytest.approx(out[name] * fwd)
    assert out["best forward FLOP/s"] == pytest.approx(out["best"] * fwd) and out["fp32 peak here"] > 1e9
    assert "compiled" not in out and set(out["matmul time share"]) == {out["best path"]}
    assert 0 < out["matmul time share"][out["best path"]] < 1 and out["page faults per vmap call"] >= 0
    try:
        import loss_landscapes  # noqa: F401
    except ImportError:
        assert "loss-landscapes random_plane" not in out
    else:
        assert out["loss-landscapes random_plane"] > 0
        assert out["library defaults / peer"] == pytest.approx(out["library defaults"] / out["loss-landscapes random_plane"])


def test_bench_loader_throughput_times_both_pipelines():
    out = Bn.loader_throughput(torch.device("cpu"), seconds=0.2, batches_per_worker=3)
    workers = min(8, os.cpu_count())
    assert set(out) == {"digits in memory + augmentation (img/s)",
                        f"folder JPEG 500x375 -> 256 decode, {workers} workers (img/s)"}
    assert all(v > 0 for v in out.values())


def test_bench_rejects_bad_flags(capsys, tmp_path):
    assert Bn.main(["--methods", "mae,byol"]) == 2
    assert Bn.main(["--full", "--sizes", "vit_base,vit_huge"]) == 2
    if not torch.cuda.is_available():
        assert Bn.main(["--full"]) == 2
    assert "error" in capsys.readouterr().err
    for argv, says in ((["--json", os.path.join(str(tmp_path), "no", "b.json")], "b.json is not in an existing directory"),
                       (["--rounds", "0"], "0 is not a positive integer")):
        with pytest.raises(SystemExit) as e:
            Bn.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(says + " (see --help)")


def test_bench_bars_read_saved_runs_and_mark_what_is_not_met(capsys, tmp_path):
    runs = pathlib.Path(Bn.__file__).with_name("docs") / "bench"
    cpu, gpu = (str(runs / f) for f in ("cpu-epyc-avx2-2cores-6.json", "h100-vit_base.json"))
    reports = Bn.read_reports([cpu, gpu])
    ((size, row),) = Bn.targets(reports["cpu-epyc-avx2-2cores-6"])
    assert size == "ViT 192x6 @32/4"
    assert {k: (met, text) for k, (_, met, text) in row.items()} == {
        "MAE / vit-pytorch step, eager (<= 1)": (False, "1.06"), "per model FLOP": (None, "1.02"),
        "fastest MAE / fp32 peak (>= 75%)": (False, "72%"), "RC-MAE / MAE step, worst row (<= 1.4)": (True, "1.34"),
        "RC-MAE / MAE memory (<= 1.15)": (True, "1.08"),
        "compiled landscape / fp32 peak, 8 images (CPU: >= 60%)": (False, "59%"),
        "compiled landscape / fp32 peak, 64 images (CPU: >= 60%)": (True, "67%"), "run s (CPU: < 600)": (True, "534")}
    ((size, row),) = Bn.targets(reports["h100-vit_base"])   # on a GPU: MFU of the spec peak, no CPU targets
    assert size == "ViT-B/16" and row["fastest MAE / spec bf16 peak (ViT-B/16: >= 40%)"][1:] == (False, "28%")
    assert row["run s (CPU: < 600)"][1:] == (None, "-")   # that run stopped before its end
    assert Bn.main(["--targets", cpu, gpu]) == 0
    out = capsys.readouterr().out
    assert "| cpu-epyc-avx2-2cores-6 | AMD EPYC | ViT 192x6 @32/4 | 1.06 x | 1.02 | 72% x | 1.34 | 1.08 | 59% x | 67% | 534 |" in out
    (tmp_path / "stopped.json").write_text('{"info": {"device": "cpu"}, "steps": []}')
    (tmp_path / "text.json").write_text("| not | json |")
    for argv, says in (([str(tmp_path / "none.json")], "No such file"), ([str(tmp_path / "stopped.json")], "ratios table"),
                       ([str(tmp_path / "text.json")], "cannot read it as JSON"), ([cpu, "--rounds", "2"], "no other option")):
        assert Bn.main(["--targets"] + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bench.py: error: ") and says in err


def test_the_quick_start_is_two_commands_and_ci_runs_the_second_as_written():
    readme = pathlib.Path(M.__file__).with_name("README.md").read_text()
    block = re.search(r"## Quick start\s*\n+```[^\n]*\n(.*?)```", readme, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].endswith("python mimland.py train --method rcmae")
    assert lines[1].endswith("python -m pytest -q") and all(line.startswith("pip install torch==2.13.0 &&")
                                                             for line in lines)
    assert lines[1] in pathlib.Path(M.__file__).with_name(".ci").joinpath("run").read_text().splitlines()


def test_readme_reading_guide_names_what_mimland_py_defines_before_its_machinery():
    """Every name the README's reading guide gives for the ideas is a preset, a method of a model, or defined
    in mimland.py above its machinery; no function there is over 80 lines, train_step at most 40, train 80."""
    import ast
    src = pathlib.Path(M.__file__).read_text()
    readme = pathlib.Path(M.__file__).with_name("README.md").read_text()
    guide = readme[readme.index("## Reading mimland.py"):readme.index("## Results by paper")]
    ideas = guide[:guide.index("Then **the machinery**")]
    names = [n.split(".")[-1] for n in re.findall(r"`([A-Za-z_][\w.]*)`", ideas)]
    tree = ast.parse(src)
    machinery = next(i for i, line in enumerate(src.splitlines(), 1) if line.startswith("# MACHINERY"))
    top = {t.id if isinstance(t, ast.Name) else "": n.lineno for n in tree.body if isinstance(n, ast.Assign)
           for t in n.targets}
    top.update({n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))})
    methods = {f.name for n in tree.body if isinstance(n, ast.ClassDef) for f in n.body if isinstance(f, ast.FunctionDef)}
    assert len(names) > 30
    for n in names:
        assert n in M.PRESETS or n in methods or top.get(n, machinery) < machinery, n
    for section in ("config", "building blocks", "models", "the training step", "evaluation", "landscapes"):
        assert f"- {section}" in ideas
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert max(lengths.values()) <= 50 and lengths["train_step"] <= 25


def test_the_ideas_read_alone_and_train_step_has_no_method_branch():
    """No function or class above the MACHINERY fence uses a name defined below it (besides its own locals)."""
    import ast
    src = pathlib.Path(M.__file__).read_text()
    tree = ast.parse(src)
    fence = next(i for i, line in enumerate(src.splitlines(), 1) if line.startswith("# MACHINERY"))
    below = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno > fence}
    below |= {t.id for n in tree.body if isinstance(n, ast.Assign) and n.lineno > fence for t in n.targets
              if isinstance(t, ast.Name)}
    assert {"train", "load_data", "atomic_save", "main"} <= below
    for node in tree.body:
        if node.lineno > fence or not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            continue
        names = [n for n in ast.walk(node) if isinstance(n, ast.Name)]
        local = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)} | \
            {n.id for n in names if isinstance(n.ctx, ast.Store)}
        used = {n.id for n in names if isinstance(n.ctx, ast.Load)} - local
        assert not used & below, (getattr(node, "name", "an assignment"), used & below)
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    assert "method" not in ast.unparse(step) and "isinstance" not in ast.unparse(step)


# ----------------------------------------------------------------------------------------------------
# studies


def test_paired_interval_and_verdict():
    mean, low, high = Bn.paired_interval([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])      # differences 1, 2, 3: sd 1
    assert mean == 2.0 and (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert [Bn.verdict(0.1, 0.5, 1), Bn.verdict(0.1, 0.5, -1), Bn.verdict(-0.1, 0.5, 1), Bn.verdict(-0.5, -0.1, -1)] == \
        ["reproduced", "contradicted", "inconclusive", "reproduced"]
    assert math.isnan(Bn.paired_interval([1.0], [0.0])[1])
    assert Bn.detectable([3.0, 5.0, 7.0], [2.0, 3.0, 4.0]) == pytest.approx((4.303 + 1.061) / 3 ** 0.5)
    assert math.isnan(Bn.detectable([1.0], [0.0]))
    # the paper's effect: an interval across 0 that excludes it, and one that holds it
    assert Bn.verdict(-0.004, 0.001, 1, effect=0.011) == "no effect of the paper's size"
    assert Bn.verdict(-0.004, 0.02, 1, effect=0.011) == "inconclusive"
    assert Bn.verdict(-0.02, 0.004, -1, effect=0.011) == "inconclusive"      # -0.011 lies inside
    assert Bn.verdict(0.1, 0.5, 1, effect=0.2, settled=False) == "not tested"
    assert Bn.verdict(math.nan, math.nan, 1, effect=0.2) == "inconclusive"     # one seed: no interval


def write_run(path, method, knn):
    """A made-up finished run: results.json and the evaluations of metrics.jsonl, (epoch, value) pairs."""
    os.makedirs(path)
    key = "test_acc" if method in ("sup", "ssat") else "knn_acc"
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"method": method}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"kind": "eval", "epoch": e, key: v}) + "\n" for e, v in knn)


def test_judged_claims_need_settled_runs_and_state_their_power(tmp_path):
    """Made-up numbers: a settled and an unsettled arm, a powered and an underpowered comparison."""
    settled = [(e, 0.80 + 0.01 * min(e, 80) / 80 + 0.001 * (e == 90)) for e in range(10, 101, 10)]  # moves 0.001
    rising = [(e, 0.5 + 0.004 * e) for e in range(10, 101, 10)]                                    # moves 0.08
    done = []
    for seed in range(5):
        for name, method, curve in (("a", "mae", settled), ("b", "rcmae", settled), ("c", "rcmae", rising),
                                    ("f", "sup", settled)):
            d = str(tmp_path / f"s{seed}" / name)
            write_run(d, method, curve)
            done.append((seed, Bn.Step(name, ["train" if name != "f" else "finetune"]), d))
    done.append((0, Bn.Step("g", ["train"]), str(tmp_path / "g1")))
    write_run(str(tmp_path / "g1"), "mae", [(100, 0.9)])                    # one evaluation: nothing to read
    values = {s: {"a:x": 0.80 + 0.001 * s, "b:x": 0.83 + 0.002 * s, "c:x": 0.9, "f:y": 0.5 + 0.01 * (-1) ** s,
                  "a:y": 0.5, "g:x": 0.9} for s in range(5)}
    values[0]["a:z"], values[0]["b:z"] = 1.0, 2.0                           # a number on seed 0 only
    claims = [Bn.Claim("powered", "b:x", "a:x", 1, 0.011, "p"), Bn.Claim("unsettled", "c:x", "a:x"),
              Bn.Claim("underpowered", "f:y", "a:y", 1, 0.002, "q"), Bn.Claim("one reading", "g:x", "a:x"),
              Bn.Claim("one seed", "b:z", "a:z")]
    rows = {r["text"]: r for r in Bn.judge_claims(claims, values, done)}
    r = rows["powered"]
    assert r["verdict"] == "reproduced" and r["settled"] and r["seeds"] == [0, 1, 2, 3, 4]
    assert r["moved"] == {"a": {"metric": "knn_acc", "moved": pytest.approx(0.001)},
                          "b": {"metric": "knn_acc", "moved": pytest.approx(0.001)}}
    assert r["detectable"] == pytest.approx(Bn.detectable(r["values_a"], r["values_b"])) and r["detectable"] > 0
    r = rows["unsettled"]                       # its interval excludes 0, but the run still rises
    assert r["low"] > 0 and r["moved"]["c"]["moved"] == pytest.approx(0.08) and r["verdict"] == "not tested"
    r = rows["underpowered"]                    # test accuracy of the classifier; the seeds' spread hides 0.002
    assert r["moved"]["f"]["metric"] == "test_acc" and r["low"] < 0 < 0.002 < r["high"]
    assert r["verdict"] == "inconclusive" and r["detectable"] > 0.002
    assert math.isnan(rows["one reading"]["moved"]["g"]["moved"]) and rows["one reading"]["verdict"] == "not tested"
    assert rows["one seed"]["seeds"] == [0] and rows["one seed"]["verdict"] == "inconclusive"


def test_a_study_runs_each_step_once_resumes_and_judges_its_claims(tmp_path, monkeypatch, capsys):
    def steps(seed, quick, data):
        s = ["--epochs", "1", "--batch-size", "256", "--seed", str(seed), "--data", data]
        return [Bn.Step("sup", ["train", "--method", "sup", *s]), Bn.Step("mae", ["train", "--method", "mae", *s]),
                Bn.Step("mae", ["analyze", "--ckpt", "{mae}", "--what", "features", "--data-size", "8"], "analysis.json")]
    claims = [Bn.Claim("sup's features beat MAE's under k-NN", "sup:knn_acc", "mae:knn_acc"),
              Bn.Claim("MAE's last block varies less than ...", "mae/analysis:feature_variance.3",
                      "mae/analysis:abs:feature_variance.0", -1)]
    monkeypatch.setitem(Bn.STUDIES, "tiny", Bn.Study("a tiny study", steps, claims, {"digits": (2, "seconds")},
                                                   ("knn_acc",), "two epochs"))
    out = str(tmp_path / "st")
    assert Bn.main(["study", "tiny", "--out", out]) == 0
    said = capsys.readouterr().out
    assert "step 1/6 (seed 0): python mimland.py train --method sup" in said and "step 6/6 (seed 1)" in said
    res = json.load(open(os.path.join(out, "results.json")))
    assert [(r["seed"], r["name"], r["file"]) for r in res["runs"]] == [
        (s, n, f) for s in (0, 1) for n, f in (("sup", "results.json"), ("mae", "results.json"), ("mae", "analysis.json"))]
    for r in res["runs"]:
        assert r["record"] == Bn.flat_numbers(json.load(open(os.path.join(r["dir"], r["file"]))))
    knn = {(r["seed"], r["name"]): r["record"]["knn_acc"] for r in res["runs"] if r["file"] == "results.json"}
    c = res["claims"][0]
    assert c["values_a"] == [knn[0, "sup"], knn[1, "sup"]] and c["values_b"] == [knn[0, "mae"], knn[1, "mae"]]
    mean, low, high = Bn.paired_interval(c["values_a"], c["values_b"])
    assert (c["difference"], c["low"], c["high"], c["verdict"]) == (mean, low, high, "not tested")   # one eval a run
    assert c["moved"]["sup"]["metric"] == "test_acc" and math.isnan(c["moved"]["sup"]["moved"])
    fv = json.load(open(os.path.join(out, "s1", "mae", "analysis.json")))["feature_variance"]
    assert res["claims"][1]["values_a"][1] == fv[3] and res["claims"][1]["values_b"][1] == abs(fv[0])
    report = open(os.path.join(out, "report.md")).read()
    assert f"| {Bn.number(mean, mean, '+')} ({Bn.number(low, mean, '+')} to {Bn.number(high, mean, '+')}) | " in report
    assert "`mae` k-NN unread, `sup` test acc. unread: not settled | **not tested** |" in report
    assert f"| `sup` | {Bn.mean_sd([knn[0, 'sup'], knn[1, 'sup']])} |" in report
    assert os.path.getsize(os.path.join(out, "tiny-claims.png")) > 5000 and "](tiny-claims.png)" in report
    os.remove(os.path.join(out, "s1", "mae", "results.json"))               # a training cut short: it resumes
    with mock.patch.object(M, "train", wraps=M.train) as train:
        assert Bn.main(["study", "tiny", "--out", out]) == 0                  # everything else is kept
    assert train.call_count == 1 and train.call_args[0][0].resume == os.path.join(out, "s1", "mae")
    assert "step 5/6 (seed 1)" in capsys.readouterr().out
    ledger = json.load(open(os.path.join(out, "steps.json")))          # each record's command
    assert ledger["s1/mae/analysis.json"] == steps(1, False, "digits")[2].argv

    def changed(seed, quick, data):                                     # a measurement with other settings is redone
        st = steps(seed, quick, data)
        st[2].argv[-1] = "4"
        return st
    monkeypatch.setattr(Bn.STUDIES["tiny"], "steps", changed)
    with mock.patch.object(M, "train", wraps=M.train) as train, \
            mock.patch.object(M, "analyze_run", wraps=M.analyze_run) as analyze:
        assert Bn.main(["study", "tiny", "--out", out]) == 0
    assert train.call_count == 0 and analyze.call_count == 2
    assert json.load(open(os.path.join(out, "s0", "mae", "analysis.json")))["images"] == 4
    monkeypatch.setattr(Bn.STUDIES["tiny"], "steps", lambda seed, quick, data: [    # a training is refused
        Bn.Step("sup", ["train", "--method", "sup", "--epochs", "2", "--seed", str(seed)])])
    assert "was trained with other settings than this study's" in bad(capsys, ["study", "tiny", "--out", out], Bn.main)
    assert "study needs a NAME: " in bad(capsys, ["study"], Bn.main)
    assert "invalid choice: 'nosuch'" in bad(capsys, ["study", "nosuch"], Bn.main)
    monkeypatch.setattr(M, "FASHION_DEBIAN", str(tmp_path / "none"))       # Fashion-MNIST missing: said before any run
    monkeypatch.delenv("MIMLAND_DATA", raising=False)
    err = bad(capsys, ["study", "ssat", "--data", "fashion-mnist", "--out", str(tmp_path / "f")], Bn.main)
    assert "install them with apt-get install dataset-fashion-mnist" in err and not os.path.exists(tmp_path / "f")
    assert "study rcmae runs on digits, not fashion-mnist" in bad(capsys, ["study", "rcmae", "--data", "fashion-mnist"], Bn.main)


def test_the_fashion_part_of_ssat_trains_every_size_for_the_same_steps(capsys):
    steps = Bn.ssat_steps(0, False, "fashion-mnist")
    trains = [step for step in steps if step.argv[0] in ("train", "finetune")]
    assert sorted(step.name for step in trains) == sorted(f"{m}-{n}" for m in ("sup", "ssat", "mae", "ft")
                                                          for n in (1000, 4000, 16000))       # no ablations here
    for step in trains:
        flag = lambda f: int(step.argv[step.argv.index(f) + 1])                            # noqa: E731
        n, batch, epochs = flag("--train-size"), flag("--batch-size"), flag("--epochs")
        assert batch == 128 and 312 <= epochs * (n // batch) < 312 + n // batch      # 312 steps, whole epochs
        assert flag("--eval-every") == epochs                                         # evaluated once, at the end
    assert not any("--eval-every" in step.argv for step in Bn.ssat_steps(0, False, "digits"))
    ablations = lambda data: [c for c in Bn.study_claims("ssat", data) if "ablation" in c.text]   # noqa: E731
    assert len(ablations("digits")) == 4 and ablations("fashion-mnist") == []
    assert Bn.main(["study", "--list"]) == 0
    assert "fashion-mnist: 17 steps a seed, 12 claims, default 3 seeds" in capsys.readouterr().out


def test_claim_values_average_every_match_of_a_pattern():
    values = {"mae/landscape-probe-2d:convex_width": 0.4, "mae/landscape-probe-2d-seed1:convex_width": 0.6,
              "mae/analysis:attention_entropy.2.0": -1.0, "mae/analysis:attention_entropy.3.1": 3.0,
              "mae/analysis:attention_entropy.0.0": 100.0, "mae:knn_acc": 0.9}
    assert Bn.claim_value(values, "mae/landscape-probe-2d*:convex_width") == pytest.approx(0.5)
    assert Bn.claim_value(values, "mae/analysis:attention_entropy.[23]*") == 1.0
    assert Bn.claim_value(values, "mae/analysis:abs:attention_entropy.[23]*") == 2.0
    assert Bn.claim_value(values, "mae:knn_acc") == 0.9
    with pytest.raises(KeyError):
        Bn.claim_value(values, "sup:knn_acc")
    assert (Bn.number(0.00412), Bn.number(0.91234), Bn.number(86.04), Bn.number(-0.0012, -0.0012, "+")) == \
        ("0.00412", "0.912", "86", "-0.0012")


@pytest.mark.parametrize("name", ["rcmae", "landscape", "ssat"])
def test_every_study_runs_quick_judges_every_claim_and_caches(name, tmp_path, capsys):
    out = str(tmp_path / name)             # one seed: the interval and the rule are tested on two above
    assert Bn.main(["study", name, "--quick", "--seeds", "1", "--out", out]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    claims = Bn.study_claims(name, "digits", quick=True)
    assert [c["text"] for c in res["claims"]] == [c.text for c in claims]
    values = {0: {}}                       # recomputed from every run's own record
    for r in res["runs"]:
        key = r["name"] if r["file"] == "results.json" else f"{r['name']}/{r['file'][:-5]}"
        values[r["seed"]].update({f"{key}:{k}": v for k, v in
                                  Bn.flat_numbers(json.load(open(os.path.join(r["dir"], r["file"])))).items()})
    report = open(os.path.join(out, "report.md")).read()
    assert "**--quick**: every training runs 2 epochs of 32 images from 96" in report
    for c, row in zip(claims, res["claims"]):
        a, b = [Bn.claim_value(values[0], c.a)], [Bn.claim_value(values[0], c.b)]
        assert (row["values_a"], row["values_b"], row["verdict"]) == (a, b, "not tested")   # 2 epochs: unsettled
        cell = c.text.replace("|", "\\|")
        assert row["difference"] == a[0] - b[0] and f"| {cell} (`{c.a}`" in report
    for figure in re.findall(r"\]\(([\w.-]+\.png)\)", report):
        assert os.path.getsize(os.path.join(out, figure)) > 5000
    assert len(re.findall(r"\]\(", report)) >= 2
    capsys.readouterr()
    with mock.patch.object(M, "train") as train, mock.patch.object(M, "compute_surface") as surface, \
            mock.patch.object(M, "Hessian") as hessian, mock.patch.object(M, "analyze_run") as analyze:
        assert Bn.main(["study", name, "--quick", "--seeds", "1", "--out", out]) == 0      # all cached
    assert train.call_count == surface.call_count == hessian.call_count == analyze.call_count == 0
    assert json.load(open(os.path.join(out, "results.json")))["claims"] == res["claims"]
    assert "step " not in capsys.readouterr().out
