# LOOP: leave-one-out PPO (Gupta et al. 2025, arXiv 2503.00897), derived from ppo.py: diff ppo.py loop.py
"""LOOP: PPO for diffusion (ppo.py) with REINFORCE's leave-one-out baseline instead of per-prompt statistics.

K trajectories per prompt; each image's advantage is its reward minus the mean reward of the other K - 1 images
of its prompt, computed after rewards are gathered across processes. No value network, no running statistics.
Everything else is ppo.py's; lines that differ from it are marked `# LOOP`.

    python loop.py --k 4 --clip 1e-4                                # SD 1.5, JPEG compressibility, GPU
    python loop.py --model tiny --reward color --prompts colors --num-steps 10 --learning-rate 3e-2
    torchrun --nproc_per_node 8 loop.py --k 4 --reward aesthetic --prompts simple_animals
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

import cli
import common
import rewards
import runs


# Sampling defaults on SD 1.x/2.x; an SD 3.x model takes Flow-GRPO's (cli.FLOW_DEFAULTS)
SD_DEFAULTS = dict(num_steps=50, eta=1.0, guidance=5.0)


@dataclass
class Args:
    # --- experiment
    exp_name: str = Path(__file__).stem
    """the name of this experiment (the run folder is runs/{exp_name}__{seed}__{time} unless --run-name)"""
    run_name: Optional[str] = None
    """run folder name under --output-dir (default: {exp_name}__{seed}__{unix time})"""
    output_dir: str = "runs"
    """where run folders (TensorBoard events, images, checkpoints) are written"""
    seed: int = 42
    """seed of every random draw (prompts, noise, shuffles): runs are reproducible and resumable"""
    num_epochs: int = 100
    """epochs of sampling then training"""
    save_every: int = 20
    """save a checkpoint every this many epochs (and at the end); 0 saves only at the end"""
    image_every: int = 10
    """log an image grid of fixed evaluation prompts every this many epochs (and before and after training)"""
    eval_num_steps: Optional[tuple[int, ...]] = None
    """step counts evaluated besides --num-steps, with the same prompts and noise (robustness to the discretisation;
    unset: 25 and 100 on SD 1.x/2.x, Flow-GRPO's 40 on SD 3.x; given with no value: only --num-steps)"""
    eval_eta: Optional[float] = None
    """the evaluation sampler's --eta (unset: --eta itself on SD 1.x/2.x, the training sampler; 0 on SD 3.x, the
    deterministic ODE, as Flow-GRPO evaluates; give --eta's value to evaluate SD 3.x's training sampler instead)"""
    resume: Optional[str] = None
    """a checkpoint folder, or a run folder to resume from its newest checkpoint"""
    fork: bool = False
    """with --resume: let the experiment's flags (reward, prompts, seed, sizes, the algorithm's settings) differ from
    the checkpoint's, branching into a new run folder; without it a resume refuses any change to them"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project: str = "diffusion-rl"
    """the wandb project with --track"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda if available; under torchrun one GPU per process)"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """frozen weights and activations in this dtype; trainable weights stay float32 (auto: fp16 on GPU, as
    the reference; docs/performance.md)"""
    gradient_checkpointing: bool = False
    """recompute UNet activations in the backward pass: less memory, ~30% slower"""
    compile: bool = False
    """torch.compile the UNet"""
    # --- model and sampler
    model: str = common.SD15
    """hub id or local diffusers folder (SD 1.x/2.x, or SD 3.x: docs/flow.md); offline: `shapes` (the pretrained shapes
    world, CPU demos), `tiny` or `tiny-sd3` (random, tests)"""
    lora_rank: int = 4
    """LoRA rank on the UNet attention projections; 0 trains the whole UNet"""
    lora_alpha: Optional[float] = None
    """LoRA alpha (default: the rank, i.e. scale 1)"""
    num_steps: Optional[int] = None
    """sampling steps T per trajectory (unset: SD_DEFAULTS above on SD 1.x/2.x, 10 on SD 3.x)"""
    eta: Optional[float] = None
    """DDIM eta: 1 is the stochastic (DDPM-like) policy; must be > 0 for log-probabilities. On an SD 3.x model, the
    noise level a of Flow-GRPO's SDE (docs/flow.md). Unset: SD_DEFAULTS above on SD 1.x/2.x, 0.7 on SD 3.x"""
    guidance: Optional[float] = None
    """classifier-free guidance scale w, in sampling and training (unset: SD_DEFAULTS above on SD 1.x/2.x, 4.5 on
    SD 3.x)"""
    resolution: Optional[int] = None
    """image side in pixels for sampling and evaluation, a multiple of the VAE's 8 (times the patch size, 2, on SD 3.x)
    (unset: the model's native size on SD 1.x/2.x, e.g. 512 for SD 1.5; on SD 3.x Flow-GRPO's 512, or the native size
    where smaller)"""
    sample_batch_size: int = 8
    """images per sampling call per process"""
    num_batches_per_epoch: int = 4
    """sampling calls per epoch per process"""
    # --- reward and prompts
    reward: str = "jpeg_compressibility"
    """a reward, or a weighted sum NAME:WEIGHT,... (a bare NAME weighs 1): jpeg_compressibility, jpeg_incompressibility,
    shapes (offline, compositional, with --prompts shapes), color (offline toy, with --prompts colors), aesthetic,
    pickscore, hpsv2, imagereward, clipscore, blip_vqa"""
    reward_weights: Optional[str] = None
    """local weights of learned rewards, NAME=PATH,... (default: each from the hub; the README says what PATH is)"""
    prompts: str = "simple_animals"
    """a prompt set in prompts/ (simple_animals, animals_activities, dpok_single, shapes, colors, or a NAME.txt added
    there); evaluation uses its held-out NAME_eval.txt where one exists"""
    prompt_file: Optional[str] = None
    """a text file with one prompt per line (overrides --prompts)"""
    # --- algorithm
    k: int = 4  # LOOP
    """images per prompt in a sampling batch: the leave-one-out group (at least 2)"""
    learning_rate: float = 3e-4
    """AdamW learning rate"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    train_batch_size: int = 4
    """trajectories per training minibatch per process"""
    gradient_accumulation_steps: int = 2
    """minibatches per optimiser step (each contributes all its trained timesteps)"""
    num_inner_epochs: int = 1
    """passes over each epoch's samples"""
    timestep_fraction: Optional[float] = None
    """train on this fraction of each trajectory's steps: on SD 1.x/2.x a random subset per trajectory (DDPO; unset: 1);
    on SD 3.x the first int(fraction x T) steps, as Flow-GRPO (unset: its 0.99, so the last step is not trained)"""
    timesteps_per_call: Optional[int] = None
    """trained timesteps of each trajectory evaluated in one UNet call (default: all on a CPU, where one large call is
    faster; 1 on a GPU, the reference's loop and memory); any value gives the same gradient up to float rounding"""
    clip: float = 1e-4
    """PPO clip range epsilon on the per-step ratio"""
    normalize_advantages: bool = False  # LOOP
    """also divide each group's advantages by the std of its K rewards (+1e-6); whether the paper does is not known"""


def leave_one_out_advantages(rewards: torch.Tensor, k: int, normalize: bool = False) -> torch.Tensor:  # LOOP
    """A_i = r_i - 1/(K-1) sum_{j != i} r_j over consecutive groups of K images of the same prompt,
    optionally divided by the group's reward std (population std, +1e-6)."""
    groups = rewards.view(-1, k)
    advantages = groups - (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    if normalize:
        advantages = advantages / (groups.std(dim=1, correction=0, keepdim=True) + 1e-6)
    return advantages.flatten()


def policy_loss(log_prob, old_log_prob, advantages, clip: float):
    """PPO's clipped surrogate per step: mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))),
    rho = exp(log pi_theta - log pi_old). Returns (loss, approx_kl, clipfrac), DDPO's diagnostics:
    approx_kl = mean((log pi_theta - log pi_old)^2) / 2, clipfrac = mean(|rho - 1| > eps)."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, approx_kl.detach(), clipfrac


if __name__ == "__main__":
    args = tyro.cli(Args)
    # the family's defaults for the unset flags, every shared flag's range: before anything loads
    runs.validate_args(args, SD_DEFAULTS)
    dist = runs.setup_distributed(args.device)
    device, is_main = dist.device, dist.is_main
    precision = common.resolve_precision(args.mixed_precision, device)
    samples_per_process = args.sample_batch_size * args.num_batches_per_epoch
    images_per_epoch = samples_per_process * dist.world_size
    minibatches = samples_per_process // args.train_batch_size
    steps_per_epoch = minibatches // args.gradient_accumulation_steps * args.num_inner_epochs
    num_train_timesteps = max(1, int(args.num_steps * args.timestep_fraction))
    timesteps_per_update = args.gradient_accumulation_steps * num_train_timesteps
    # trained timesteps of a trajectory in one UNet call
    steps_per_call = common.timesteps_per_call(args.timesteps_per_call, num_train_timesteps, device)
    if args.k < 2:  # LOOP
        cli.fail(f"--k {args.k}: LOOP needs at least two images per prompt for a leave-one-out "
                 f"baseline; use --k 2 or more")
    if samples_per_process % (args.train_batch_size * args.gradient_accumulation_steps):
        cli.fail(f"{samples_per_process} samples per process (--sample-batch-size x "
                 f"--num-batches-per-epoch) must divide into --train-batch-size "
                 f"{args.train_batch_size} x --gradient-accumulation-steps "
                 f"{args.gradient_accumulation_steps}")
    runs.print0(f"{images_per_epoch} images per epoch ({dist.world_size} processes x "
                f"{args.num_batches_per_epoch} batches x {args.sample_batch_size}), "
                f"{steps_per_epoch} optimiser steps per epoch, "
                f"{num_train_timesteps} trained timesteps per trajectory", enabled=is_main)

    run = runs.start(args, Path(__file__).stem, dist)  # what to resume and where to write, checked
    checkpoint, run_dir = run.checkpoint, run.dir
    common.speed_flags(device)
    torch.manual_seed(args.seed)

    prompts = common.load_prompts(args.prompts, args.prompt_file)
    eval_prompts = common.load_eval_prompts(args.prompts, args.prompt_file)  # fixed, as its noise
    # the prompts are checked against the reward before it loads
    reward_fn = rewards.make(args.reward, device, args.reward_weights, prompts + eval_prompts)
    reward_fn = runs.CheckedReward(reward_fn, args.reward)
    pipe = common.load_pipeline(
        args.model, device=device, mixed_precision=precision, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile, seed=args.seed, resolution=args.resolution)
    denoiser = common.denoiser(pipe)  # the UNet (SD 1.x/2.x), or the transformer (SD 3.x)
    neg_embeds = common.encode_prompts(pipe, [""])  # (1, 77, D): the empty prompt, encoded once
    params = common.trainable_parameters(denoiser)
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay, eps=args.adam_epsilon, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    sample_kw = dict(num_steps=args.num_steps, guidance=args.guidance, eta=args.eta)
    start_epoch, global_step, reward_curve = 0, 0, []  # LOOP
    eval_before = {}  # mean eval reward per step count before training: the gains' reference
    if checkpoint:
        state = runs.load_checkpoint(checkpoint, denoiser)
        runs.load_optimizer(optimizer, state["optimizer"])  # with this run's --learning-rate
        runs.load_scaler(scaler, state["scaler"])  # if both runs use fp16's scaler
        start_epoch, global_step = state["epoch"], state["global_step"]
        reward_curve = state["reward_curve"]  # LOOP
        eval_before = state["eval_before"]
        runs.print0(f"resumed from {checkpoint} at epoch {start_epoch}", enabled=is_main)
    # the run folder is created only now that the model and any checkpoint have loaded
    logger = runs.Logger(run_dir, vars(args), enabled=is_main, track=args.track,
                         project=args.wandb_project)
    # the same prompts and noise at every evaluation, so that its images and rewards compare
    evaluate = runs.Evaluation(args, pipe, eval_prompts, reward_fn, neg_embeds, precision,
                               logger, run_dir, eval_before, enabled=is_main)

    if start_epoch == 0 and args.image_every > 0:
        evaluate(0, "before")
    bar = runs.progress(range(start_epoch, args.num_epochs), enabled=is_main, desc="epochs",
                        initial=start_epoch, total=args.num_epochs)
    for epoch in bar:
        t0 = time.time()
        # SAMPLING
        # Prompts for the whole (global) epoch from one seeded draw, K consecutive images per
        # prompt; this process takes its slice, so the samples do not depend on how many
        # processes share them.
        rng = common.generator("cpu", args.seed, epoch, common.Stream.PROMPTS)
        all_prompt_ids = torch.randint(len(prompts), (images_per_epoch // args.k,), generator=rng)
        all_prompt_ids = all_prompt_ids.repeat_interleave(args.k)
        first = dist.rank * samples_per_process
        denoiser.eval()
        batches = []
        for b in runs.progress(range(args.num_batches_per_epoch), enabled=is_main,
                               desc="sampling", leave=False):
            lo = first + b * args.sample_batch_size
            ids = all_prompt_ids[lo : lo + args.sample_batch_size].tolist()
            texts = [prompts[i] for i in ids]
            embeds = common.encode_prompts(pipe, texts)  # (B, 77, D)
            rngs = common.sample_generators(args.seed, epoch, range(lo, lo + len(ids)), device)
            with common.autocast(device, precision):
                traj = common.sample(pipe, embeds, neg_embeds, **sample_kw, generator=rngs)
            # (B,) the weighted sum, (B, C) its terms
            rewards, reward_terms = reward_fn(traj.images, texts, components=True)
            batches.append(dict(latents=traj.latents, log_probs=traj.log_probs, embeds=embeds,
                                rewards=rewards, reward_terms=reward_terms))
        samples = {key: torch.cat([s[key] for s in batches]) for key in batches[0]}
        timesteps = traj.timesteps  # (T,), the same grid for every trajectory

        # REWARDS AND ADVANTAGES
        rewards = runs.gather(samples["rewards"])  # (images_per_epoch,), in global sample order
        reward_fn.check(rewards, epoch, run)  # one line if an image or a reward is not finite
        # LOOP: the groups are whole: the rewards are gathered first
        advantages = leave_one_out_advantages(rewards, args.k, args.normalize_advantages)
        samples["advantages"] = advantages[first : first + samples_per_process]  # LOOP
        reward_curve.append(rewards.mean().item())

        # TRAINING
        denoiser.train()
        info = {"policy_loss": [], "approx_kl": [], "clipfrac": []}
        ratio_dev = []  # |rho - 1| before the epoch's first optimiser step: ~0 (on-policy check)
        for inner in range(args.num_inner_epochs):
            rng = common.generator(device, args.seed, epoch, common.Stream.SHUFFLE, inner,
                                   dist.rank)
            perm = torch.randperm(samples_per_process, generator=rng, device=device)
            # (N, T_train) step indices: each trajectory's own random subset (SD 1.x/2.x), or the
            # first ones (SD 3.x)
            step_perm = common.trained_steps(pipe, samples_per_process, args.num_steps,
                                             num_train_timesteps, rng, device)
            for m in runs.progress(range(minibatches), enabled=is_main, desc="training",
                                   leave=False):
                idx = perm[m * args.train_batch_size : (m + 1) * args.train_batch_size]
                steps = step_perm[idx]  # (b, T_train)
                rows = idx[:, None]
                latents = samples["latents"][rows, steps]
                next_latents = samples["latents"][rows, steps + 1]
                old_log_probs = samples["log_probs"][rows, steps]
                adv, embeds = samples["advantages"][idx], samples["embeds"][idx]
                for j in range(0, num_train_timesteps, steps_per_call):
                    window = slice(j, j + steps_per_call)  # trained steps in one UNet call
                    with common.autocast(device, precision):  # (b, n): n steps per trajectory
                        log_prob, _ = common.step_log_prob(
                            pipe, latents[:, window], next_latents[:, window],
                            timesteps[steps[:, window]], embeds, neg_embeds, **sample_kw)
                    n, old = log_prob.shape[1], old_log_probs[:, window]
                    loss, approx_kl, clipfrac = policy_loss(log_prob, old, adv[:, None], args.clip)
                    scaler.scale(loss * n / timesteps_per_update).backward()
                    info["policy_loss"].append(loss.detach().expand(n))  # weighted by its steps
                    info["approx_kl"].append(approx_kl.expand(n))
                    info["clipfrac"].append(clipfrac.expand(n))
                    if inner == 0 and m < args.gradient_accumulation_steps:
                        ratio_dev.append((torch.exp(log_prob.detach() - old) - 1).abs().flatten())
                if (m + 1) % args.gradient_accumulation_steps == 0:
                    runs.average_gradients(params)
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    if run.step_ok(grad_norm, scaler, epoch):  # a non-finite gradient: skipped
                        scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1

        # LOGGING AND CHECKPOINTS
        metrics = {f"losses/{k}": torch.cat(v).mean() for k, v in info.items()}
        metrics.update({
            "charts/reward_mean": rewards.mean(), "charts/reward_std": rewards.std(correction=0),
            "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/grad_norm": grad_norm,
            "charts/images_per_sec": images_per_epoch / (time.time() - t0), "charts/epoch": epoch,
            "debug/ratio_dev_at_start": torch.cat(ratio_dev).mean(),
            "debug/skipped_steps": run.skipped_steps})
        # (C,): each reward term's mean, unweighted
        reward_terms = runs.gather(samples["reward_terms"]).mean(0)
        metrics.update({f"rewards/{name}": t for name, t in zip(reward_fn.names, reward_terms)})
        logger.scalars(metrics, global_step)
        # warns once per run if above clip/10
        run.check_on_policy(metrics["debug/ratio_dev_at_start"], args.clip, epoch)
        bar.set_postfix(reward=f"{reward_curve[-1]:.4f}", kl=f"{metrics['losses/approx_kl']:.2e}")
        last = epoch + 1 == args.num_epochs
        if args.image_every > 0 and ((epoch + 1) % args.image_every == 0 or last):
            evaluate(global_step, "after" if last else f"epoch_{epoch + 1:04d}")
        if (args.save_every > 0 and (epoch + 1) % args.save_every == 0) or last:
            if is_main:
                run.save(epoch + 1, denoiser, {  # only finite weights; the state records the run
                    "epoch": epoch + 1, "global_step": global_step,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "reward_curve": reward_curve, "eval_before": eval_before})  # LOOP
                runs.plot_curve(reward_curve, run_dir / "reward_curve.png",
                                title="mean reward per epoch")
    if is_main and reward_curve:
        runs.print0(f"mean reward: first epoch {reward_curve[0]:.4f}, "
                    f"last epoch {reward_curve[-1]:.4f}; outputs in {run_dir}")
    logger.close()
