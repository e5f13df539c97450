"""Pretrain the shapes world's flow-matching model on a CPU: `python -m world.pretrain_flow` (docs/world.md).

The SD 3.x counterpart of `world.pretrain`: the same world, the same VAE, in Stable Diffusion 3's classes, so every
script loads it through the flow path (`--model shapes-flow`, or `--model world/shapes_flow` as a folder) and
`StableDiffusion3Pipeline.from_pretrained` loads it too.

  - VAE: the committed shapes model's (`world/shapes/vae`, 32x32x3 <-> 4x8x8), with SD3's latent normalisation:
    `shift_factor` = the latents' mean and `scaling_factor` = 1 / their std, measured on the training pool.
  - Text: the two random, frozen 32-wide CLIP encoders of `tiny-sd3` (pooled outputs concatenated: 64), no T5, and
    the CLIP tokenizer cut to 16 tokens (the longest caption is 9); both encoders are stored in float16.
  - SD3Transformer2DModel: patches of 1 on the 8x8 latent (64 image tokens), `--layers` joint blocks of
    `--heads` x 16 channels, trained by rectified flow (Esser et al. 2024, SD3 section 2): x_s = (1 - s) x0 + s eps,
    target v = eps - x0, s drawn logit-normal(0, 1) (SD3's best-ranked sampler), timestep s x 1000; 10% empty
    captions for classifier-free guidance, an EMA of the weights (the saved ones).
  - Scheduler: FlowMatchEulerDiscreteScheduler with shift `--shift` (1: an 8x8 latent needs none of SD3's
    high-resolution shift).

    python -m world.pretrain_flow                                 # the committed recipe into runs/shapes_flow_model
    python -m world.pretrain_flow --out world/shapes_flow --overwrite   # remake the committed model in place
    python -m world.pretrain_flow --out /tmp/f --steps 200 --num-latents 2000   # smoke test

As in `world.pretrain`, nothing is written to `--out` until the model is complete (a `.NAME.partial` folder beside
it is renamed into place), and a `--out` that holds files is replaced only with `--overwrite`.
"""

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tyro

import cli
import common
import world
from world.pretrain import check_out_and_device, log, publish, staging

FLOW_MODEL_DIR = Path(__file__).resolve().parent / "shapes_flow"
TOKENS = 16  # CLIP tokens per caption: "a magenta triangle and a yellow circle" is 9 with the start and end tokens


@dataclass
class Args:
    out: str = "runs/shapes_flow_model"
    """the diffusers folder to write, when the run is complete (world/shapes_flow is the committed model:
    --overwrite)"""
    overwrite: bool = False
    """replace --out if it already holds files (the committed model included)"""
    vae: str = str(world.MODEL_DIR)
    """the diffusers folder whose vae/ is taken (frozen): the committed SD shapes model's by default"""
    seed: int = 0
    """seed of the data, the weights' initialisation and the training order"""
    threads: int = 2
    """torch CPU threads"""
    device: str = "cpu"
    """where to train (the committed model was trained on the CPU; other devices give other weights)"""
    layers: int = 6
    """joint transformer blocks (the last one, as in every SD3, without the text stream's output)"""
    heads: int = 6
    """attention heads of 16 channels (the model's width is 16 x heads)"""
    steps: int = 3000
    """training steps"""
    batch: int = 64
    """batch size"""
    lr: float = 2e-3
    """AdamW learning rate (linear warm-up over 200 steps, constant, then a cosine to 10% over the last `decay`)"""
    decay: float = 0.3
    """share of the steps, at the end, over which the learning rate falls to 10%"""
    ema: float = 0.998
    """EMA decay of the weights (the EMA weights are the ones saved)"""
    shift: float = 1.0
    """the flow scheduler's shift (SD3: 3.0 at 1024 px)"""
    num_latents: int = 20000
    """images rendered and encoded once"""
    p_two: float = 0.5
    """share of two-object images in the data"""
    caption_dropout: float = 0.1
    """share of empty captions (classifier-free guidance)"""
    eval_images: int = 96
    """images per kind (single, two objects) in the final judgement"""
    guidance: float = 4.5
    """classifier-free guidance scale of the judgement's samples (Flow-GRPO's for SD 3.5)"""
    eval_steps: int = 10
    """sampling steps of the judgement (Flow-GRPO's for SD 3.5)"""
    noise_level: float = 0.7
    """Flow-GRPO's SDE noise level of the judgement's samples (0: the ODE)"""


def check(args: Args):
    """One-line errors for flags out of range, before anything loads or trains."""
    def need(ok: bool, msg: str):
        if not ok:
            raise SystemExit(f"world.pretrain_flow: {msg}")
    for name in ("layers", "heads", "steps", "batch", "num_latents", "eval_images", "eval_steps", "threads"):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    need(args.layers >= 2, f"--layers {args.layers}: SD3's last block has no text output, so at least 2 are needed")
    for name in ("lr", "shift"):
        need(0 < getattr(args, name) < math.inf, f"--{name} must be a positive number (got {getattr(args, name)})")
    need(0 <= args.decay <= 1 and 0 <= args.ema < 1, f"--decay must be in [0, 1] and --ema in [0, 1) (got "
         f"{args.decay}, {args.ema})")
    need(0 <= args.p_two <= 1 and 0 <= args.caption_dropout < 1,
         f"--p-two must be in [0, 1] and --caption-dropout in [0, 1) (got {args.p_two}, {args.caption_dropout})")
    need(args.guidance >= 1 and 0 <= args.noise_level < math.inf, f"--guidance must be at least 1 and --noise-level 0 "
         f"or more (got {args.guidance}, {args.noise_level})")
    vae = Path(args.vae) / "vae"
    need((vae / "config.json").is_file() and any(vae.glob("diffusion_pytorch_model.*")),
         f"--vae {args.vae}: no complete vae/ folder there (config.json and weights; give a diffusers model folder)")
    need(not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: torch sees no CUDA GPU on this machine; use --device cpu")
    out = Path(args.out)
    need(not out.exists() or out.is_dir(), f"--out {out} is a file; give a folder")
    check_out_and_device(args, out, need)
    need(not (out.is_dir() and any(out.iterdir())) or args.overwrite,
         f"--out {out} already holds files{' (the committed model)' if out.resolve() == FLOW_MODEL_DIR else ''}; "
         f"add --overwrite to replace it when the new model is complete, or choose another --out")


def build(args: Args):
    """The untrained StableDiffusion3Pipeline: tiny-sd3's text encoders, the shapes VAE, a fresh transformer."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    text = common.offline_pipeline(common.TINY_SD3, seed=0)
    tokenizer = copy.deepcopy(text.tokenizer)
    tokenizer.model_max_length = TOKENS
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae").requires_grad_(False).eval()
    width = text.text_encoder.config.hidden_size + text.text_encoder_2.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        transformer = SD3Transformer2DModel(
            sample_size=vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1), patch_size=1,
            in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels, num_layers=args.layers,
            attention_head_dim=16, num_attention_heads=args.heads, joint_attention_dim=width,
            caption_projection_dim=16 * args.heads, pooled_projection_dim=width, pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift), vae=vae,
        text_encoder=text.text_encoder, tokenizer=tokenizer, text_encoder_2=text.text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def lr_at(step: int, args: Args) -> float:
    """Linear warm-up over 200 steps, constant, then a cosine to 10% over the last `decay` share of the steps."""
    lr = args.lr * min(1.0, (step + 1) / 200)
    start = args.steps * (1 - args.decay)
    if step >= start:
        lr *= 0.1 + 0.45 * (1 + math.cos(math.pi * (step - start) / max(args.steps - start, 1)))
    return lr


@torch.no_grad()
def judge_model(pipe, args: Args, seed: int = 1234) -> dict:
    """Share of samples judged right and mean reward, for fresh single- and two-object prompts from the world."""
    rng = np.random.default_rng(seed)
    neg = common.encode_prompts(pipe, [""])
    out = {}
    for kind, n_obj in (("single", 1), ("two", 2)):
        prompts = [world.caption(world.random_objects(rng, n_obj)) for _ in range(args.eval_images)]
        g = torch.Generator(args.device).manual_seed(seed + n_obj)
        traj = common.sample(pipe, common.encode_prompts(pipe, prompts), neg, num_steps=args.eval_steps,
                             guidance=args.guidance, eta=args.noise_level, generator=g)
        out[kind] = world.judge(traj.images, prompts).float().mean().item()
        out[kind + "_reward"] = world.reward(traj.images, prompts).mean().item()
    return out


def main(args: Args):
    check(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, tmp = Path(args.out), staging(Path(args.out))
    cli.exit_in_one_line(lambda: f"--out {out} is as it was; run again to start over (the staging folder {tmp.name} "
                                    f"is cleared then)")
    t_start = time.time()
    pipe = build(args).to(args.device)
    rng = np.random.default_rng((args.seed, 1))
    with torch.no_grad():  # the pool: VAE posterior means and stds of rendered images, and their captions
        means, stds, captions = [], [], []
        for _ in range(math.ceil(args.num_latents / 500)):
            images, caps = world.render(rng, 500, args.p_two)
            d = pipe.vae.encode(torch.from_numpy(images).to(args.device) * 2 - 1).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
            captions += caps
        means, stds, captions = torch.cat(means)[: args.num_latents], torch.cat(stds)[: args.num_latents], \
            captions[: args.num_latents]
        shift, scaling = means.mean().item(), 1.0 / means.std().item()
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
        table = {c: e for c, e in zip(sorted(set(captions)), common.encode_prompts(pipe, sorted(set(captions))))}
        empty = common.encode_prompts(pipe, [""])[0]
    log(f"{len(captions)} latents, {len(table)} captions; shift_factor {shift:.4f}, scaling_factor {scaling:.4f}; "
        f"transformer {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f}M parameters")

    model = pipe.transformer.train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(args.seed)
    t0, losses, history = time.time(), [], {"args": vars(args), "loss": []}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        idx = torch.randint(len(captions), (args.batch,), generator=g)
        x0 = ((means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) - shift) * scaling
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        cond = torch.stack([empty if d else table[captions[i]] for i, d in zip(idx.tolist(), drop.tolist())])
        s = torch.sigmoid(torch.randn(args.batch, generator=g))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=g)
        x0, eps, s = x0.to(args.device), eps.to(args.device), s.to(args.device)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        hidden, pooled = common.unpack_flow_embeds(model, cond)
        v = model(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=hidden, pooled_projections=pooled).sample
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.detach())
        if (step + 1) % 100 == 0:
            mean_loss = torch.stack(losses[-100:]).mean().item()
            log(f"transformer {step + 1:5d}/{args.steps} loss {mean_loss:.4f} ({time.time() - t0:.0f} s)")
            history["loss"].append({"step": step + 1, "loss": mean_loss, "seconds": time.time() - t0})

    pipe.transformer = ema.half().float()  # the saved weights are float16 (the folder's 20 MB), judged as loaded
    scores = judge_model(pipe, args)
    seconds = time.time() - t_start
    history.update(final=scores, seconds=seconds)
    log(f"final ({seconds / 60:.1f} min in all): {json.dumps({k: round(v, 3) for k, v in scores.items()})}")
    pipe.text_encoder.half()
    pipe.text_encoder_2.half()  # frozen and random: float16 storage keeps the folder small; loading casts back
    pipe.transformer.half()  # exactly the judged weights (float16 to float32 and back is exact)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretrain_log.json").write_text(json.dumps(history, indent=1))
    publish(tmp, out)
    log(f"saved to {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
