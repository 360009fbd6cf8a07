"""bench.py: how fast mimland trains, against the hardware's limit, the papers' numbers and peer code.

    python bench.py                 # this CPU: reduced scale (ViT 192 wide, 6 deep, 32x32 images), < 10 min
    python bench.py --full          # one GPU: ViT-B/16 and ViT-L/16 at 224, per-GPU batch 64 as the reference
                                    # (compiled, with CUDA graphs, also 256); --sizes vit_base for one size
    python bench.py --json out.json # every figure, the device, torch version and configuration
    python bench.py --bars a.json b.json   # measure nothing: saved runs side by side, against the bars

Step times are medians over interleaved rounds (the methods take turns, so drift in the machine's speed
affects them alike), on synthetic data already on the device. Model FLOPs are mimland's analytic count,
cross-checked against torch.utils.flop_counter. Peers (the PyPI packages vit-pytorch and loss-landscapes)
run in the same process when installed and are never required.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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
    run = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None) if compiled else model
    opt = torch.optim.AdamW(M.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    imgs, labels, noise = synthetic_batch(cfg, batch, device)
    a = {"method": method, "accum_iter": 1, "mask_ratio": 0.75, "smoothing": 0.0, "clip_grad": None}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if method == "rcmae" and ema != "foreach":   # the reference's loop: one mul_ and one add_ per parameter
        def loop_ema(m):
            with torch.no_grad():
                for s, t in zip(model.student.parameters(), model.teacher.parameters()):
                    t.mul_(m).add_((1 - m) * s)
        model.update_teacher = loop_ema

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
            M.train_step(run, opt, [(imgs, labels, noise, None)], a, 1e-4, 0.996, raw=model, autocast=autocast)
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
            M.loss_and_parts(method, model, imgs, labels, 0.75, noise)
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


def bars(report: dict) -> list:
    """What the performance bars are judged on, read from a run's report (its --json file): per model size,
    (size, {column: (value, met, text)}), met None where no bar applies; the landscape's figures and the run's
    time go with the first size."""
    cpu = report["info"]["device"] == "cpu"
    out = []
    for i, (size, ratios) in enumerate(report.get("ratios", {}).items()):
        row = {}

        def put(name, value, bar=None, pct=False):   # bar: the test a figure must pass, where one applies
            text = "-" if value is None else f"{value:.0%}" if pct else fmt(float(value))
            row[name] = (value, None if value is None or bar is None else bool(bar(value)), text)

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


def bars_table(reports: dict) -> str:
    """One row per run (name -> report) and model size, with the figures of bars(); x marks a bar not met."""
    rows = [(name, r["info"].get("name", r["info"]["device"]), size, row)
            for name, r in reports.items() for size, row in bars(r)]
    cols = list(dict.fromkeys(k for *_, row in rows for k in row))
    return table("Against the bars (x: not met)", ["run", "machine", "size"] + cols,
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
            raise ValueError(f"{path}: cannot read it as JSON ({e.__class__.__name__}: {e}); give --bars the files "
                             "that `bench.py --json` wrote") from None
        if not (isinstance(r, dict) and isinstance(r.get("info"), dict) and "device" in r["info"] and r.get("ratios")):
            raise ValueError(f"{path}: not a `bench.py --json` report with its ratios table (a run that stopped "
                             "before it has none); give --bars the files that whole runs wrote")
        reports[os.path.basename(path).removesuffix(".json")] = r
    return reports


def main(argv=None) -> int:
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
    p.add_argument("--bars", nargs="+", metavar="JSON",
                   help="measure nothing: print the bars table of saved runs (their --json files) side by side")
    args = p.parse_args(argv)
    if args.bars:
        if any(v != p.get_default(k) for k, v in vars(args).items() if k != "bars"):
            print("bench.py: error: --bars reads saved runs and takes no other option", file=sys.stderr)
            return 2
        try:
            print(bars_table(read_reports(args.bars)))
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
                ratio_rows.append([f"RC-MAE / MAE step time ({prec}; bar 1.4, FLOPs 1.33)", fmt(r)])
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
            ratio_rows.append(["RC-MAE / MAE training memory (bar 1.15)", fmt(mem["rcmae"] / mem["mae"])])
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
    report["bars"] = {size: {k: v[:2] for k, v in row.items()} for size, row in bars(report)}
    emit(bars_table({"this run": report}))
    emit(f"\n(bench.py ran {report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
