"""One epoch of ppo.py's work, phase by phase: time, memory, achieved FLOP/s and the on-policy check.

The phases are ppo.py's own code paths (common.sample with log-probs, common.decode_latents, the reward of
rewards.make with ppo.per_prompt_advantages, common.step_log_prob with ppo.policy_loss and its backward
over the trained timesteps, then the optimiser step with ppo.py's settings), timed with a device sync at each
phase boundary and none inside. One epoch here is one sampling call of --batch images (with CFG the UNet sees
2 x --batch rows) and one optimiser step on all of them, in minibatches of --train-batch-size (default: all).

Printed: seconds and peak memory per phase (the CUDA allocator's peak on GPU, the resident set's on CPU),
images per second, the model FLOPs of the training step (counted by torch's FlopCounterMode on a meta-device
copy of the UNet: no compute, and no recomputation from gradient checkpointing) and the fraction of the
device's matmul peak they reach (measured in the same run with a large matmul: in the training dtype on a GPU,
bf16 by default; in fp32 on a CPU), and the on-policy deviation mean |rho - 1| before any update, with the
sampler and the training forward in fp32, bf16 and fp16, against the clip range (ppo.py's 1e-4).

    python benchmarks/train_step.py --model tiny                                  # CPU, seconds (the suite runs it)
    python benchmarks/train_step.py --batch 8 --gradient-checkpointing            # SD 1.5's shapes, random weights, GPU
    python benchmarks/train_step.py --batch 1 --num-steps 2 --timestep-fraction 0.5 --warmup 0 --ratio-precisions
                                                                                  # SD 1.5's shapes on a CPU, ~5 minutes
    python benchmarks/train_step.py --model sd35m-random --batch 8 --gradient-checkpointing   # SD 3.5 Medium's shapes

On an SD 3.x model (flow matching, docs/flow.md) the same phases run through the flow path, with the transformer
in the UNet's place and the family's sampling defaults (10 steps, guidance 4.5, noise level 0.7) for the flags
left unset. Images are sampled at --resolution, as in the scripts: by default the model's native size on SD 1.x/2.x
and Flow-GRPO's 512 px on SD 3.x (a 64 x 64 latent for SD 3.5 Medium, whose native size is 1024).
"""

import contextlib
import copy
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import ppo  # noqa: E402
import rewards  # noqa: E402
import runs  # noqa: E402

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
PHASES = ("sampling", "decode", "reward", "training", "optimiser")


@dataclass
class Args:
    model: str = common.SD15_RANDOM
    """hub id, local folder, `sd15-random` (SD 1.5's shapes, random weights, offline), `tiny`, or their SD 3.x
    counterparts `sd35m-random` and `tiny-sd3`"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda if available)"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """precision of the timed epoch, as ppo.py's flag (auto: fp16 on GPU, fp32 on CPU)"""
    batch: int = 8
    """images sampled per epoch, in one sampling call (the UNet sees 2 x batch rows with CFG)"""
    train_batch_size: Optional[int] = None
    """trajectories per training minibatch, gradients accumulated over batch / this (default: --batch, one minibatch)"""
    num_steps: Optional[int] = None
    """sampling steps per trajectory (default: 50 on SD 1.x/2.x, 10 on SD 3.x)"""
    timestep_fraction: float = 1.0
    """train on this fraction of each trajectory's steps, as ppo.py's flag"""
    timesteps_per_call: Optional[int] = None
    """trained timesteps of each trajectory per UNet call, as the scripts' flag (default: all on a CPU, 1 on a GPU)"""
    guidance: Optional[float] = None
    """classifier-free guidance scale w (default: 5 on SD 1.x/2.x, 4.5 on SD 3.x)"""
    eta: Optional[float] = None
    """DDIM eta, or on SD 3.x Flow-GRPO's noise level (default: 1, or 0.7)"""
    resolution: Optional[int] = None
    """image side in pixels for sampling, as the scripts' flag (default: the model's native size on SD 1.x/2.x; on
    SD 3.x Flow-GRPO's 512, or the native size where smaller)"""
    lora_rank: int = 4
    """LoRA rank; 0 trains the whole denoiser (UNet or transformer)"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass"""
    compile: bool = False
    """torch.compile the UNet (the --warmup epochs absorb the compilation)"""
    channels_last: bool = False
    """the UNet's weights in channels-last memory format (common.load_pipeline's switch; not yet a flag of the
    scripts)"""
    reward: str = "jpeg_compressibility"
    """the reward (ppo.py's default; it needs no weights)"""
    warmup: int = 1
    """untimed epochs before the timed one (compilation, the allocator, lazy initialisation)"""
    ratio_precisions: tuple[Literal["no", "bf16", "fp16"], ...] = ("no", "bf16", "fp16")
    """precisions in which to measure the on-policy deviation (each loads the model afresh; empty: none)"""
    matmul_size: Optional[int] = None
    """n of the n x n matmul that measures the device's peak (default: 8192 on GPU, 2048 on CPU)"""
    seed: int = 0
    """seed of the prompts, the noise and the LoRA initialisation"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    """Start a new peak-memory window: the CUDA allocator's peak, or the process's peak resident set (VmHWM,
    reset through /proc/self/clear_refs; where that is refused, the peak stays the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory(device, peak: bool) -> float:
    """Bytes: allocated (or peak allocated) on the GPU; resident (or peak resident) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    import resource  # not Linux: the lifetime peak

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Phases:
    """Seconds and peak memory per phase, with a device sync at each boundary only."""

    def __init__(self, device):
        self.device, self.seconds, self.peak = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        reset_peak(self.device)
        t = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        self.peak[name] = max(self.peak.get(name, 0), memory(self.device, peak=True))


@contextlib.contextmanager
def counting_syncs(device, counts: dict, name: str):
    """On a GPU, count the host syncs that torch reports (cuda.set_sync_debug_mode) inside the block."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts[name] = counts.get(name, 0) + sum("synchroniz" in str(w.message) for w in caught)


def load(args, precision: str, device):
    return common.load_pipeline(args.model, device=device, mixed_precision=precision, lora_rank=args.lora_rank,
                                gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                                seed=args.seed,
                                channels_last=args.channels_last, resolution=args.resolution)


def draw_prompts(args, prompts, epoch):
    g = common.generator("cpu", args.seed, epoch, common.Stream.PROMPTS)
    return [prompts[i] for i in torch.randint(len(prompts), (args.batch,), generator=g).tolist()]


def sample(args, pipe, texts, neg_embeds, precision, epoch, device):
    """ppo.py's SAMPLING for one call: prompt embeddings, then trajectories with log-probs (not decoded)."""
    common.denoiser(pipe).eval()
    embeds = common.encode_prompts(pipe, texts)  # (B, 77, D), or SD 3.x's packed (B, L + 1, D)
    with common.autocast(device, precision):
        traj = common.sample(pipe, embeds, neg_embeds, num_steps=args.num_steps, guidance=args.guidance, eta=args.eta,
                             generator=common.sample_generators(args.seed, epoch, range(len(texts)), device),
                             decode=False)
    return embeds, traj


def train_pass(args, pipe, traj, embeds, neg_embeds, advantages, precision, epoch, device, hp, scaler=None):
    """ppo.py's TRAINING block for one inner epoch: a random order of the trajectories cut into minibatches of
    --train-batch-size, a random subset and order of timesteps per trajectory, the log-prob of each stored transition
    under the current weights, PPO's loss and its backward, gradients accumulated over all minibatches (without a
    `scaler`: the forward only, with gradients enabled as in training). Returns |rho - 1| and the step index of every
    evaluated transition, both flat."""
    b, tb = len(advantages), args.train_batch_size or args.batch
    num_train = max(1, int(args.num_steps * args.timestep_fraction))
    common.denoiser(pipe).train()
    g = common.generator(device, args.seed, epoch, common.Stream.SHUFFLE)
    perm = torch.randperm(b, generator=g, device=device)
    step_perm = torch.argsort(torch.rand(b, args.num_steps, generator=g, device=device), dim=1)[:, :num_train]
    deviation, at = [], []
    for m in range(b // tb):
        idx = perm[m * tb : (m + 1) * tb]
        steps, rows = step_perm[idx], idx[:, None]  # (tb, T_train)
        latents, next_latents = traj.latents[rows, steps], traj.latents[rows, steps + 1]
        old = traj.log_probs[rows, steps]
        chunk = common.timesteps_per_call(args.timesteps_per_call, num_train, device)  # as the scripts choose
        for j in range(0, num_train, chunk):
            js = slice(j, j + chunk)
            with common.autocast(device, precision):
                log_prob, _ = common.step_log_prob(pipe, latents[:, js], next_latents[:, js],
                                                   traj.timesteps[steps[:, js]],
                                                   embeds[idx], neg_embeds, num_steps=args.num_steps,
                                                   guidance=args.guidance, eta=args.eta)  # (tb, n)
            if scaler is not None:
                loss, _, _ = ppo.policy_loss(log_prob, old[:, js], advantages[idx][:, None], hp.clip)
                scaler.scale(loss * log_prob.shape[1] / (b // tb * num_train)).backward()
            deviation.append((torch.exp(log_prob.detach() - old[:, js]) - 1).abs().flatten())
            at.append(steps[:, js].flatten())
    return torch.cat(deviation), torch.cat(at)


def deviation_summary(deviation, steps, num_steps: int) -> dict:
    """mean |rho - 1|, and the denoising step (1 = the noisiest) whose mean deviation is the largest."""
    deviation, steps = deviation.double().cpu(), steps.cpu()
    total = torch.zeros(num_steps, dtype=torch.float64).index_add_(0, steps, deviation)
    count = torch.zeros(num_steps, dtype=torch.float64).index_add_(0, steps, torch.ones_like(deviation))
    per_step = torch.where(count > 0, total / count.clamp(min=1), torch.nan)
    worst = int(torch.nan_to_num(per_step, nan=-1.0).argmax())
    return dict(mean=float(deviation.mean()), worst_step=worst + 1, worst=float(per_step[worst]))


@contextlib.contextmanager
def unet_in_fp32(unet):
    """The denoiser's frozen weights temporarily in float32 (a bf16 or fp16 value converts exactly, and back)."""
    dtypes = {name: p.dtype for name, p in unet.named_parameters()}
    unet.float()
    try:
        yield
    finally:
        for name, p in unet.named_parameters():
            p.data = p.data.to(dtypes[name])


def model_flops(pipe, rows: int, backward: bool, embeds: torch.Tensor) -> int:
    """FLOPs of one denoiser call on `rows` latents (and its backward into the trainable weights), counted by
    FlopCounterMode on a meta-device copy of the UNet or transformer: matmuls, convolutions and attention; no
    recomputation. The latents are of the side the sampler draws (--resolution); `embeds`: one row of the text
    conditioning, whose shape the counted call takes."""
    from torch.utils.flop_counter import FlopCounterMode

    model = common.denoiser(pipe)
    with torch.device("meta"):
        counted = type(model).from_config(model.config)
        if getattr(model, "peft_config", None):
            counted.add_adapter(copy.deepcopy(model.peft_config["default"]))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in counted.named_parameters():
        p.requires_grad_(trainable[n])
    c, h = counted.config.in_channels, common.latent_side(pipe)
    x = torch.zeros(rows, c, h, h, device="meta")
    e = torch.zeros(rows, *embeds.shape[1:], device="meta")
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        if common.is_flow(pipe):
            hidden, pooled = common.unpack_flow_embeds(counted, e)
            out = counted(hidden_states=x, timestep=torch.zeros(rows, device="meta"), encoder_hidden_states=hidden,
                          pooled_projections=pooled).sample
        else:
            out = counted(x, torch.zeros(rows, dtype=torch.long, device="meta"), encoder_hidden_states=e).sample
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


def matmul_peak(device, dtype, n: int) -> float:
    """FLOP/s of the best of a few n x n matmuls in `dtype` (after one warm-up)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    reps = 10 if device.type == "cuda" else 1
    a @ b
    best = math.inf
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or "CPU"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs.fill_family_defaults(args, dict(num_steps=50, guidance=5.0, eta=1.0))  # the unset ones: the family's
    cli.check_flags(args, {  # the flags it shares with the scripts as they check them, and its own
        "train_batch_size": ("an integer >= 1, or omitted for --batch", lambda v: v is None or v >= 1),
        "matmul_size": ("an integer >= 1, or omitted for the device's default", lambda v: v is None or v >= 1)})
    if args.batch < 1 or args.warmup < 0 or not 1 <= args.num_steps <= 1000 or not 0 < args.timestep_fraction <= 1:
        cli.fail("--batch >= 1, --warmup >= 0, --num-steps in [1, 1000] and --timestep-fraction in (0, 1] are required")
    if args.train_batch_size is not None and not (
            1 <= args.train_batch_size and args.batch % args.train_batch_size == 0):
        cli.fail(f"--train-batch-size {args.train_batch_size} must divide --batch {args.batch}")
    device = runs.setup_distributed(args.device).device  # one line for a device that is not there
    cli.exit_in_one_line(lambda: "nothing was written; run it again")  # Ctrl-C: one line
    precision = common.resolve_precision(args.mixed_precision, device)
    hp = ppo.Args()  # ppo.py's defaults: clip, AdamW settings, gradient-norm clip, advantage statistics
    num_train = max(1, int(args.num_steps * args.timestep_fraction))
    common.speed_flags(device)
    torch.manual_seed(args.seed)
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3

    prompts = common.load_prompts(hp.prompts)
    reward_fn = runs.CheckedReward(rewards.make(args.reward, device, prompts=prompts), args.reward)
    pipe = load(args, precision, device)
    neg_embeds = common.encode_prompts(pipe, [""])  # (1, 77, D) or (1, L + 1, D)
    params = common.trainable_parameters(common.denoiser(pipe))
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2),
                                  weight_decay=hp.weight_decay, eps=hp.adam_epsilon, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    attention = sorted({type(p).__name__ for p in common.denoiser(pipe).attn_processors.values()})
    resident = memory(device, peak=False)

    stats, syncs, deviation = {}, {}, {}  # deviation: precision -> summary
    for epoch in range(args.warmup + 1):
        timed = epoch == args.warmup
        phases = Phases(device)
        check_syncs = epoch == 0 and args.warmup > 0  # sync debug mode costs a little: only in a warm-up epoch
        texts = draw_prompts(args, prompts, epoch)
        with phases("sampling"), counting_syncs(device, syncs if check_syncs else {}, "sampling"):
            embeds, traj = sample(args, pipe, texts, neg_embeds, precision, epoch, device)
        latent = "x".join(map(str, traj.latents.shape[-2:]))  # as sampled: the side --resolution gives
        with phases("decode"), common.autocast(device, precision):  # ppo.py decodes inside common.sample's autocast
            images = common.decode_latents(pipe, traj.latents[:, -1])
        with phases("reward"):
            rewards = reward_fn(images, texts)
            advantages = ppo.per_prompt_advantages(stats, texts, rewards, hp.stat_buffer_size, hp.stat_min_count)
            advantages = advantages.clamp(-hp.adv_clip_max, hp.adv_clip_max)
        with phases("training"), counting_syncs(device, syncs if check_syncs else {}, "training"):
            dev, steps = train_pass(args, pipe, traj, embeds, neg_embeds, advantages, precision, epoch, device, hp,
                                    scaler)
        if epoch == 0:  # the first epoch's is before any update
            in_run = deviation_summary(dev, steps, args.num_steps)
        with phases("optimiser"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if timed:
            seconds, peaks = phases.seconds, phases.peak
    epoch_s = sum(seconds.values())
    rows = 2 * args.batch if args.guidance != 1 else args.batch
    train_flops = model_flops(pipe, rows, True, neg_embeds) * num_train
    sample_flops = model_flops(pipe, rows, False, neg_embeds) * args.num_steps
    # the peak in the training dtype on a GPU (fp32 matmuls run as TF32 there: speed_flags); always fp32 on a CPU, whose
    # bf16 and fp16 matmuls may have no fast kernel at all
    peak_precision = precision if device.type == "cuda" else "no"
    peak = matmul_peak(device, common.DTYPES[peak_precision],
                       args.matmul_size or (8192 if device.type == "cuda" else 2048))
    peak_name = "tf32" if device.type == "cuda" and precision == "no" else PRECISION_NAMES[peak_precision]
    del pipe, optimizer, traj, images, dev

    for other in args.ratio_precisions:  # the on-policy check in each precision, from a freshly loaded model
        try:
            pipe = load(args, other, device)
            neg_embeds = common.encode_prompts(pipe, [""])
            texts = draw_prompts(args, prompts, 0)
            embeds, traj = sample(args, pipe, texts, neg_embeds, other, 0, device)
            zeros = torch.zeros(args.batch, device=device)
            dev, steps = train_pass(args, pipe, traj, embeds, neg_embeds, zeros, other, 0, device, hp)
            deviation[other] = deviation_summary(dev, steps, args.num_steps)
            if other != "no":  # the same transitions re-evaluated in fp32: the size of this precision's rounding
                with unet_in_fp32(common.denoiser(pipe)):
                    dev, steps = train_pass(args, pipe, traj, embeds.float(), neg_embeds.float(), zeros, "no", 0,
                                            device, hp)
                deviation[other]["rounding"] = deviation_summary(dev, steps, args.num_steps)
        except Exception as e:  # noqa: BLE001 - e.g. an op without a kernel in this dtype on this device: say so
            deviation[other] = dict(error=cli.one_line(e, 120))
        pipe = traj = dev = None

    # REPORT
    memory_kind = "CUDA allocator peak" if device.type == "cuda" else "peak resident set (RSS)"
    print(f"model={args.model} device={device} ({machine(device)}) threads={torch.get_num_threads()} "
          f"load_average={load_average[0]:.2f},{load_average[1]:.2f},{load_average[2]:.2f}")
    print(f"precision={PRECISION_NAMES[precision]} batch={args.batch} "
          f"train_batch_size={args.train_batch_size or args.batch} (CFG: the UNet sees twice as many rows) "
          f"num_steps={args.num_steps} trained_steps={num_train} "
          f"timesteps_per_call={common.timesteps_per_call(args.timesteps_per_call, num_train, device)} "
          f"guidance={args.guidance} eta={args.eta} resolution={args.resolution or 'default'} latent={latent} "
          f"lora_rank={args.lora_rank} gradient_checkpointing={args.gradient_checkpointing} compile={args.compile} "
          f"channels_last={args.channels_last} warmup={args.warmup}")
    print(f"torch {torch.__version__}; attention processors: {', '.join(attention)} (AttnProcessor2_0 = torch SDPA); "
          f"memory after loading: {gib(resident)} GiB")
    print()
    print(f"| phase | seconds | share | peak memory GiB ({memory_kind}) |")
    print("|---|---|---|---|")
    for name in PHASES:
        print(f"| {name} | {seconds[name]:.3f} | {100 * seconds[name] / epoch_s:.1f}% | {gib(peaks[name])} |")
    print(f"| epoch | {epoch_s:.3f} | 100.0% | {gib(max(peaks.values()))} |")
    print()
    train_rate = train_flops / seconds["training"]
    print(f"images/s: {args.batch / epoch_s:.4g}")
    print(f"sampling: {sample_flops / 1e12:.4g} TFLOP (model), {sample_flops / seconds['sampling'] / 1e12:.4g} TFLOP/s")
    print(f"training: {train_flops / 1e12:.4g} TFLOP (model, forward+backward), {train_rate / 1e12:.4g} TFLOP/s = "
          f"{100 * train_rate / peak:.1f}% of the measured {peak_name} matmul peak {peak / 1e12:.4g} TFLOP/s")
    if device.type == "cuda":
        counts = ", ".join(f"{k} {v}" for k, v in syncs.items()) if syncs else "not checked (--warmup 0)"
        print("host syncs reported by torch.cuda.set_sync_debug_mode in the first epoch, whole phases with their "
              f"set-up (one per step would be >= {args.num_steps}): {counts}")
    print()
    print(f"on-policy deviation mean |rho - 1| before any update (clip {hp.clip:g}; the scripts warn above clip/10 = "
          f"{hp.clip / 10:g}); in the timed run ({PRECISION_NAMES[precision]}, first epoch): {in_run['mean']:.3e}.")
    print("Each precision below from a freshly loaded model; 'rounding' re-evaluates the same transitions with the "
          "UNet in fp32: an upper estimate of what kernels that differ between sampling and training (batch size, "
          "compile) could cause.")
    print("| precision | mean abs(rho - 1) | worst step (1 = noisiest) | its mean | rounding: mean | rounding: worst "
          "step, its mean |")
    print("|---|---|---|---|---|---|")
    for name in ("no", "bf16", "fp16"):
        d = deviation.get(name)
        if d is None:
            continue
        if "error" in d:
            print(f"| {PRECISION_NAMES[name]} | failed: {d['error']} | | | | |")
            continue
        r = d.get("rounding")
        rounding = f"{r['mean']:.3e} | {r['worst_step']}/{args.num_steps}, {r['worst']:.3e}" if r else "- | -"
        print(f"| {PRECISION_NAMES[name]} | {d['mean']:.3e} | {d['worst_step']}/{args.num_steps} | {d['worst']:.3e} | "
              f"{rounding} |")
