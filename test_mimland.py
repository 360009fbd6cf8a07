"""mimland's tests: tiny models, few steps, 2 CPU cores. Run: python -m pytest -q"""
import math
import os
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

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
def test_sdpa_attention_equals_explicit_softmax(heads, head_dim, T, seed):
    torch.manual_seed(seed)
    D = heads * head_dim
    attn = M.Attention(D, heads)
    x = torch.randn(2, T, D)
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(2, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1)
    want = (a @ v).transpose(1, 2).reshape(2, T, D) @ attn.proj.weight.T + attn.proj.bias
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
    want_loss, want_pred, want_mask = ref_mae(model.state_dict(), cfg, imgs, ratio, noise, norm_pix)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)


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
    same, diff = M.RCMAE(cfg), M.RCMAE(cfg, same_mask=False)
    diff.load_state_dict(same.state_dict())
    imgs, noise, t_noise = torch.randn(2, 3, 8, 8), torch.rand(2, 16), torch.rand(2, 16)
    _, _, _, p_same = same(imgs, 0.75, noise)
    _, _, _, p_diff = diff(imgs, 0.75, noise, teacher_noise=t_noise)
    assert p_same["cons"].item() == 0.0            # equal weights, same mask: zero consistency
    assert p_diff["cons"].item() > 0.0


def test_update_teacher_obeys_ema_formula_exactly():
    torch.manual_seed(4)
    model = M.RCMAE(tiny_cfg()).double()
    with torch.no_grad():
        for p in model.student.parameters():
            p.copy_(torch.randn_like(p))
    t0 = [p.clone() for p in model.teacher.parameters()]
    s = [p.clone() for p in model.student.parameters()]
    m = 0.9973
    model.update_teacher(m)
    for t_new, t_old, s_p in zip(model.teacher.parameters(), t0, s):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s_p, atol=1e-15, rtol=1e-15)
    assert any(not torch.equal(a, b) for a, b in zip(model.teacher.parameters(), t0))


def test_momentum_schedule_is_cosine_from_base_to_one():
    T = 100
    ms = [M.RCMAE.momentum(t, T) for t in range(T + 1)]
    assert ms[0] == pytest.approx(0.996) and ms[-1] == pytest.approx(1.0)
    assert ms[50] == pytest.approx(0.998)
    assert all(b >= a for a, b in zip(ms, ms[1:]))


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
    """Key -> shape of the reference MAE / timm layout, written out from REFERENCE.md."""
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
