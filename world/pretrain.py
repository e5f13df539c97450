"""Pretrain the shapes world's text-to-image model from scratch on a CPU: `python -m world.pretrain`.

Three stages, each a plain supervised loop on images rendered on the fly by `world.render`:
  1. VAE (AutoencoderKL, the `tiny` config: 32x32x3 <-> 4x8x8): reconstruction (MSE) + a small KL;
  2. the decoder alone, encoder frozen (sharper corners; the latents do not move, so stage 3 does not depend
     on this stage);
  3. UNet2DConditionModel (the `tiny` config), epsilon-prediction on Stable Diffusion's 1000-step
     scaled-linear schedule, on pre-encoded latents, conditioned on the frozen random CLIP text encoder of
     the `tiny` model (hidden 32), with 10% empty captions for classifier-free guidance and an EMA.
Then it writes a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
that `StableDiffusionPipeline.from_pretrained` and every script (`--model shapes` or `--model PATH`) load,
and prints how often samples are right (`world.judge`) for single- and two-object prompts.

    python -m world.pretrain                              # the committed recipe into runs/shapes_model: ~29 min on 2
    cores python -m world.pretrain --out world/shapes --overwrite   # remake the committed model in place
    python -m world.pretrain --out /tmp/shapes --unet-steps 500 --vae-steps 300 --decoder-steps 100  # smoke test
    python -m world.pretrain --device cuda --out /tmp/shapes  # a few minutes on a GPU (other weights)

The data are deterministic from `--seed`; bit-identical weights also need the same CPU and thread count.
Nothing is written to `--out` until the model is complete: every stage writes into a temporary folder beside it,
which is renamed into place at the end, so a run stopped at any point leaves `--out` as it was. A `--out` that
already holds files (the committed model, say) is replaced only with `--overwrite`.
"""

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro

import cli
import common
import world


@dataclass
class Args:
    out: str = "runs/shapes_model"
    """the diffusers folder to write, when the run is complete (world/shapes is the committed model: --overwrite)"""
    overwrite: bool = False
    """replace --out if it already holds files (the committed model included)"""
    seed: int = 0
    """seed of the data, the weights' initialisation and the training order"""
    threads: int = 2
    """torch CPU threads"""
    device: str = "cpu"
    """where to train (`cuda` works; the committed model was trained on the CPU, and other devices give other
    weights)"""
    vae_steps: int = 600
    """stage 1: VAE steps (encoder and decoder)"""
    decoder_steps: int = 700
    """stage 2: decoder-only steps"""
    vae_batch: int = 64
    """VAE batch size"""
    vae_lr: float = 1e-3
    """VAE AdamW learning rate"""
    kl_weight: float = 1e-4
    """weight of the VAE's KL term (per latent element, against the per-pixel MSE)"""
    unet_steps: int = 3000
    """stage 3: UNet steps"""
    unet_batch: int = 64
    """UNet batch size"""
    unet_lr: float = 2e-3
    """UNet AdamW learning rate (linear warm-up over 200 steps, constant, then the cosine decay below)"""
    unet_decay: float = 0.3
    """share of the UNet steps, at the end, over which the learning rate falls to 10% on a cosine (0: constant
    after warm-up, so that a run stopped at step N is the run with --unet-steps N)"""
    ema: float = 0.998
    """EMA decay of the UNet weights (the EMA weights are the ones saved)"""
    num_latents: int = 20000
    """images rendered and encoded once for the UNet stage"""
    p_two: float = 0.5
    """share of two-object images in the data"""
    caption_dropout: float = 0.1
    """share of empty captions (classifier-free guidance)"""
    eval_every: int = 0
    """judge samples of the EMA UNet every this many steps (0: only at the end)"""
    eval_images: int = 96
    """images per kind (single, two objects) in each judgement"""
    guidance: float = 5.0
    """classifier-free guidance scale of the judgement's samples"""
    eval_steps: int = 20
    """DDIM steps of the judgement's samples"""
    resume_vae: Optional[str] = None
    """skip stages 1-2 and take the VAE from this diffusers folder (its vae/ subfolder)"""
    vae_only: bool = False
    """stop after stages 1-2 (the VAE is saved to OUT/vae either way)"""


def check_out_and_device(args, out: Path, need):
    """Shared by both pretraining scripts: an --out inside a committed model folder needs --overwrite, and the device
    must be one the training runs on."""
    inside = [d for d in (common.SHAPES_DIR, common.SHAPES_FLOW_DIR) if d in out.resolve().parents]
    need(not inside or args.overwrite,
         f"--out {out} is inside the committed model folder {inside[0] if inside else ''};"
         f" choose an --out under runs/, or add --overwrite if you mean to change the committed model")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = None
    need(kind in ("cpu", "cuda"), f"--device {args.device!r}: this trains on cpu, cuda or cuda:N")


def check(args: Args):
    """One-line errors for flags out of range, before anything loads or trains."""
    def need(ok: bool, msg: str):
        if not ok:
            raise SystemExit(f"world.pretrain: {msg}")
    flag = lambda name: f"--{name.replace('_', '-')} {getattr(args, name)}"  # noqa: E731
    for name in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "num_latents", "eval_images", "eval_steps",
                 "threads"):
        need(getattr(args, name) >= 1, f"{flag(name)}: must be at least 1")
    for name in ("decoder_steps", "eval_every"):
        need(getattr(args, name) >= 0, f"{flag(name)}: must be 0 or more")
    for name in ("vae_lr", "unet_lr"):
        need(0 < getattr(args, name) < math.inf, f"{flag(name)}: must be a positive number")
    need(0 <= args.kl_weight < math.inf, f"--kl-weight must be 0 or a positive number (got {args.kl_weight})")
    need(0 <= args.unet_decay <= 1, f"--unet-decay is a share of the UNet steps, in [0, 1] (got {args.unet_decay})")
    need(0 <= args.ema < 1, f"--ema must be in [0, 1) (got {args.ema})")
    need(0 <= args.p_two <= 1 and 0 <= args.caption_dropout < 1,
         f"--p-two must be in [0, 1] and --caption-dropout in [0, 1) (got {args.p_two}, {args.caption_dropout})")
    need(args.guidance >= 1, f"--guidance must be at least 1 (got {args.guidance})")
    try:
        torch.device(args.device)
    except RuntimeError:
        need(False, f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    vae = Path(args.resume_vae or ".") / "vae"
    need(args.resume_vae is None or ((vae / "config.json").is_file() and any(vae.glob("diffusion_pytorch_model.*"))),
         f"--resume-vae {args.resume_vae}: no complete vae/ folder there (config.json and weights; give a folder this "
         f"script wrote)")
    timesteps = common.ddim_scheduler().config.num_train_timesteps
    need(args.eval_steps <= timesteps, f"--eval-steps {args.eval_steps}: must be at most {timesteps}, the model's "
         f"training timesteps")
    need(not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: torch sees no CUDA GPU on this machine; use --device cpu")
    out = Path(args.out)
    need(not out.exists() or out.is_dir(), f"--out {out} is a file; give a folder")
    check_out_and_device(args, out, need)
    need(not (out.is_dir() and any(out.iterdir())) or args.overwrite,
         f"--out {out} already holds files{' (the committed model)' if out.resolve() == world.MODEL_DIR else ''}; "
         f"add --overwrite to replace it when the new model is complete, or choose another --out")
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    need(os.access(existing, os.W_OK), f"--out {out}: {existing} is not writable; choose another --out")


def staging(out: Path) -> Path:
    """The temporary folder beside --out that a run writes into (emptied first: a stopped run's leftovers go)."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path):
    """Rename the finished model into place; an earlier --out (checked: --overwrite) is removed only then."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def batch(rng: np.random.Generator, n: int, p_two: float, device="cpu"):
    images, captions = world.render(rng, n, p_two)
    return torch.from_numpy(images).to(device) * 2 - 1, captions  # VAE space [-1, 1]


def train_vae(vae, args, rng):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0, total = time.time(), args.vae_steps + args.decoder_steps
    for step in range(total):
        if step == args.vae_steps:  # stage 2: freeze the encoder so the latent space stays where it is
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
            opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], weight_decay=0.0)
        stage1 = step < args.vae_steps
        progress = step / args.vae_steps if stage1 else (step - args.vae_steps) / max(args.decoder_steps, 1)
        for g in opt.param_groups:  # cosine from the peak to 10% within each stage
            g["lr"] = (args.vae_lr if stage1 else args.vae_lr / 2) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        x, _ = batch(rng, args.vae_batch, args.p_two, args.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample() if stage1 else posterior.mode()
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel() if stage1 else torch.zeros(())
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == total - 1:
            err = (recon - x).abs().mean().item() * 127.5  # mean absolute error in 0-255 levels
            log(f"vae {step:5d}/{total} mse {mse.item():.5f} kl {kl.item():.3f} |err| {err:.2f}/255 "
                f"({time.time() - t0:.0f} s)")
    vae.requires_grad_(False).eval()


def unet_lr(step: int, args: Args) -> float:
    """Linear warm-up over 200 steps, constant, then a cosine to 10% over the last `unet_decay` share of the steps."""
    lr = args.unet_lr * min(1.0, (step + 1) / 200)
    decay_start = args.unet_steps * (1 - args.unet_decay)
    if step >= decay_start:
        progress = (step - decay_start) / max(args.unet_steps - decay_start, 1)
        lr *= 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return lr


@torch.no_grad()
def encode_dataset(vae, args, rng):
    """Render and encode `num_latents` images once: latent means and stds (B, 4, 8, 8) and captions."""
    means, stds, captions = [], [], []
    for _ in range(math.ceil(args.num_latents / 500)):
        x, caps = batch(rng, 500, args.p_two, args.device)
        d = vae.encode(x).latent_dist
        means.append(d.mean)
        stds.append(d.std)
        captions += caps
    return torch.cat(means)[: args.num_latents], torch.cat(stds)[: args.num_latents], captions[: args.num_latents]


@torch.no_grad()
def judge_model(pipe, args, seed: int = 1234) -> dict:
    """Share of samples judged right, for fresh single- and two-object prompts drawn from the world."""
    rng = np.random.default_rng(seed)
    neg = common.encode_prompts(pipe, [""])
    for name in ("alphas_cumprod", "final_alpha_cumprod"):  # the DDIM step indexes them on the device
        setattr(pipe.scheduler, name, getattr(pipe.scheduler, name).to(args.device))
    out = {}
    for kind, n_obj in (("single", 1), ("two", 2)):
        prompts = [world.caption(world.random_objects(rng, n_obj)) for _ in range(args.eval_images)]
        embeds = common.encode_prompts(pipe, prompts)
        g = torch.Generator(args.device).manual_seed(seed + n_obj)
        traj = common.sample(pipe, embeds, neg, num_steps=args.eval_steps, guidance=args.guidance, eta=1.0, generator=g)
        out[kind] = world.judge(traj.images, prompts).float().mean().item()
        out[kind + "_reward"] = world.reward(traj.images, prompts).mean().item()
    return out


def main(args: Args):
    check(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out, tmp = Path(args.out), staging(Path(args.out))  # every stage writes into tmp; out changes only at the end
    cli.exit_in_one_line(lambda: f"--out {out} is as it was; run again to start over (the staging folder {tmp.name} "
                                    f"is cleared then)")  # Ctrl-C, SIGTERM or a full disk: one line
    pipe = common.offline_pipeline(common.TINY, seed=0)  # its text encoder (frozen) and tokenizer are kept
    pipe.text_encoder.to(args.device)
    t_start = time.time()
    history = {"args": vars(args)}

    # 1-2. VAE
    if args.resume_vae:
        from diffusers import AutoencoderKL

        try:
            pipe.vae = AutoencoderKL.from_pretrained(args.resume_vae, subfolder="vae").to(args.device)
        except (OSError, ValueError, RuntimeError) as e:  # a damaged folder: one line, as for every flag
            raise SystemExit(f"world.pretrain: --resume-vae {args.resume_vae}: its vae/ does not load "
                             f"({cli.one_line(e, 100)}); give a folder this script wrote")
        pipe.vae.requires_grad_(False).eval()
    else:
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            pipe.vae = type(pipe.vae).from_config(pipe.vae.config).to(args.device)  # fresh init
        train_vae(pipe.vae, args, rng)
        pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    t_vae = time.time() - t_start
    if args.vae_only:
        publish(tmp, out)
        return
    means, stds, captions = encode_dataset(pipe.vae, args, np.random.default_rng((args.seed, 1)))  # its own stream
    scaling = 1.0 / means.std().item()
    pipe.vae.register_to_config(scaling_factor=scaling)
    log(f"VAE done in {t_vae:.0f} s; latent std {means.std().item():.3f} -> scaling_factor {scaling:.4f}")

    # 3. UNet
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        unet = type(pipe.unet).from_config(pipe.unet.config).to(args.device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    pipe.unet = ema
    sched = common.ddim_scheduler()
    alphas = sched.alphas_cumprod.to(args.device)
    with torch.no_grad():
        caption_embeds = {}
        for i in range(0, len(captions), 1000):  # each distinct caption once
            chunk = sorted(set(captions[i : i + 1000]) - set(caption_embeds))
            if chunk:
                caption_embeds.update(zip(chunk, common.encode_prompts(pipe, chunk)))
        empty = common.encode_prompts(pipe, [""])[0]
    means, stds = means.cpu(), stds.cpu()  # the draws below stay on the CPU generator, whatever the device
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(args.seed)
    t0, losses = time.time(), []
    history["unet"], history["judged"] = [], []
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = unet_lr(step, args)
        idx = torch.randint(len(captions), (args.unet_batch,), generator=g)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        drop = torch.rand(args.unet_batch, generator=g) < args.caption_dropout
        cond = torch.stack([empty if d else caption_embeds[captions[i]] for i, d in zip(idx.tolist(), drop.tolist())])
        t = torch.randint(sched.config.num_train_timesteps, (args.unet_batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        z0, noise, t = z0.to(args.device), noise.to(args.device), t.to(args.device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.detach())  # no host sync per step
        if (step + 1) % 100 == 0:
            mean_loss = torch.stack(losses[-100:]).mean().item()
            log(f"unet {step + 1:5d}/{args.unet_steps} loss {mean_loss:.4f} ({time.time() - t0:.0f} s)")
            history["unet"].append({"step": step + 1, "loss": mean_loss, "seconds": time.time() - t0})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.unet_steps:
            scores = judge_model(pipe, args)
            history["judged"].append({"step": step + 1, **scores})
            log(f"judged at {step + 1}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")
            ema.save_pretrained(tmp / "snapshots" / f"unet_{step + 1:05d}", safe_serialization=True)

    scores = judge_model(pipe, args)
    seconds = time.time() - t_start
    history.update(final=scores, seconds=seconds, vae_seconds=t_vae)
    log(f"final ({seconds / 60:.1f} min in all): {json.dumps({k: round(v, 3) for k, v in scores.items()})}")
    pipe.scheduler = sched
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretrain_log.json").write_text(json.dumps(history, indent=1))
    publish(tmp, out)
    log(f"saved to {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
