"""bench.py: how fast mimland trains, against the hardware's limit, the papers' numbers and peer code.

    python bench.py                 # this CPU: reduced scale (ViT 192 wide, 6 deep, 32x32 images), < 10 min
    python bench.py --full          # one GPU: ViT-B/16 and ViT-L/16 at 224, per-GPU batch 64 as the reference
                                    # (compiled, with CUDA graphs, also 256); --sizes vit_base for one size
    python bench.py --json out.json # every figure, the device, torch version and configuration
    python bench.py --targets a.json b.json   # measure nothing: saved runs side by side, against the targets

Step times are medians over interleaved rounds (the methods take turns, so drift in the machine's speed
affects them alike), on synthetic data already on the device. Model FLOPs are mimland's analytic count,
cross-checked against torch.utils.flop_counter. Peers (the PyPI packages vit-pytorch and loss-landscapes)
run in the same process when installed and are never required.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from unittest import mock

import torch

import mimland as M

IMAGENET_TRAIN = 1_281_167
# Published anchors (the MAE paper's Table 2, the official repositories, timm's benchmark).
REFERENCE = {
    "MAE ViT-L 800 ep, 64 V100 (hours)": 42.0,
    "MAE Table 2, ViT-L 800 ep, 128 TPU-v3: mask tokens in the encoder (hours)": 42.4,
    "MAE Table 2: visible-only encoder, 8-block decoder (hours)": 15.4,
    "MAE Table 2: visible-only encoder, 1-block decoder (hours)": 11.6,
    "timm supervised ViT-B/16, RTX 3090, AMP, batch 192 (img/s)": 391,
    "vit-pytorch MAE on this CPU (img/s at 430 MFLOP/img)": 304,
}
DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}
CPU_SIZE = dict(img_size=32, patch_size=4, in_chans=3, dim=192, depth=6, heads=3, num_classes=10,
                decoder_dim=128, decoder_depth=2, decoder_heads=2)   # the vit-pytorch comparison's sizes
METHODS = ("sup", "mae", "rcmae", "ssat")
PEER = "vit-pytorch MAE"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# the machine


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, sizes=(1024, 2048, 4096), reps=10) -> float:
    """Best measured FLOP/s of square matmuls: the honest ceiling of this machine for that dtype."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def device_info(device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["name"] = name
        info["spec_bf16_peak"] = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
    else:
        import platform
        info["name"] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            info["name"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    return info


# ----------------------------------------------------------------------------------------------------
# training steps


def synthetic_batch(cfg, batch, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=g)
    noise = torch.rand(batch, cfg.num_patches, device=device, generator=g)
    return imgs, labels, noise


def explicit_attention(q, k, v):
    """The reference's attention, softmax(q k^T * head_dim**-0.5) v, for the variant rows."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def make_step(method, cfg, batch, device, precision="fp32", compiled=False, fused=True, ema="foreach",
              attention=None, graphs=True):
    """One optimizer step of a method on a fixed synthetic batch: mimland.train_step itself, as `train` runs it
    (its loss read back every step). Compiled on a GPU, the forward and backward replay as CUDA graphs (mode
    "reduce-overhead") unless graphs=False: a ViT-B step launches over a thousand kernels, which take longer
    to launch from Python than to run at the reference's per-GPU batch of 64."""
    torch.manual_seed(0)
    model = M.build_model(method, cfg).to(device).train()
    graphs = compiled and graphs and device.type == "cuda"
    run = torch.compile(M.TrainingLoss(model), dynamic=False, mode="reduce-overhead" if graphs else None) \
        if compiled else None
    opt = torch.optim.AdamW(M.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    imgs, labels, noise = synthetic_batch(cfg, batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if method == "rcmae" and ema != "foreach":   # the reference's loop: one mul_ and one add_ per parameter
        def loop_ema(m):
            with torch.no_grad():
                for s, t in zip(model.student.parameters(), model.teacher.parameters()):
                    t.mul_(m).add_((1 - m) * s)
        model.ema_update = loop_ema

    def attn():   # None: mimland's SDPA; "explicit": the reference's softmax(q k^T * scale) v; "math": SDPA's math kernel
        stack = contextlib.ExitStack()
        if attention == "explicit":
            stack.enter_context(mock.patch.object(M.F, "scaled_dot_product_attention", explicit_attention))
        if attention == "math":
            stack.enter_context(torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH))
        return stack

    def step():
        if graphs:   # the last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with attn():
            M.train_step(model, opt, [M.Batch(imgs, labels, noise)], 1e-4, 0.996, loss_fn=run, autocast=autocast)
    return step, model


SLOW_HALF = 2.0   # a half_matmul_slowdown above this: bench.py leaves bf16 out


def half_matmul_slowdown(dtype: torch.dtype, n: int = 256) -> float:
    """How many times as long an n x n matmul takes in `dtype` (bf16, fp16) as in fp32 on this CPU, best of 3:
    about 1 or less on a CPU with matmul hardware for it (AVX-512 BF16, AMX), 34-86 for n = 128-1024 on an
    AVX2-only AMD EPYC, where PyTorch falls back to a generic kernel."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def best(x, y):
        times = []
        for _ in range(4):   # the first call warms up
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times[1:])
    return best(a.to(dtype), b.to(dtype)) / best(a, b)


def time_interleaved(steps: dict, device, rounds=5, per_round=4, warmup=3, once=()) -> dict:
    """Median seconds per call of each function; the functions take turns round by round (those named in
    `once`: one warm-up call, then one call per round)."""
    for k, fn in steps.items():
        for _ in range(1 if k in once else warmup):
            fn()
    sync(device)
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            for _ in range(1 if k in once else per_round):
                t = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_probes(device, dtypes=tuple(DTYPES)) -> dict:
    """One square matmul per dtype at a size where this machine's matmuls peak -> {dtype: (call, FLOPs)}."""
    probes = {}
    for name in dtypes:
        n = 4096 if name == "fp32" else 2048 if device.type == "cpu" else 8192
        a, b = (torch.randn(n, n, device=device, dtype=DTYPES[name]) for _ in range(2))
        probes[name] = (lambda a=a, b=b: a @ b, 2 * n ** 3)
    return probes


def time_with_peaks(steps: dict, device, dtypes=tuple(DTYPES), **kw) -> tuple:
    """time_interleaved of the steps and of the peak probes of `dtypes`, taking turns: (seconds per call, matmul
    peak FLOP/s per dtype in the same minutes). On a machine whose speed drifts, shares of a peak measured at
    another time are off by the drift."""
    probes = peak_probes(device, dtypes)   # once a round: a 4096 fp32 probe takes over 1 s on a CPU
    times = time_interleaved({**steps, **{f"{k} peak": call for k, (call, _) in probes.items()}}, device,
                             once={f"{k} peak" for k in probes}, **kw)
    return times, {k: flops / times.pop(f"{k} peak") for k, (_, flops) in probes.items()}


def paired_ratio(a, b, device, pairs=16, warmup=3) -> float:
    """Median over pairs of time(a) / time(b), the two run back to back in alternating order: an A/B test
    that cancels the drift of a shared machine."""
    for _ in range(warmup):
        a()
        b()
    ratios = []
    for i in range(pairs):
        t = {}
        for name, fn in ((("a", a), ("b", b)) if i % 2 else (("b", b), ("a", a))):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            t[name] = time.perf_counter() - t0
        ratios.append(t["a"] / t["b"])
    return statistics.median(ratios)


def counted_flops(method, cfg, device) -> float:
    """Forward FLOPs per image from torch.utils.flop_counter (math attention, which it can see); method
    "vit-pytorch MAE" counts the peer."""
    from torch.utils.flop_counter import FlopCounterMode
    model = peer_mae(cfg, device) if method == PEER else M.build_model(method, cfg).to(device).eval()
    imgs, labels, noise = synthetic_batch(cfg, 2, device)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), \
            FlopCounterMode(display=False) as fc:
        if method == PEER:
            model(imgs)
        elif method == "rcmae":   # the student's forward (the teacher's is the same again)
            model.student(imgs, 0.75, noise)
        else:
            model.training_loss(M.Batch(imgs, labels, noise))
    return fc.get_total_flops() / 2


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _memory_child(method, cfg_dict, batch, precision, keep_freed, queue):
    torch.set_num_threads(1)
    if keep_freed:   # as the parent process runs
        M.keep_freed_memory()
    cfg = M.ViTConfig(**cfg_dict)
    before = _rss_mb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current RSS
        f.write("5")
    step, _ = make_step(method, cfg, batch, torch.device("cpu"), precision)
    for _ in range(3):
        step()
    queue.put(_rss_mb("VmHWM:") - before)


def peak_memory_mb(method, cfg, batch, device, precision, keep_freed: bool) -> float:
    """Training memory (model, optimizer, activations): on a GPU the peak allocated in a step over what was
    allocated before the model was built, or on a CPU the growth of peak RSS over a fresh process's idle
    state, measured in a child process."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        step, _ = make_step(method, cfg, batch, device, precision)
        step()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(method, dataclasses.asdict(cfg), batch, precision, keep_freed, queue))
    p.start()
    p.join()   # the child's one float fits in the pipe's buffer, so it can exit before the get
    if p.exitcode != 0:
        raise RuntimeError(f"the memory-measuring child process of {method} failed (exit code {p.exitcode})")
    return queue.get(timeout=10)


# ----------------------------------------------------------------------------------------------------
# peers


def import_vit_pytorch():
    """vit-pytorch imports torchvision at import time; with no CPU torchvision a stub module lets its MAE load."""
    try:
        if "torchvision" not in sys.modules:
            tv = types.ModuleType("torchvision")
            tv.transforms = types.ModuleType("torchvision.transforms")
            sys.modules.setdefault("torchvision", tv)
            sys.modules.setdefault("torchvision.transforms", tv.transforms)
        import vit_pytorch
        return vit_pytorch
    except ImportError:
        return None


def peer_mae(cfg, device):
    """vit-pytorch's MAE at the same sizes (its encoder must use pool='mean'); None when not installed."""
    vp = import_vit_pytorch()
    if vp is None:
        return None
    torch.manual_seed(0)
    enc = vp.ViT(image_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes, dim=cfg.dim,
                 depth=cfg.depth, heads=cfg.heads, mlp_dim=int(cfg.dim * cfg.mlp_ratio), pool="mean",
                 channels=cfg.in_chans, dim_head=cfg.dim // cfg.heads)
    return vp.MAE(encoder=enc, decoder_dim=cfg.decoder_dim, masking_ratio=0.75, decoder_depth=cfg.decoder_depth,
                  decoder_heads=cfg.decoder_heads, decoder_dim_head=cfg.decoder_dim // cfg.decoder_heads).to(device)


def peer_mae_step(cfg, batch, device, precision):
    """One training step of vit-pytorch's MAE, trained the same way as make_step trains mimland's."""
    model = peer_mae(cfg, device)
    if model is None:
        return None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    imgs, _, _ = synthetic_batch(cfg, batch, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def block_ratios(cfg, batch, device, precision) -> dict:
    """Where the MAE head-to-head goes: paired ratios of the transformer stacks alone (blocks + final norm,
    forward, backward, fused AdamW), mimland's over vit-pytorch's at the same token count (the encoder on the
    kept patches, the decoder on every patch), and mimland's encoder with the reference's cls token over the
    same without it. {} when the peer is not installed."""
    if import_vit_pytorch() is None:
        return {}
    from vit_pytorch.vit import Transformer
    keep, L = int(cfg.num_patches * 0.25), cfg.num_patches

    def stack(dim, depth, heads, tokens, peer):
        torch.manual_seed(0)
        net = Transformer(dim=dim, depth=depth, heads=heads, dim_head=dim // heads, mlp_dim=int(dim * cfg.mlp_ratio)) \
            if peer else torch.nn.Sequential(*[M.Block(dim, heads, cfg.mlp_ratio) for _ in range(depth)],
                                             torch.nn.LayerNorm(dim, eps=1e-6))
        net = net.to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
        x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                y = net(x)
            y.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    enc = (cfg.dim, cfg.depth, cfg.heads)
    dec = (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
    return {f"encoder blocks on {keep} tokens": paired_ratio(stack(*enc, keep, False), stack(*enc, keep, True), device),
            f"decoder blocks on {L} tokens": paired_ratio(stack(*dec, L, False), stack(*dec, L, True), device),
            "cls": paired_ratio(stack(*enc, keep + 1, False), stack(*enc, keep, False), device)}


# ----------------------------------------------------------------------------------------------------
# data loading and landscapes


def loader_throughput(device, seconds=5.0, batches_per_worker=10) -> dict:
    """Images per second the input pipelines deliver with no model: the in-memory digits through the
    sampler and the on-device augmentation, and JPEG decoding of a class-per-folder tree (224 crops) with
    the workers mimland's loaders use, in the steady state: the clock starts once the workers have started
    and delivered the two batches each prefetches."""
    out = {}
    data = M.load_digits_data()
    sampler = M.GlobalBatchSampler(len(data.train), 128, 1, 0, 1, seed=0)
    loader = iter(torch.utils.data.DataLoader(data.train, batch_sampler=sampler, collate_fn=M._identity))
    n, t0, step = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        u8, _ = next(loader)
        boxes = M.sample_crops(128, 8, 8, M.step_generator(0, step, "crop", device), 0.2)
        M.train_view(u8.to(device), boxes, data, 8)
        n, step = n + 128, step + 1
    sync(device)
    out["digits in memory + augmentation (img/s)"] = n / (time.perf_counter() - t0)
    from PIL import Image
    with tempfile.TemporaryDirectory() as root:
        g = torch.Generator().manual_seed(0)
        for split in ("train", "val", "src"):
            for c in ("a", "b"):
                os.makedirs(os.path.join(root, split, c))
        sources = []
        for i in range(16):    # smooth photo-like images, 500x375 JPEG, each linked under many names
            base = torch.rand(3, 12, 16, generator=g)
            img = torch.nn.functional.interpolate(base[None], size=(375, 500), mode="bicubic")[0]
            sources.append(os.path.join(root, "src", f"{i}.jpg"))
            Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).save(sources[-1], quality=90)
        workers = min(8, os.cpu_count() or 1)   # as M.loader_workers gives a folder
        for i in range(32 * batches_per_worker * workers):
            os.link(sources[i % 16], os.path.join(root, "train", "ab"[i % 2], f"{i}.jpg"))
        for i in range(2):
            os.link(sources[i], os.path.join(root, "val", "ab"[i], f"{i}.jpg"))
        folder = M.load_folder(root, 224)
        n, start = 0, 2 * workers
        for i, (u8, _) in enumerate(M.eval_batches(folder.train, 32, workers)):
            if i == start:
                t0 = time.perf_counter()
            n += len(u8) if i > start else 0
        out[f"folder JPEG 500x375 -> 256 decode, {workers} workers (img/s)"] = n / (time.perf_counter() - t0)
    return out


MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution"}


def matmul_time_share(fn) -> float:
    """Share of one call's operator time spent in matmul kernels (torch.profiler): a forward's FLOP/s over
    the peak is this share times the matmuls' own efficiency, so it says which of the two limits a path."""
    from torch.profiler import profile
    fn()
    with profile() as prof:
        fn()
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / sum(e.self_cpu_time_total for e in events)


def landscape_throughput(cfg, device, images: int, points: int = 16, compiled: bool = True, rounds: int = 3) -> dict:
    """Grid points per second of an MAE pre-training-loss surface: batched (vmap), sequential, compiled
    with torch.compile, and the PyPI loss-landscapes' random_plane on the
    same model and data (on a 4 x 4 grid); FLOP/s shares are over the fp32 peak of the same minutes
    (time_with_peaks)."""
    torch.manual_seed(0)
    model = M.MAE(cfg).to(device).eval()
    imgs, _, noise = synthetic_batch(cfg, images, device)
    loss_fn = lambda m: m(imgs, 0.75, noise)[0]                                       # noqa: E731
    g = torch.Generator().manual_seed(0)
    ds = [M.filter_normalized_direction(model, g) for _ in range(2)]
    side = math.ceil(math.sqrt(points))
    coords = M.grid_coords(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side))[:points]
    auto = M.GridEvaluator(model, loss_fn, ds)                                    # the library's default
    auto(M.grid_coords(torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 5)))          # 25 points: it chooses
    k = auto.batch_points
    evaluators = {"vmap, 8 points per call": M.GridEvaluator(model, loss_fn, ds, batch_points=8),
                  "one point per call": M.GridEvaluator(model, loss_fn, ds, batch_points=1)}
    out = {"auto choice": "vmap" if k > 1 else "one at a time"}
    if compiled:
        t = time.perf_counter()
        evaluators["compiled"] = M.GridEvaluator(model, loss_fn, ds, batch_points=max(k, 8), compiled=True)
        evaluators["compiled"](coords[:8])
        out["compile s"] = time.perf_counter() - t
    times, here = time_with_peaks({name: (lambda e=e: e(coords)) for name, e in evaluators.items()}, device,
                                  dtypes=("fp32",), rounds=rounds, per_round=1, warmup=1)
    out["fp32 peak here"] = here["fp32"]
    fwd = M.flops_per_image(cfg, "mae", train=False) * images
    for name, t in times.items():
        out[name] = points / t
        out[f"{name} forward FLOP/s"] = points * fwd / t
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt   # what malloc's settings change (keep_freed_memory)
    evaluators["vmap, 8 points per call"](coords[:8])
    out["page faults per vmap call"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    out["best path"] = min(("vmap, 8 points per call", "one point per call"), key=times.get)
    out["best"] = out[out["best path"]]
    out["best forward FLOP/s"] = out["best"] * fwd
    if device.type == "cpu":   # the profiler's times are the CPU's own
        out["matmul time share"] = {name: matmul_time_share(lambda e=evaluators[name]: e(coords))
                                    for name in (out["best path"], "compiled") if name in evaluators}
    out.update(library_against_peer(model, imgs, noise, ds, steps=4) if device.type == "cpu" else {})
    return out


SMALL_VIT = dict(img_size=16, patch_size=4, in_chans=3, dim=64, depth=2, heads=4, decoder_dim=64, decoder_depth=1,
                 decoder_heads=4)   # a user's small model: 16 tokens, 64 wide


def library_against_peer(model, imgs, noise, ds, steps: int) -> dict:
    """Points per second over a steps x steps grid on [-1, 1]^2 of an MAE's loss: mimland.landscape_2d called
    with its defaults (a fresh call: its choice of path included) and, where installed, the PyPI
    loss-landscapes' random_plane on the same model, data and grid (it draws its own directions on the CPU)."""
    loss_fn = lambda m: m(imgs, 0.75, noise)[0]                                       # noqa: E731
    xs = torch.linspace(-1, 1, steps)
    with torch.no_grad():   # the process's first forward (allocator, kernels) is neither side's cost
        loss_fn(model.eval())
    t = time.perf_counter()
    M.landscape_2d(model, loss_fn, xs, xs, ds)
    out = {"library defaults": steps ** 2 / (time.perf_counter() - t)}
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return out

    class Loss(torch.nn.Module):
        def __init__(self, mae):
            super().__init__()
            self.mae = mae

        def forward(self, x):
            return self.mae(x, 0.75, noise)[0]
    metric = loss_landscapes.metrics.Loss(lambda out, _: out, imgs, None)
    peer = Loss(copy.deepcopy(model))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # its filter normalization divides by a bias vector's norm: zero biases crash it
        for p in peer.parameters():
            if p.dim() == 1 and not p.any():
                p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p))
    t = time.perf_counter()
    loss_landscapes.random_plane(peer, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True)
    out["loss-landscapes random_plane"] = steps ** 2 / (time.perf_counter() - t)
    out["library defaults / peer"] = out["library defaults"] / out["loss-landscapes random_plane"]
    return out


def small_vit_landscape(images: int = 128, steps: int = 11) -> dict:
    """library_against_peer on SMALL_VIT: the library call a user makes on a small model."""
    torch.manual_seed(0)
    cfg = M.ViTConfig(**SMALL_VIT)
    model = M.MAE(cfg).eval()
    imgs, _, noise = synthetic_batch(cfg, images, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    return library_against_peer(model, imgs, noise, [M.filter_normalized_direction(model, g) for _ in range(2)], steps)


def landscape_split(grid: int, procs: int = 2) -> dict:
    """Grid points per second of the CLI, `python mimland.py landscape` on a digits MAE (trained for one
    epoch), in one process and split over `procs` processes under torchrun with the threads shared out:
    the per-round gather costs against the parallel work. Seconds from the surface's own clock (.npz)."""
    import numpy as np
    here = os.path.dirname(os.path.abspath(M.__file__))
    out = {}

    def child(*args, env=None):   # a failure raises with the command and the last lines it wrote
        r = subprocess.run([sys.executable, *args], cwd=here, env=env, capture_output=True, text=True)
        if r.returncode:
            said = [line for line in r.stderr.splitlines() if line.strip() and "pt/s" not in line][-4:]
            raise RuntimeError(f"`python {' '.join(args)}` exited with status {r.returncode}: {' | '.join(said)}")
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "digits-mae")
        child("mimland.py", "train", "--method", "mae", "--epochs", "1", "--no-final-eval", "--out", run)
        for n in (1, procs):
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
            child(*launcher, "mimland.py", "landscape", "--ckpt", run, "--grid", str(grid), "--points-per-batch", "8",
                  "--device", "cpu", env={**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n))})
            npz = os.path.join(run, "landscape-pretrain-2d.npz")
            with np.load(npz) as z:
                out[n] = grid ** 2 / json.loads(str(z["meta"]))["seconds"]
            os.remove(npz)   # or the next command would resume the finished surface
    return out


# ----------------------------------------------------------------------------------------------------
# report


def hours(epochs, img_s, devices=1):
    return epochs * IMAGENET_TRAIN / (img_s * devices) / 3600


PROJ_HEADER = ["model", "method", "schedule", "img/s per device", "1 device", "8 devices", "64 devices"]


def projection_rows(size: str, img_s: dict) -> list:
    """Hours of the reference schedules (MAE / RC-MAE 800 and 1600 epochs, supervised 300) on 1, 8, 64 devices."""
    out = []
    for m, speed in img_s.items():
        for epochs in ((300,) if m == "sup" else (100,) if m == "ssat" else (800, 1600)):
            out.append([size, m, f"{epochs} ep", fmt(speed), fmt(hours(epochs, speed)), fmt(hours(epochs, speed, 8)),
                        fmt(hours(epochs, speed, 64))])
    return out


def table(title, header, rows) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def targets(report: dict) -> list:
    """What the performance targets are judged on, read from a run's report (its --json file): per model size,
    (size, {column: (value, met, text)}), met None where no target applies; the landscape's figures and the run's
    time go with the first size."""
    cpu = report["info"]["device"] == "cpu"
    out = []
    for i, (size, ratios) in enumerate(report.get("ratios", {}).items()):
        row = {}

        def put(name, value, target=None, pct=False):   # target: the test a figure must pass, where one applies
            text = "-" if value is None else f"{value:.0%}" if pct else fmt(float(value))
            row[name] = (value, None if value is None or target is None else bool(target(value)), text)

        def ratio(prefix, pick=lambda v: v[0]):   # of the ratio rows whose names start so: the first, or as picked
            v = [float(x) for k, x in ratios.items() if k.startswith(prefix)]
            return pick(v) if v else None
        mae = [s for s in report.get("steps", []) if s["size"] == size and s["method"] == "mae"]
        fastest = max(mae, key=lambda s: s["img_s"], default={})
        put("MAE / vit-pytorch step, eager (<= 1)",
            ratio("MAE step, mimland / vit-pytorch ("), lambda v: v <= 1)
        put("per model FLOP", ratio("MAE step time per model FLOP"))
        if cpu:
            put("fastest MAE / fp32 peak (>= 75%)", fastest.get("mfu_measured_fp32_peak"),
                lambda v: v >= 0.75, pct=True)
        else:
            put("fastest MAE / spec bf16 peak (ViT-B/16: >= 40%)", fastest.get("mfu_spec_peak"),
                (lambda v: v >= 0.40) if size == "ViT-B/16" else None, pct=True)
        put("RC-MAE / MAE step, worst row (<= 1.4)", ratio("RC-MAE / MAE step time (", max), lambda v: v <= 1.4)
        put("RC-MAE / MAE memory (<= 1.15)", ratio("RC-MAE / MAE training memory"), lambda v: v <= 1.15)
        if i == 0:
            for images, ls in report.get("landscape", {}).items():
                share = ls["compiled forward FLOP/s"] / ls["fp32 peak here"] if "compiled forward FLOP/s" in ls else None
                put(f"compiled landscape / fp32 peak, {images} images (CPU: >= 60%)", share,
                    (lambda v: v >= 0.60) if cpu else None, pct=True)
            put("run s (CPU: < 600)", report.get("seconds"), (lambda v: v < 600) if cpu else None)
        out.append((size, row))
    return out


def targets_table(reports: dict) -> str:
    """One row per run (name -> report) and model size, with the figures of targets(); x marks a target not met."""
    rows = [(name, r["info"].get("name", r["info"]["device"]), size, row)
            for name, r in reports.items() for size, row in targets(r)]
    cols = list(dict.fromkeys(k for *_, row in rows for k in row))
    return table("Against the targets (x: not met)", ["run", "machine", "size"] + cols,
                 [[name, machine, size] + [row[k][2] + (" x" if row[k][1] is False else "") if k in row else "-"
                                           for k in cols] for name, machine, size, row in rows])


def read_reports(paths) -> dict:
    """Saved runs (bench.py --json files) by name; ValueError with a one-line reason for a file that is not one."""
    reports = {}
    for path in paths:
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read it as JSON ({e.__class__.__name__}: {e}); give --targets the files "
                             "that `bench.py --json` wrote") from None
        if not (isinstance(r, dict) and isinstance(r.get("info"), dict) and "device" in r["info"] and r.get("ratios")):
            raise ValueError(f"{path}: not a `bench.py --json` report with its ratios table (a run that stopped "
                             "before it has none); give --targets the files that whole runs wrote")
        reports[os.path.basename(path).removesuffix(".json")] = r
    return reports


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:
        return study_main(argv[1:])
    p = M.Parser(prog="bench.py", description="mimland benchmarks: step time, memory, MFU, projections, peers.")
    p.add_argument("--full", action="store_true", help="GPU: ViT-B/16 and ViT-L/16 at 224 (needs CUDA)")
    p.add_argument("--sizes", default="vit_base,vit_large",
                   help="with --full: comma-separated subset of vit_base,vit_large (default both)")
    p.add_argument("--json", type=M.OUT_FILE, help="write every figure to this file")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of sup,mae,rcmae,ssat")
    p.add_argument("--rounds", type=M.COUNT, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="leave malloc as glibc sets it instead of mimland.keep_freed_memory() (as the CLI runs), "
                        "to see what that gives (the landscape split runs the CLI, which always calls it)")
    p.add_argument("--targets", nargs="+", metavar="JSON",
                   help="measure nothing: print the targets table of saved runs (their --json files) side by side")
    args = p.parse_args(argv)
    if args.targets:
        if any(v != p.get_default(k) for k, v in vars(args).items() if k != "targets"):
            print("bench.py: error: --targets reads saved runs and takes no other option", file=sys.stderr)
            return 2
        try:
            print(targets_table(read_reports(args.targets)))
        except ValueError as e:
            print(f"bench.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        print(f"bench.py: error: --methods takes a subset of {','.join(METHODS)}", file=sys.stderr)
        return 2
    full_sizes = {"vit_base": "ViT-B/16", "vit_large": "ViT-L/16"}
    chosen = [n for n in args.sizes.split(",") if n]
    if not chosen or any(n not in full_sizes for n in chosen):
        print(f"bench.py: error: --sizes takes a subset of {','.join(full_sizes)}", file=sys.stderr)
        return 2
    if args.full and not torch.cuda.is_available():
        print("bench.py: error: --full needs a CUDA GPU; run plain `python bench.py` on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.full else "cpu")
    info = device_info(device)
    info["keep_freed_memory"] = not args.glibc_malloc_defaults and M.keep_freed_memory()
    report = {"info": info, "config": vars(args)}
    t_start = time.perf_counter()

    # the machine's ceilings, of the dtypes it runs: a CPU with no bf16 matmul hardware (AVX-512 BF16, AMX) runs
    # bf16 matmuls tens of times slower than fp32 (half_matmul_slowdown), so its bf16 rows would take hours
    if not args.full:
        info["bf16_matmul_slowdown"] = half_matmul_slowdown(torch.bfloat16)
    dtypes = tuple(DTYPES) if args.full or info["bf16_matmul_slowdown"] <= SLOW_HALF else ("fp32",)
    precisions = ["bf16"] if args.full else list(dtypes)
    fast_precision = precisions[-1]   # of the fastest path
    peaks = {k: matmul_peak(device, DTYPES[k]) for k in dtypes}
    report["measured_matmul_peak"] = peaks

    def emit(text):   # each table as soon as it is measured, and the JSON so far: a long GPU run shows its progress
        print(text, flush=True)
        if args.json:     # replaced whole (write, then rename): never half-written
            with open(args.json + ".tmp", "w") as f:
                json.dump(report, f, indent=2, default=str)
            os.replace(args.json + ".tmp", args.json)

    emit(f"# mimland bench on {info['name']} ({info['device']}, torch {info['torch']}, {info['threads']} threads)")
    malloc = "freed memory kept (mimland.keep_freed_memory, as the CLI runs)" if info["keep_freed_memory"] else "glibc defaults"
    emit(f"\nmalloc: {malloc}")
    if "bf16" not in dtypes:
        emit(f"\nbf16 left out: a 256 x 256 bf16 matmul takes {info['bf16_matmul_slowdown']:.0f}x as long as in fp32 "
             "on this CPU (no bf16 matmul hardware, such as AVX-512 BF16 or AMX); fp32 is its fastest path")
    emit(table("Machine", ["ceiling", "FLOP/s"],
               [[f"measured {k} matmul peak (start of the run)", fmt(v / 1e12) + " T"] for k, v in peaks.items()] +
               ([["spec dense bf16 peak", fmt(info["spec_bf16_peak"] / 1e12) + " T"]] if info.get("spec_bf16_peak") else [])))

    sizes = ({full_sizes[n]: M.preset(n) for n in chosen} if args.full else
             {"ViT 192x6 @32/4": M.ViTConfig(**CPU_SIZE)})
    batch = 64
    report["steps"] = []
    for size, cfg in sizes.items():
        flop_rows = []
        for m in methods:   # analytic FLOPs against torch's counter (forward, per image)
            flop_rows.append([m, fmt(M.flops_per_image(cfg, m, train=False) / 1e9), fmt(counted_flops(m, cfg, device) / 1e9)])
        train_flops = {m: M.flops_per_image(cfg, m) for m in methods}
        if "mae" in methods and import_vit_pytorch():   # the peer's own count: 3x forward, like mimland's
            peer_fwd = counted_flops(PEER, cfg, device)
            train_flops[PEER] = 3 * peer_fwd
            flop_rows.append([PEER, "-", fmt(peer_fwd / 1e9)])
        emit(table(f"{size}: forward GFLOP per image, analytic vs torch.utils.flop_counter",
                   ["method", "analytic", "counted"], flop_rows))
        rows = []
        for prec in precisions:
            steps = {m: make_step(m, cfg, batch, device, prec)[0] for m in methods}
            peer = peer_mae_step(cfg, batch, device, prec) if "mae" in methods else None
            if peer:
                steps[PEER] = peer
            times, here = time_with_peaks(steps, device, dtypes, rounds=args.rounds)
            for name, t in times.items():
                flops = train_flops[name] * batch / t
                rec = {"size": size, "method": name, "precision": prec, "compiled": "no", "batch": batch,
                       "step_s": t, "img_s": batch / t, "model_flop_s": flops, "peaks_meanwhile": here,
                       "mfu_measured_peak": flops / here[prec], "mfu_measured_fp32_peak": flops / here["fp32"],
                       "mfu_spec_peak": flops / info["spec_bf16_peak"] if info.get("spec_bf16_peak") else None}
                report["steps"].append(rec)
                rows.append(rec)
        if not args.no_compile and "mae" in methods:   # the fastest path: compiled, bf16 where it is fast
            # on a CPU, MAE's alone (a cold compile of RC-MAE's step takes over a minute and a half there); on a
            # GPU MAE and RC-MAE, also at batch 256, which fills an H100 where 64 leaves it waiting on launches
            todo = [(m, b, True) for b in ((64, 256) if args.full else (batch,))
                    for m in (("mae", "rcmae") if args.full else ("mae",)) if m in methods]
            if args.full:   # what the CUDA graphs give
                todo.append(("mae", batch, False))
            compiled, warm = {}, {}
            for m, b, graphs in todo:
                t0 = time.perf_counter()
                compiled[m, b, graphs], _ = make_step(m, cfg, b, device, fast_precision, compiled=True, graphs=graphs)
                compiled[m, b, graphs]()
                warm[m, b, graphs] = time.perf_counter() - t0
            times, here = time_with_peaks(compiled, device, dtypes, rounds=args.rounds)
            for (m, b, graphs), t in times.items():
                flops = M.flops_per_image(cfg, m) * b / t
                rec = {"size": size, "method": m, "precision": fast_precision,
                       "compiled": "yes" if device.type == "cpu" else "CUDA graphs" if graphs else "no CUDA graphs",
                       "batch": b, "step_s": t, "img_s": b / t, "model_flop_s": flops, "peaks_meanwhile": here,
                       "mfu_measured_peak": flops / here[fast_precision], "mfu_measured_fp32_peak": flops / here["fp32"],
                       "compile_s": warm[m, b, graphs],
                       "mfu_spec_peak": flops / info["spec_bf16_peak"] if info.get("spec_bf16_peak") else None}
                report["steps"].append(rec)
                rows.append(rec)
        emit(table(f"{size}: training step, synthetic data on the device",
                   ["method", "batch", "precision", "compiled", "ms/step", "img/s", "model TFLOP/s", "MFU (measured peak)",
                    "MFU (fp32 peak)", "fp32 peak meanwhile (T)", "bf16 peak meanwhile (T)", "MFU (spec peak)"],
                   [[r["method"], r["batch"], r["precision"], r["compiled"], fmt(r["step_s"] * 1e3),
                     fmt(r["img_s"]), fmt(r["model_flop_s"] / 1e12), f"{r['mfu_measured_peak']:.0%}",
                     f"{r['mfu_measured_fp32_peak']:.0%}" if r["precision"] == "fp32" or device.type == "cpu" else "-",
                     fmt(r["peaks_meanwhile"]["fp32"] / 1e12),
                     fmt(r["peaks_meanwhile"]["bf16"] / 1e12) if "bf16" in r["peaks_meanwhile"] else "-",
                     f"{r['mfu_spec_peak']:.0%}" if r.get("mfu_spec_peak") else "-"] for r in rows]))
        ratio_rows = []   # head to head: paired A/B tests of freshly built steps
        for prec in precisions:
            if "mae" in methods:
                peer = peer_mae_step(cfg, batch, device, prec)
                if peer:
                    r = paired_ratio(make_step("mae", cfg, batch, device, prec)[0], peer, device)
                    ratio_rows.append([f"MAE step, mimland / vit-pytorch ({prec}, eager; < 1 is faster)", fmt(r)])
                    per_flop = r * train_flops[PEER] / train_flops["mae"]   # mimland does the reference's cls token
                    ratio_rows.append([f"MAE step time per model FLOP, mimland / vit-pytorch ({prec}, eager)", fmt(per_flop)])
                    for part, q in block_ratios(cfg, batch, device, prec).items():
                        ratio_rows.append([f"mimland encoder blocks with the cls token / without ({prec})" if part == "cls"
                                           else f"{part}, mimland / vit-pytorch ({prec}, eager)", fmt(q)])
            if "mae" in methods and "rcmae" in methods:
                r = paired_ratio(make_step("rcmae", cfg, batch, device, prec)[0],
                                 make_step("mae", cfg, batch, device, prec)[0], device)
                ratio_rows.append([f"RC-MAE / MAE step time ({prec}; target 1.4, FLOPs 1.33)", fmt(r)])
        comp = {(r["method"], r["batch"], r["compiled"]): r["step_s"] for r in rows if r["compiled"] != "no"}
        fast = "yes" if device.type == "cpu" else "CUDA graphs"   # the label of the compiled rows above
        for b in sorted({b for _, b, _ in comp}):
            if ("mae", b, fast) in comp and ("rcmae", b, fast) in comp:
                ratio_rows.append([f"RC-MAE / MAE step time ({fast_precision}, compiled, batch {b})",
                                   fmt(comp["rcmae", b, fast] / comp["mae", b, fast])])
        if ("mae", batch, "no CUDA graphs") in comp:
            ratio_rows.append([f"MAE step compiled without / with CUDA graphs (bf16, batch {batch})",
                               fmt(comp["mae", batch, "no CUDA graphs"] / comp["mae", batch, fast])])
        if "mae" in methods and "rcmae" in methods:
            mem = {m: peak_memory_mb(m, cfg, batch, device, fast_precision, info["keep_freed_memory"]) for m in ("mae", "rcmae")}
            report.setdefault("memory_mb", {})[size] = mem
            ratio_rows.append([f"training memory MB, MAE / RC-MAE ({fast_precision})", f"{mem['mae']:.0f} / {mem['rcmae']:.0f}"])
            ratio_rows.append(["RC-MAE / MAE training memory (target 1.15)", fmt(mem["rcmae"] / mem["mae"])])
            if args.full:   # a GPU matter (two kernel launches per parameter); on a CPU it read 0.98-1.01, noise
                ema = time_interleaved({e: make_step("rcmae", cfg, batch, device, fast_precision, ema=e)[0]
                                        for e in ("foreach", "loop")}, device, rounds=args.rounds)
                ratio_rows.append(["RC-MAE step with the EMA as one foreach lerp / as a per-parameter loop",
                                   fmt(ema["foreach"] / ema["loop"])])
                report["ema"] = ema
        if "mae" in methods:   # what each choice of mimland's gives, against the alternatives
            variants = {"default": make_step("mae", cfg, batch, device, fast_precision)[0],
                        "unfused (foreach) AdamW": make_step("mae", cfg, batch, device, fast_precision, fused=False)[0],
                        "SDPA's math kernel for attention": make_step("mae", cfg, batch, device, fast_precision,
                                                                      attention="math")[0],
                        "the explicit softmax(q k^T / sqrt(d)) v for attention":
                            make_step("mae", cfg, batch, device, fast_precision, attention="explicit")[0]}
            if args.full:   # what bf16 autocast gives (the CPU's fp32 rows are in the step table)
                variants["fp32 (no autocast, no TF32)"] = make_step("mae", cfg, batch, device, "fp32")[0]
            vt = time_interleaved(variants, device, rounds=args.rounds)
            report["variants"] = vt
            ratio_rows += [[f"MAE {fast_precision} step with {k} / default", fmt(v / vt["default"])]
                           for k, v in vt.items() if k != "default"]
        emit(table(f"{size}: ratios", ["comparison", "value"], ratio_rows))
        report.setdefault("ratios", {})[size] = {r[0]: r[1] for r in ratio_rows}

        if args.full:   # ImageNet schedules projected from the sizes they run at
            fastest = {m: max(r["img_s"] for r in rows if r["method"] == m) for m in methods}
            proj = projection_rows(size, fastest)
            emit(table(f"{size}: projected ImageNet-1K wall-clock at perfect scaling, each method's fastest path "
                       "above (hours)", PROJ_HEADER, proj))
            report.setdefault("projections", {})[size] = proj
    if not args.full:   # on a CPU: ViT-B/16 MAE at 224 measured at a small batch, ViT-L/16 scaled by FLOPs
        base, large = M.preset("vit_base"), M.preset("vit_large")
        t = time_interleaved({"mae": make_step("mae", base, 8, device, fast_precision)[0]}, device, rounds=1, per_round=2,
                             warmup=1)["mae"]   # 6 s a step on an AVX2 CPU
        vitb = 8 / t
        report["cpu_vit_b_mae_img_s"] = vitb
        vitl = vitb * M.flops_per_image(base, "mae") / M.flops_per_image(large, "mae")
        proj = projection_rows(f"ViT-B/16 (measured, batch 8, {fast_precision})", {"mae": vitb}) + \
            projection_rows("ViT-L/16 (from FLOPs)", {"mae": vitl})
        emit(table("Projected ImageNet-1K MAE pre-training on this CPU at perfect scaling (hours)", PROJ_HEADER, proj))
        report["projections"] = proj
    emit(table("Reference numbers", ["published", "value"], [[k, v] for k, v in REFERENCE.items()]))

    loaders = loader_throughput(device)
    report["loader"] = loaders
    emit(table("Data loading alone (no model)", ["pipeline", "img/s"], [[k, fmt(v)] for k, v in loaders.items()]))
    cfg = next(iter(sizes.values()))
    ls_rows = []
    for images in ((8, 64) if not args.full else (16, 64)):
        ls = landscape_throughput(cfg, device, images, points=16 if args.full else 8, compiled=not args.no_compile)
        report.setdefault("landscape", {})[images] = ls
        peer, peak = ls.get("loss-landscapes random_plane"), ls["fp32 peak here"]
        fastest = max(ls["best"], ls.get("compiled", 0))
        mm = ls.get("matmul time share", {})
        ls_rows.append([images, fmt(ls["vmap, 8 points per call"]), fmt(ls["one point per call"]), ls["auto choice"],
                        fmt(ls["compiled"]) if "compiled" in ls else "-", fmt(ls["compile s"]) if "compile s" in ls else "-",
                        f"{ls['page faults per vmap call']:,}", fmt(peer), fmt(fastest / peer) if peer else "-",
                        f"{ls['best forward FLOP/s'] / peak:.0%}",
                        f"{ls['compiled forward FLOP/s'] / peak:.0%}" if "compiled" in ls else "-",
                        " / ".join(f"{mm[k]:.0%}" for k in (ls["best path"], "compiled") if k in mm) or "-",
                        fmt(peak / 1e12) + " T"])
    emit(table(f"Landscape grid points per second (MAE loss, {next(iter(sizes))})",
               ["images per point", "vmap, 8 per call", "one per call", "auto picks", "auto path compiled",
                "compile s", "page faults per vmap call", "loss-landscapes", "fastest / peer",
                "eager forward FLOP/s vs fp32 peak", "compiled vs fp32 peak", "time in matmuls, eager / compiled",
                "fp32 peak meanwhile"], ls_rows))
    if not args.full:   # the library call with its defaults, first call included, against the peer
        rows = [[f"{next(iter(sizes))}, {images} images, 4 x 4", fmt(ls["library defaults"]),
                 fmt(ls.get("loss-landscapes random_plane")), fmt(ls.get("library defaults / peer"))]
                for images, ls in report["landscape"].items()]
        small = report["landscape_small_vit"] = small_vit_landscape()
        rows.append(["ViT 64x2 @16/4, 128 images, 11 x 11", fmt(small["library defaults"]),
                     fmt(small.get("loss-landscapes random_plane")), fmt(small.get("library defaults / peer"))])
        emit(table("mimland.landscape_2d with its defaults against loss-landscapes' random_plane (points/s)",
                   ["model, data, grid", "landscape_2d", "random_plane", "ratio"], rows))
        grid = 9
        try:
            split = landscape_split(grid)
        except RuntimeError as e:   # the figures above are kept, and the run ends as it would
            report["landscape_split"] = {"error": str(e)}
            emit(f"\nLandscape split over processes: failed, {e}")
        else:
            report["landscape_split"] = split
            emit(table(f"Landscape split over processes (`mimland.py landscape --grid {grid} --points-per-batch 8` "
                       "on a digits MAE, 512 images)", ["processes x threads", "grid points/s", "speed-up"],
                       [[f"{n} x {max(1, torch.get_num_threads() // n)}", fmt(v), fmt(v / split[1])]
                        for n, v in split.items()]))
    report["seconds"] = time.perf_counter() - t_start
    report["targets"] = {size: {k: v[:2] for k, v in row.items()} for size, row in targets(report)}
    emit(targets_table({"this run": report}))
    emit(f"\n(bench.py ran {report['seconds']:.0f} s)")
    return 0


# ----------------------------------------------------------------------------------------------------
# studies: a paper's claims as mimland runs over seeds, each claim's paired difference and a verdict




@dataclasses.dataclass
class Step:
    """One mimland command of a study: `name` is the run directory it trains (OUT/s<seed>/<name>) or
    measures; `record` the JSON file its numbers land in, relative to that directory."""
    name: str
    argv: list
    record: str = "results.json"

    @property
    def key(self) -> str:
        """How claims name the step's numbers: 'run' (its training's results.json) or 'run/record'."""
        return self.name if self.record == "results.json" else f"{self.name}/{self.record.removesuffix('.json')}"


@dataclasses.dataclass
class Claim:
    """A paper's claim as a comparison over seeds: the paired difference a - b of two numbers is claimed
    > 0 (sign +1) or < 0 (-1). A number is 'step:key' (Step.key, then the key dotted into its record; 'abs:'
    takes magnitudes); * and [..] match several (direction seeds, heads, blocks), which are averaged. `effect`
    is the paper's own difference in the claimed direction and the claim's units, `source` where it is from."""
    text: str
    a: str
    b: str
    sign: int = 1
    effect: float | None = None
    source: str = ""


@dataclasses.dataclass
class Study:
    title: str
    steps: object           # (seed, quick, data) -> [Step]
    claims: list
    runs: dict              # data set -> (default seeds, what they cost on a 2-core CPU, measured)
    columns: tuple          # the numbers of each step shown in the report's table
    about: str              # the report's account of its settings: what was traded for the budget
    figures: object = None  # (out, file stem, done, values) -> [(caption, file in OUT)]


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)   # t(0.975) for 1 ... 9 degrees
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883)      # t(0.80), for 80% power


def paired_interval(a: list, b: list) -> tuple:
    """(mean, low, high): the mean of a - b over seeds and its two-sided 95% t-interval."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = T975[len(d) - 2] * (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    return mean, mean - half, mean + half


def detectable(a: list, b: list) -> float:
    """The smallest true difference the paired test at these seeds finds 4 times in 5 (two-sided 5%, power
    80%): (t_0.975 + t_0.80) * sd(a - b) / sqrt(n), with the spread these seeds showed."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return math.nan
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    return (T975[len(d) - 2] + T80[len(d) - 2]) * sd / len(d) ** 0.5


CONVERGED = 0.005   # the convergence check: the arm's metric, mean over seeds, moves less than this ...
TAIL = 0.2          # ... over the last 20% of the schedule, read at the run's evaluations


def convergence(curves: list) -> float:
    """How far an arm's metric moved over the last TAIL of its schedule: curves are its seeds' [(epoch,
    value)] evaluations; their mean at each epoch, max - min over epochs >= (1 - TAIL) * the last. NaN when
    fewer than two evaluations fall there (the run cannot show it settled)."""
    n = min(map(len, curves))
    epochs = [e for e, _ in curves[0][:n]]
    mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
    tail = [v for e, v in zip(epochs, mean) if e >= (1 - TAIL) * epochs[-1]] if n else []
    return max(tail) - min(tail) if len(tail) >= 2 else math.nan


def verdict(low: float, high: float, sign: int, effect: float | None = None, settled: bool = True) -> str:
    """not tested: the runs failed their convergence check; reproduced: the interval excludes 0 in the claimed
    direction; contradicted: the other way; no effect of the paper's size: it covers 0 but not the paper's
    effect; inconclusive: it covers both (or there is no interval)."""
    if not settled:
        return "not tested"
    if sign * low > 0 and sign * high > 0:
        return "reproduced"
    if sign * low < 0 and sign * high < 0:
        return "contradicted"
    if effect is not None and math.isfinite(low) and not low <= sign * effect <= high:
        return "no effect of the paper's size"
    return "inconclusive"


VERDICTS = ("reproduced", "contradicted", "no effect of the paper's size", "inconclusive", "not tested")
QUICK = ["--batch-size", "32", "--train-size", "96"]   # study --quick: batches of 32 from 96 images, for tests


def run_args(seed: int, quick: bool, data: str) -> list:
    """The flags every training of a study shares; --quick: 2 epochs of QUICK."""
    return ["--seed", str(seed), "--data", data] + (["--epochs", "2", *QUICK] if quick else [])


RCMAE_EPOCHS = 200             # pre-training epochs of the digits runs (2200 steps): long enough to settle
RCMAE_MOMENTA = (0.9, 0.97, 0.99)   # the sweep beside the default 0.996, on the first RCMAE_SWEEP_SEEDS seeds
RCMAE_SWEEP_SEEDS = 1


def rcmae_steps(seed: int, quick: bool, data: str) -> list:
    """RC-MAE (arXiv 2210.02077): MAE and RC-MAE (constant m 0.996, as its reference ran), each fine-tuned; the
    gradient analyses; on the first seeds a momentum sweep and another mask for the teacher (RC-MAE-D)."""
    s = ["--seed", str(seed), "--data", data] + (QUICK if quick else [])
    pre = ["--epochs", "2" if quick else str(RCMAE_EPOCHS), *s]
    steps = [Step(m, ["train", "--method", m, *pre]) for m in ("mae", "rcmae")]
    steps += [Step(f"{m}-ft", ["finetune", "--ckpt", f"{{{m}}}", "--epochs", "2" if quick else "50", *s[:2], *s[4:]])
              for m in ("mae", "rcmae")]
    steps += [Step("rcmae", ["analyze", "--ckpt", "{rcmae}", "--what", "gradients"], "analysis.json")]
    if seed < RCMAE_SWEEP_SEEDS:
        steps += [Step(f"rcmae-m{m}", ["train", "--method", "rcmae", "--ema-momentum", str(m), *pre])
                  for m in RCMAE_MOMENTA]
        steps += [Step("rcmae-d", ["train", "--method", "rcmae", "--teacher-mask", "different", *pre])]
    return steps


RCMAE_CLAIMS = [
    Claim("RC-MAE's teacher probes better than MAE: linear probe", "rcmae:probe_acc", "mae:probe_acc", 1, 0.011,
          "ViT-B, ImageNet linear probe 67.3 -> 68.4 (the paper's mask ablation)"),
    Claim("... and under k-NN", "rcmae:knn_acc", "mae:knn_acc"),
    Claim("... and fine-tunes better", "rcmae-ft:test_acc", "mae-ft:test_acc", 1, 0.002,
          "ViT-S and ViT-B, ImageNet fine-tuning +0.2 (1600 epochs)"),
    Claim("the teacher probes better than its own student (the reference probes the teacher)", "rcmae:probe_acc",
          "rcmae:student_probe_acc"),
    Claim("another mask for the teacher (RC-MAE-D) probes better than the same (RC-MAE-S)", "rcmae-d:probe_acc",
          "rcmae:probe_acc", 1, 0.003, "ViT-B linear probe 68.4 (same) vs 68.7 (different)"),
    Claim("the same mask makes the consistency gradient nearer orthogonal to the reconstruction's: |cosine|",
          "rcmae/analysis:abs:gradients.mask angles.same_mask.0",
          "rcmae/analysis:abs:gradients.mask angles.different_mask.0", -1),
    Claim("the teacher's correction opposes the last update more for the same images than for noise: cosine",
          "rcmae/analysis:gradients.same images and masks.correction_cosine.0",
          "rcmae/analysis:gradients.noise images.correction_cosine.0", -1),
]


def rcmae_figures(out: str, stem: str, done: list, values: dict) -> list:
    """k-NN and the test reconstruction loss through training; the teacher's correction (seed 0) beside the
    linear model's prediction."""
    runs = ("mae", "rcmae", *(f"rcmae-m{m}" for m in RCMAE_MOMENTA))
    for key, what in (("knn_acc", "k-NN accuracy (the convergence check's metric)"),
                      ("test_rec", "test reconstruction loss (fixed masks)")):
        plot_study_curves(done, runs, key, os.path.join(out, f"{stem}-{key}.png"),
                          f"{what} while pre-training, mean and range over seeds")
    with open(os.path.join(out, "s0", "rcmae", "analysis.json")) as f:
        M.plot_analysis([json.load(f)], os.path.join(out, f"{stem}-correction.png"), "RC-MAE (seed 0): the teacher's "
                        "correction against the last update, by input")
    return [("k-NN accuracy through pre-training", f"{stem}-knn_acc.png"),
            ("the test reconstruction loss through pre-training", f"{stem}-test_rec.png"),
            ("the teacher's correction in the ViT beside the linear model's prediction", f"{stem}-correction.png")]


LANDSCAPE_GRID = ["--grid", "15", "--data-size", "128"]   # 225 points; 128 images
LANDSCAPE_AROUND = {"pretrain": ["--range", "0.5"],      # a probe fits 128 training digits to a loss of 0, and its
                    "probe": ["--range", "0.1", "--split", "test"]}   # test loss rises by 1 within 0.07: a closer look
HESSIAN_SMALL = ["--data-size", "128", "--top-k", "1", "--iters", "20", "--trace-samples", "5", "--slq-steps", "24",
                 "--slq-runs", "1"]   # lambda_min / lambda_max from 24 Lanczos steps; one SLQ run


def landscape_steps(seed: int, quick: bool, data: str) -> list:
    """The five methods and MAE at batch 64 and 256 (lr by the linear rule, the same 100 epochs); for each,
    the pre-training and linear-probe surfaces along 2 directions seeds, and the Hessian of both losses."""
    s = run_args(seed, quick, data)
    runs = [Step(m, ["train", "--method", m, *s]) for m in ("sup", "mae", "rcmae", "ssat", "moco")]
    runs += [Step(f"mae-b{b}", ["train", "--method", "mae", *s, "--batch-size", str(b // 4 if quick else b)])
             for b in (64, 256)]
    grid = ["--grid", "5", "--data-size", "16"] if quick else LANDSCAPE_GRID
    hess = ["--data-size", "16", "--iters", "2", "--trace-samples", "1", "--slq-steps", "4", "--slq-runs", "1",
            "--top-k", "1"] if quick else HESSIAN_SMALL
    around = LANDSCAPE_AROUND
    looks = [Step(r.name, ["landscape", "--ckpt", f"{{{r.name}}}", "--loss", loss, *around[loss], "--seed", str(d),
                           *grid, "--no-figures"], f"landscape-{loss}-2d{f'-seed{d}' if d else ''}.json")
             for r in runs for loss in around for d in (0, 1)]
    return runs + looks + [Step(r.name, ["hessian", "--ckpt", f"{{{r.name}}}", "--loss", loss, *around[loss][2:], *hess,
                                         "--no-figures"], f"hessian-{loss}.json") for r in runs for loss in around]


def surf(run: str, loss: str, key: str) -> str:
    """A landscape number of a run, averaged over the directions seeds."""
    return f"{run}/landscape-{loss}-2d*:{key}"


LANDSCAPE_CLAIMS = [
    Claim("MAE pre-trains in a wider convex region than the supervised ViT (each its own loss): convex width",
          surf("mae", "pretrain", "convex_width"), surf("sup", "pretrain", "convex_width")),
    Claim("... and its pre-training surface is convex at more points: convex share",
          surf("mae", "pretrain", "convex_share"), surf("sup", "pretrain", "convex_share")),
    Claim("MAE's linear-probe loss is more convex than the supervised ViT's: |lambda_min / lambda_max|",
          "mae/hessian-probe:ratio_min_max", "sup/hessian-probe:ratio_min_max", -1),
    Claim("RC-MAE widens the convex region of the pre-training loss: convex width",
          surf("rcmae", "pretrain", "convex_width"), surf("mae", "pretrain", "convex_width")),
    Claim("... and of the linear probe's: convex width", surf("rcmae", "probe", "convex_width"),
          surf("mae", "probe", "convex_width")),
    Claim("... and its probe basin is wider: basin width (rise 0.1)", surf("rcmae", "probe", "basin_width_0.1"),
          surf("mae", "probe", "basin_width_0.1")),
    Claim("... and its pre-training loss more convex: |lambda_min / lambda_max|", "rcmae/hessian-pretrain:ratio_min_max",
          "mae/hessian-pretrain:ratio_min_max", -1),
    *[Claim(f"probing is more complex than pre-training ({m}): the probe's basin is narrower, basin width (rise 0.1)",
            surf(r, "pretrain", "basin_width_0.1"), surf(r, "probe", "basin_width_0.1")) for r, m in
      (("mae", "MAE"), ("rcmae", "RC-MAE"))],
    Claim("... and less convex (MAE): |lambda_min / lambda_max|, pre-training < probe", "mae/hessian-pretrain:ratio_min_max",
          "mae/hessian-probe:ratio_min_max", -1),
    Claim("open question, batch size (Keskar et al.'s hypothesis): batch 64 pre-trains in a wider convex region than "
          "batch 256: convex width", surf("mae-b64", "pretrain", "convex_width"),
          surf("mae-b256", "pretrain", "convex_width")),
    Claim("... and finds a wider probe basin: basin width (rise 0.1)", surf("mae-b64", "probe", "basin_width_0.1"),
          surf("mae-b256", "probe", "basin_width_0.1")),
    Claim("open question, MIM vs contrastive: MAE's probe basin is wider than MoCo v3's: basin width (rise 0.1)",
          surf("mae", "probe", "basin_width_0.1"), surf("moco", "probe", "basin_width_0.1")),
    Claim("... and its probe loss is convex over a wider region: convex width", surf("mae", "probe", "convex_width"),
          surf("moco", "probe", "convex_width")),
]


def landscape_figures(out: str, stem: str, done: list, values: dict) -> list:
    """Seed 0, directions seed 0: the probe surfaces of the five methods on one colour scale; the pre-training
    surfaces, each divided by its centre loss (their losses differ); MAE's probe surfaces at three batches."""
    def surface(run, loss, scaled=False):
        import numpy as np
        with np.load(os.path.join(out, "s0", run, f"landscape-{loss}-2d.npz")) as z:
            xs, ys, s = (torch.from_numpy(z[k]).double() for k in ("xs", "ys", "surface"))
        return run, xs, ys, s / s[len(xs) // 2, len(ys) // 2] if scaled else s
    figs = [("probe", "the linear-probe loss (cross-entropy, test digits) of the five methods, one colour scale",
             [surface(r, "probe") for r in ("sup", "mae", "rcmae", "ssat", "moco")], "loss"),
            ("pretrain", "each method's own training loss divided by its value at the weights, one colour scale",
             [surface(r, "pretrain", True) for r in ("sup", "mae", "rcmae", "ssat", "moco")], "loss / loss at the weights"),
            ("batch", "MAE's pre-training loss at batch 64, 128 and 256 (lr by the linear rule)",
             [surface(r, "pretrain") for r in ("mae-b64", "mae", "mae-b256")], "loss")]
    for name, caption, items, label in figs:
        M.plot_landscape_comparison(items, os.path.join(out, f"{stem}-{name}.png"), caption + " (seed 0)", label)
    return [(caption, f"{stem}-{name}.png") for name, caption, _, _ in figs]


SSAT_SIZES = {"digits": ((250, 500, 1437), 64, 800),          # training images, batch, optimizer steps: the same
              "fashion-mnist": ((1000, 4000, 16000), 128, 312)}   # steps for every size, so a size is not a budget


def ssat_steps(seed: int, quick: bool, data: str) -> list:
    """A supervised ViT, SSAT, and MAE followed by fine-tuning (SSL+FT) on three training-set sizes; SSAT's
    ablations (lam, mask ratio) on the middle one (the digits only); per-layer analyses and the SLQ spectrum on
    the largest."""
    sizes, batch, total = ssat_sizes(data, quick)

    def on(n):   # epochs of n images for `total` steps; warm-up 5% of them, as the quick recipe
        epochs = -(-total // (n // batch))
        fashion = ["--eval-every", str(epochs)] if data == "fashion-mnist" else []   # 10,000 test images: once
        return [*run_args(seed, quick, data)[:4], "--train-size", str(n), "--batch-size", str(batch),
                "--epochs", str(epochs), "--warmup-epochs", f"{epochs / 20:g}", *fashion]
    steps = [Step(f"{m}-{n}", ["train", "--method", m, *on(n)]) for n in sizes for m in ("sup", "ssat", "mae")]
    steps += [Step(f"ft-{n}", ["finetune", "--ckpt", f"{{mae-{n}}}", *on(n)]) for n in sizes]
    n, big = sizes[len(sizes) // 2], sizes[-1]
    steps += [Step(f"ssat-{n}-{flag}{v}", ["train", "--method", "ssat", f"--{flag}", str(v), *on(n)])
              for flag, vs in (("lam", (0.01, 0.5)), ("mask-ratio", (0.5, 0.95))) for v in vs if data == "digits"]
    hess = HESSIAN_SMALL[:2] + ["--split", "test"] + (["--data-size", "16", "--iters", "2", "--trace-samples", "1",
                                                       "--slq-steps", "4"] if quick else HESSIAN_SMALL[2:])
    steps += [Step(f"{m}-{big}", ["analyze", "--ckpt", f"{{{m}-{big}}}"], "analysis.json") for m in ("sup", "ssat", "ft")]
    return steps + [Step(f"{m}-{big}", ["hessian", "--ckpt", f"{{{m}-{big}}}", "--loss", "cls", *hess, "--no-figures"],
                         "hessian-cls.json") for m in ("ssat", "ft")]


def ssat_sizes(data: str, quick: bool) -> tuple:
    return ((32, 48, 96), 16, 4) if quick else SSAT_SIZES[data]


def ssat_claims(data: str, quick: bool) -> list:
    small, mid, big = ssat_sizes(data, quick)[0]
    deep = lambda run, key: f"{run}-{big}/analysis:{key}.[23]*"      # noqa: E731   the deeper half of the 4 blocks
    return [
        *[Claim(f"SSAT beats a supervised ViT trained from scratch on {n} images: test accuracy", f"ssat-{n}:test_acc",
                f"sup-{n}:test_acc") for n in (small, mid, big)],
        *[Claim(f"SSAT beats MAE pre-training + fine-tuning (SSL+FT) on {n} images: test accuracy", f"ssat-{n}:test_acc",
                f"ft-{n}:test_acc", 1, 0.02, "2-3 points on small data sets") for n in (small, mid, big)],
        *[Claim(f"ablation on {mid} images: lam 0.1 beats lam {v}", f"ssat-{mid}:test_acc", f"ssat-{mid}-lam{v}:test_acc")
          for v in (0.01, 0.5) if data == "digits"],
        *[Claim(f"ablation on {mid} images: mask ratio 0.75 beats {v}", f"ssat-{mid}:test_acc",
                f"ssat-{mid}-mask-ratio{v}:test_acc") for v in (0.5, 0.95) if data == "digits"],
        *[Claim(f"SSAT's deeper blocks have more feature variance than {w}'s", deep("ssat", "feature_variance"),
                deep(r, "feature_variance")) for r, w in (("ft", "SSL+FT"), ("sup", "sup"))],
        *[Claim(f"SSAT's deeper blocks attend more smoothly (entropy) than {w}'s", deep("ssat", "attention_entropy"),
                deep(r, "attention_entropy")) for r, w in (("ft", "SSL+FT"), ("sup", "sup"))],
        Claim("SSAT's deeper blocks attend more globally than SSL+FT's: attention distance",
              deep("ssat", "attention_distance"), deep("ft", "attention_distance")),
        Claim("SSAT's Hessian (classification loss, test images) has fewer negative eigenvalues than SSL+FT's: "
              "negative share (SLQ)", f"ssat-{big}/hessian-cls:negative_share", f"ft-{big}/hessian-cls:negative_share", -1),
    ]


def ssat_figures(out: str, stem: str, done: list, values: dict) -> list:
    """Test accuracy against the training-set size; the per-layer analyses of sup, SSAT and SSL+FT (seed 0)."""
    sizes = sorted({int(st.name.split("-")[1]) for _, st, _ in done if st.name.startswith("sup-")})
    path = os.path.join(out, f"{stem}-data.png")
    plot_scaling(values, [("sup", "supervised ViT"), ("ssat", "SSAT"), ("ft", "SSL+FT")], sizes, "test_acc", path)
    records = [json.load(open(os.path.join(out, "s0", f"{m}-{sizes[-1]}", "analysis.json"))) for m in ("sup", "ssat", "ft")]
    for rec, m, label in zip(records, ("sup", "ssat", "ft"), ("supervised", "SSAT", "SSL+FT")):
        rec["run"], rec["method"] = f"{m}-{sizes[-1]}", label
    M.plot_analysis(records, os.path.join(out, f"{stem}-analysis.png"),
                  f"sup, SSAT and SSL+FT on {sizes[-1]} images (seed 0)")
    return [("test accuracy against the number of training images", f"{stem}-data.png"),
            ("attention distance, entropy and feature variance per block", f"{stem}-analysis.png")]


STUDIES = {
    "rcmae": Study(
        "RC-MAE: does the EMA teacher help a masked autoencoder?", rcmae_steps, RCMAE_CLAIMS,
        {"digits": (5, "about 40 minutes")}, ("probe_acc", "knn_acc", "student_probe_acc", "student_knn_acc",
                                              "test_acc", "teacher_lag_steps", "teacher_lag_share", "train_wall_s"),
        f"The 1437 training digits, {RCMAE_EPOCHS} epochs of 128 (2200 steps) for every pre-training, so that the "
        "runs settle (at the quick recipe's 100 epochs, `python mimland.py train --method mae`, MAE's k-NN still "
        "moved 0.55 points over the last 20% of seed 0, RC-MAE's 1.4); Fashion-MNIST was not used: at this CPU's budget its runs are 4 epochs, far from "
        "settled. RC-MAE's teacher runs at a constant m 0.996, as the reference ran it: it averages the student "
        "over about 250 steps, 11% of these runs, where the paper's was 0.1% of its; the sweep (m 0.9, 0.97, 0.99, "
        "with RC-MAE-D, on seed 0: the budget's trade) shows the lag as a share of the run (`teacher_lag_share`) beside the "
        "features. RC-MAE is probed and fine-tuned through its teacher, as the reference does; its student is "
        "probed too. Fine-tuning: 50 epochs. The papers' effects are ImageNet numbers; at 360 test digits one "
        "image is 0.28 points.",
        rcmae_figures),
    "landscape": Study(
        "Loss landscapes of MAE, RC-MAE, a supervised ViT, SSAT and MoCo v3", landscape_steps, LANDSCAPE_CLAIMS,
        {"digits": (3, "about 40 minutes")},
        ("probe_acc", "centre_loss", "basin_width_0.1", "convex_share", "convex_width", "ratio_min_max", "negative_share"),
        "Each run with the quick recipe; 15 x 15 grids along two filter-normalized directions seeds (0 and 1, "
        "averaged in the claims). Pre-training losses (each method's own) on [-0.5, 0.5]^2 over the first 128 "
        "training digits; linear-probe losses on [-0.1, 0.1]^2 over the first 128 test digits, because every probe "
        "fits the training digits to a loss near 0 and its test loss rises by more than 1 within 0.07 of the "
        "weights. The grid steps (0.071 and 0.014) bound the resolution of every width: a width of 0 means the "
        "first ring of points already rises past the threshold. Basin widths are in loss units, so they compare "
        "cross-entropy with cross-entropy; convex width and convex share are scale-free. The Hessian of each loss "
        "on the same 128 images: lambda_min and lambda_max from 24 Lanczos steps, the negative share from one "
        "SLQ run of 24 steps (noisy: see the table). The paper's own evidence is visual, on ImageNet.",
        landscape_figures),
    "ssat": Study(
        "SSAT: does an MAE auxiliary task help a ViT on limited data?", ssat_steps, ssat_claims,
        {"digits": (4, "about 40 minutes"), "fashion-mnist": (3, "42 minutes")},
        ("test_acc", "probe_acc", "train_wall_s", "ratio_min_max", "negative_share"),
        "Training-set sizes are fixed class-balanced subsets (`--train-size`), the same for every seed and method; "
        "the whole test set. Every size trains for the same 800 optimizer steps of 64 images (the paper's 100 "
        "epochs would give 250 digits 200 steps, too few for any method to learn: each fell to 0.10-0.20), with a "
        "5% warm-up; SSL+FT pre-trains for 800 steps and fine-tunes for 800 on the same images. The ablations run "
        "on the middle size; the analyses and the Hessian (24 Lanczos steps, one SLQ run, 128 test images) on the "
        "largest, the deeper two of the four blocks averaged in the claims. 4 seeds: 5 would take 50 minutes. "
        "On Fashion-MNIST: 1000 / 4000 / 16000 images, 312 steps of 128 rounded up to whole epochs (315 / 341 / 375 "
        "steps: 40,000 to 48,000 images, under one epoch of the 60,000), one evaluation at the end on the 10,000 "
        "test images, 3 seeds; the ablations run on the digits only.",
        ssat_figures),
}


def flat_numbers(record, prefix: str = "") -> dict:
    """{dotted key: number} of a JSON record (lists indexed 0, 1, ...)."""
    out = {}
    for k, v in (record.items() if isinstance(record, dict) else enumerate(record)):
        if isinstance(v, (dict, list)):
            out.update(flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def run_study(name: str, seeds: int, out: str, quick: bool, data: str) -> list:
    """Run (or resume) every step of a study, seed by seed; a step whose record exists is skipped, a training
    cut short resumes. -> [(seed, step, run directory)]."""
    plan = [(seed, st) for seed in range(seeds) for st in STUDIES[name].steps(seed, quick, data)]
    ledger_path = os.path.join(out, "steps.json")        # the command behind each record: changed settings redo it
    ledger = json.load(open(ledger_path)) if os.path.isfile(ledger_path) else {}
    todo = [(k, seed, st) for k, (seed, st) in enumerate(plan, 1) if not step_done(out, seed, st, ledger)]
    took = {}   # seconds of the finished steps, by command: the time left is each remaining step's command's mean
    for i, (k, seed, st) in enumerate(todo):
        where = os.path.join(out, f"s{seed}")
        run_dir = os.path.join(where, st.name)
        argv = [a.format_map(_RunDirs(where)) for a in st.argv]
        if argv[0] in ("train", "finetune"):
            cut = os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))     # a run cut short goes on
            argv += ["--out", run_dir] + (["--resume", run_dir] if cut else [])
        mean = {c: sum(t) / len(t) for c, t in took.items()}
        left = sum(mean.get(s.argv[0], sum(mean.values()) / len(mean)) for _, _, s in todo[i:]) if took else 0
        eta = f", about {left / 60:.0f} min left" if took else ""
        print(f"bench.py study {name}: step {k}/{len(plan)} (seed {seed}){eta}: "
              f"python mimland.py {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        code = M.main(argv)
        took.setdefault(argv[0], []).append(time.perf_counter() - t0)
        if code:
            raise M.RunStopped(f"step {st.name} (seed {seed}) stopped (status {code}); the finished steps are kept: run "
                             f"the same command again to go on", code)
        ledger[f"s{seed}/{st.name}/{st.record}"] = st.argv
        M.atomic_write_text(ledger_path, json.dumps(ledger, indent=1))
    return [(seed, st, os.path.join(out, f"s{seed}", st.name)) for seed, st in plan]


def step_done(out: str, seed: int, st: Step, ledger: dict) -> bool:
    """A step is done when its record exists from the same command; a training with other settings is refused
    (its directory holds another run), a measurement with other settings is made again."""
    key = f"s{seed}/{st.name}/{st.record}"
    if not os.path.isfile(os.path.join(out, key)):
        return False
    trains = st.argv[0] in ("train", "finetune")
    if key in ledger and ledger[key] != st.argv and trains:
        raise M.BadInput(f"{os.path.join(out, f's{seed}', st.name)} was trained with other settings than this study's "
                       f"({' '.join(ledger[key])}); remove it or give another --out")
    return ledger.get(key) == st.argv or (trains and key not in ledger)


class _RunDirs(dict):
    """'{name}' in a step's arguments -> the directory of the run of that name (the same seed)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def __missing__(self, key):
        return os.path.join(self.where, key)


def study_values(done: list) -> dict:
    """{seed: {'step key:number key': number}} from every step's record."""
    values = {}
    for seed, st, run_dir in done:
        with open(os.path.join(run_dir, st.record)) as f:
            values.setdefault(seed, {}).update({f"{st.key}:{k}": v for k, v in flat_numbers(json.load(f)).items()})
    return values


def claim_value(values: dict, path: str) -> float:
    """The number a claim names in one seed's values: the mean of every match of a pattern."""
    run, key = path.split(":", 1)
    magnitude = key.startswith("abs:")
    pattern = f"{run}:{key.removeprefix('abs:')}"
    xs = [abs(v) if magnitude else v for k, v in values.items() if fnmatch.fnmatchcase(k, pattern)]
    if not xs:
        raise KeyError(f"no number {pattern} among the study's records")
    return sum(xs) / len(xs)


def has_value(values: dict, path: str) -> bool:
    """Whether one seed's values hold the number (a step may run on the first seeds only)."""
    try:
        claim_value(values, path)
    except KeyError:
        return False
    return True


def study_claims(name: str, data: str, quick: bool = False) -> list:
    claims = STUDIES[name].claims
    return claims(data, quick) if callable(claims) else claims


def arm_check(done: list, run: str) -> tuple:
    """(metric, how far it moved): the convergence check of the trainings named `run`, on the metric their
    evaluations log for the features (k-NN) or, for a classifier (sup, SSAT, fine-tuning), its test accuracy."""
    curves, key = [], "knn_acc"
    for _, st, d in done:
        if st.name == run and st.argv[0] in ("train", "finetune"):
            with open(os.path.join(d, "results.json")) as f:
                key = "test_acc" if json.load(f)["method"] in ("sup", "ssat") else "knn_acc"
            curves.append([(r["epoch"], r[key]) for r in M.read_jsonl(os.path.join(d, "metrics.jsonl"))
                           if r["kind"] == "eval" and key in r])
    return key, convergence(curves) if curves else math.nan


def judge_claims(claims: list, values: dict, done: list) -> list:
    """Each claim of the study: the values per seed (the seeds that have both numbers), the paired difference
    with its interval, the difference the seeds can detect, the convergence check of the runs behind both
    numbers, the verdict."""
    rows, checks = [], {}
    for c in claims:
        seeds = [s for s in sorted(values) if all(has_value(values[s], p) for p in (c.a, c.b))]
        a, b = ([claim_value(values[s], p) for s in seeds] for p in (c.a, c.b))
        mean, low, high = paired_interval(a, b)
        arms = sorted({p.split(":")[0].split("/")[0] for p in (c.a, c.b)})
        moved = {arm: checks.setdefault(arm, arm_check(done, arm)) for arm in arms}
        settled = all(m < CONVERGED for _, m in moved.values())          # NaN (no reading) fails
        rows.append({**dataclasses.asdict(c), "seeds": seeds, "values_a": a, "values_b": b, "difference": mean,
                     "low": low, "high": high, "detectable": detectable(a, b),
                     "moved": {arm: {"metric": k, "moved": m} for arm, (k, m) in moved.items()}, "settled": settled,
                     "verdict": verdict(low, high, c.sign, c.effect, settled)})
    return rows


def number(v: float, like: float | None = None, sign: str = "") -> str:
    """Three decimals for accuracies and cosines; three significant digits for numbers (`like`: the number
    that sets the format) under 0.01 (curvature ratios) or over 10 (seconds)."""
    m = abs(v if like is None else like)
    return f"{v:{sign}.3f}" if m == 0 or 0.01 <= m < 10 else f"{v:{sign}.3g}"


def mean_sd(xs: list) -> str:
    """'mean +- sd' over seeds."""
    m = sum(xs) / len(xs)
    return number(m) if len(xs) == 1 else f"{number(m)} +- {number((sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5, m)}"


METRIC = {"knn_acc": "k-NN", "test_acc": "test acc."}


def check_text(c: dict) -> str:
    """The convergence check of a claim's runs, as the report states it."""
    arms = ", ".join(f"`{arm}` {METRIC[r['metric']]} {number(r['moved'], 0.5) if math.isfinite(r['moved']) else 'unread'}"
                     for arm, r in c["moved"].items())
    return f"{arms}: {'settled' if c['settled'] else 'not settled'}"


def write_report(name: str, stem: str, command: str, done: list, values: dict, claims: list, out: str,
                 quick: bool = False) -> str:
    """OUT/report.md: the claims with their verdicts, every step's numbers, the figures (OUT/STEM-*.png: NAME,
    on another data set than the digits NAME-DATA)."""
    seeds, study = sorted(values), STUDIES[name]
    lines = [f"# Study `{name}`: {study.title}", "", f"`{command}`", "",
             f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); {len(done)} steps; every run under `{out}`. Each "
             f"claim is the paired difference a - b over the seeds that ran both, with its 95% t-interval. The "
             f"convergence check: the metric each run logs at its evaluations (k-NN accuracy of the features; a "
             f"classifier's test accuracy), averaged over seeds, moves less than {CONVERGED} between "
             f"{1 - TAIL:.0%} and 100% of the schedule, for every run behind both numbers ('unread': fewer than two "
             f"evaluations there). Verdict: **not tested** when a run fails that check; else **reproduced** when "
             f"the interval excludes 0 in the claimed direction, **contradicted** when it excludes 0 the other way, "
             f"**no effect of the paper's size** when it covers 0 but not the paper's own effect, **inconclusive** "
             f"otherwise. *Detectable*: the smallest true difference these seeds find 4 times in 5 (two-sided 5%, "
             f"power 80%, with the spread the seeds showed).", "",
             ("**--quick**: every training runs 2 epochs of 32 images from 96, to try the machinery; the settings "
              "below are the full study's. " if quick else "") + study.about, "",
             "| claim | a | b | a - b (95% interval) | detectable | the paper's effect | convergence check | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        d = c["difference"]
        interval = f"({number(c['low'], d, '+')} to {number(c['high'], d, '+')})" if len(c["seeds"]) > 1 else \
            "(one seed: no interval)"
        effect = f"{number(c['effect'], c['effect'], '+')} ({c['source']})" if c["effect"] is not None else "-"
        seeds_note = "" if len(c["seeds"]) == len(seeds) else f", seeds {', '.join(map(str, c['seeds']))}"
        text = c["text"].replace("|", "\\|")                                       # a table cell
        lines.append(f"| {text} (`{c['a']}` {'>' if c['sign'] > 0 else '<'} `{c['b']}`{seeds_note}) | "
                     f"{mean_sd(c['values_a'])} | {mean_sd(c['values_b'])} | {number(d, d, '+')} {interval} | "
                     f"{number(c['detectable'], d) if math.isfinite(c['detectable']) else '-'} | {effect} | "
                     f"{check_text(c)} | **{c['verdict']}** |")
    steps = list(dict.fromkeys(st.key for _, st, _ in done))
    has = lambda r, k: any(f"{r}:{k}" in values[s] for s in seeds)                           # noqa: E731
    keys = [k for k in study.columns if any(has(r, k) for r in steps)]
    lines += ["", "Every step's numbers, mean +- standard deviation over the seeds that ran it:", "",
              "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| `{r}` | " + " | ".join(mean_sd([values[s][f"{r}:{k}"] for s in seeds if f"{r}:{k}" in values[s]])
                                         if has(r, k) else "-" for k in keys) + " |"
              for r in steps if any(has(r, k) for k in keys)]
    plot_claims(claims, os.path.join(out, f"{stem}-claims.png"), f"study {stem}: a - b per claim, 95% t-interval "
                                                                 f"over {len(seeds)} seeds")
    figures = [("each claim's paired difference with its 95% interval", f"{stem}-claims.png")]
    figures += study.figures(out, stem, done, values) if study.figures else []
    lines += [""] + [f"![{caption}]({file})" for caption, file in figures] + [""]
    M.atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines))
    return os.path.join(out, "report.md")


def cmd_study(args):
    """Run a study (or resume it), then write OUT/results.json, OUT/report.md and its figures."""
    if args.list or args.name is None:
        if args.name is None and not args.list:
            raise M.BadInput(f"study needs a NAME: {', '.join(STUDIES)} (or --list)")
        for k, st in STUDIES.items():
            print(f"{k}: {st.title}: " + "; ".join(
                f"{d}: {len(st.steps(0, False, d))} steps a seed, {len(study_claims(k, d))} claims, default {n} "
                f"seeds, {cost} for them" for d, (n, cost) in st.runs.items()))
        return
    data, runs = args.data or "digits", STUDIES[args.name].runs
    if data not in runs:
        raise M.BadInput(f"study {args.name} runs on {' or '.join(runs)}, not {data}")
    seeds = args.seeds or runs[data][0]
    stem = args.name + ("" if data == "digits" else f"-{data}")     # names the default OUT and the figures
    out = args.out or os.path.join("runs", f"study-{stem}")
    if data == "fashion-mnist":
        M.load_fashion_mnist(None)               # missing files: one line saying how to install them, before any run
    command = f"python bench.py study {args.name} --seeds {seeds}" + ("" if data == "digits" else f" --data {data}") \
        + (" --quick" if args.quick else "")
    claims = study_claims(args.name, data, args.quick)
    done = run_study(args.name, seeds, out, args.quick, data)
    values = study_values(done)
    claims = judge_claims(claims, values, done)
    M.atomic_write_text(os.path.join(out, "results.json"), json.dumps(
        {"study": args.name, "command": command, "data": data, "seeds": seeds, "quick": args.quick,
         "runs": [{"seed": seed, "name": st.name, "argv": st.argv, "dir": d, "file": st.record,
                   "record": flat_numbers(json.load(open(os.path.join(d, st.record))))} for seed, st, d in done],
         "claims": claims}, indent=2))
    report = write_report(args.name, stem, command, done, values, claims, out, args.quick)
    counts = ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}"
                       for v in VERDICTS)
    print(f"bench.py study {args.name}: {len(claims)} claims over {seeds} seeds: {counts}; -> {report}")

def plot_claims(claims: list, path: str, title: str) -> None:
    """A study's claims as rows: each paired difference (signed so that right is the claimed direction) with
    its 95% interval, coloured by verdict; each row scaled to its own largest end (the claims' units differ),
    the numbers written beside it."""
    plt = M._pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.62 * len(claims) + 1.5), constrained_layout=True)
    colour = {"reproduced": "tab:green", "contradicted": "tab:red", "no effect of the paper's size": "tab:blue",
              "inconclusive": "tab:grey", "not tested": "tab:orange"}
    for i, c in enumerate(claims):
        d = c["sign"] * c["difference"]
        lo, hi = sorted((c["sign"] * c["low"], c["sign"] * c["high"])) if math.isfinite(c["low"]) else (math.nan,) * 2
        scale = max([abs(v) for v in (lo, hi, d) if math.isfinite(v)] + [1e-300])
        ax.plot([lo / scale, hi / scale], [i, i], color=colour[c["verdict"]], lw=2.5)
        ax.plot(d / scale, i, "o", color=colour[c["verdict"]])
        ax.annotate(f"{number(d, d, '+')} ({number(lo, d, '+')} to {number(hi, d, '+')}): {c['verdict']}", (1.02, i),
                    xycoords=("axes fraction", "data"), va="center", fontsize=8, color=colour[c["verdict"]])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(claims)), [textwrap.fill(c["text"], 62) for c in claims], fontsize=8)
    ax.set(ylim=(len(claims) - 0.5, -0.5), xlim=(-1.08, 1.08), title=title,
           xlabel="paired difference over seeds in the claimed direction (a - b; b - a where a < b is claimed), each "
                  "row scaled to its largest end")
    M.save_figure(fig, path)


def plot_study_curves(done: list, runs: tuple, key: str, path: str, title: str) -> None:
    """A test metric of several runs of a study through training (metrics.jsonl): mean over seeds, range shaded."""
    import numpy as np
    plt = M._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for c, run in enumerate(runs):
        curves = [[(r["epoch"], r[key]) for r in M.read_jsonl(os.path.join(d, "metrics.jsonl"))
                   if r["kind"] == "eval" and key in r] for _, st, d in done if st.name == run and st.argv[0] == "train"]
        n = min(map(len, curves))
        if not n:
            continue
        x, ys = np.array([e for e, _ in curves[0][:n]]), np.array([[v for _, v in cv[:n]] for cv in curves])
        ax.plot(x, ys.mean(0), color=f"C{c}", marker=".", label=f"{run} ({len(curves)} seeds)")
        ax.fill_between(x, ys.min(0), ys.max(0), color=f"C{c}", alpha=0.2)
    ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=title)
    ax.legend()
    M.save_figure(fig, path)


def plot_scaling(values: dict, methods: list, sizes: list, key: str, path: str) -> None:
    """A metric against the training-set size, one line per method: mean +- sd over seeds."""
    import numpy as np
    plt = M._pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for c, (m, label) in enumerate(methods):
        v = np.array([[values[s][f"{m}-{n}:{key}"] for n in sizes] for s in sorted(values)])
        ax.errorbar(sizes, v.mean(0), yerr=v.std(0, ddof=1) if len(v) > 1 else None, marker="o", capsize=3,
                    color=f"C{c}", label=label)
    ax.set(xscale="log", xlabel="training images", ylabel=key.replace("_", " "),
           title=f"{key.replace('_', ' ')} against the training-set size, mean +- sd over {len(values)} seeds")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.legend()
    M.save_figure(fig, path)


def study_parser() -> M.Parser:
    s = M.Parser(prog="bench.py study", description="a paper's claims over seeds: every run, a report with verdicts")
    s.add_argument("name", nargs="?", choices=STUDIES, help="the study (see --list)")
    s.add_argument("--list", action="store_true", help="list the studies")
    s.add_argument("--seeds", type=M.checked(int, lambda v: 1 <= v <= 10, "from 1 to 10"),
                   help="seeds 0 ... N-1 (default: the study's)")
    s.add_argument("--data", choices=("digits", "fashion-mnist"), help="the data set (default digits; study ssat "
                                                                      "also on fashion-mnist)")
    s.add_argument("--out", help="where the runs and the report go (default runs/study-NAME[-DATA])")
    s.add_argument("--quick", action="store_true", help="tiny schedules, to try the machinery (not for verdicts)")
    return s


def study_main(argv) -> int:
    """`python bench.py study ...`: bad input and stops end in one line and an exit status, as mimland's CLI."""
    args = study_parser().parse_args(argv)
    M.keep_freed_memory()
    try:
        cmd_study(args)
    except (M.BadInput, M.RunStopped, KeyboardInterrupt) as e:
        code, msg = (2, f"error: {e}") if isinstance(e, M.BadInput) else (130, "interrupted") \
            if isinstance(e, KeyboardInterrupt) else (e.code, str(e))
        print(f"bench.py study: {msg}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
