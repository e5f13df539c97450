# Score as Action (arXiv 2502.01819), derived from ppo.py: diff ppo.py score_as_action.py
"""Score as Action: continuous-time RL for diffusion models (Zhao et al., ICML 2025), on ppo.py's sampler and loss.

The action is the score a = -eps_hat / sqrt(1 - alphabar_t) of the reverse SDE, whose discretisation is ppo.py's
DDIM(eta = 1) step. What changes is the advantage, per step: A_k = V(t_{k+1}, x_{k+1}) - V(t_k, x_k) (V after the
last step = the reward), standardised per timestep, with a value that uses the diffusion structure,
V(t, x_t, c) = cos(pi t / 2N) r(decode(x0_hat(t, x_t)), c) + sin(pi t / 2N) V_phi(x_t, t, c), V_phi a small network
fitted to the return. The KL to the pretrained model is a running reward, -(beta/2) ||s_theta - s_pre||^2
log(alphabar_{t_{k+1}} / alphabar_{t_k}) per step. The evaluation samples fixed prompts and noise with the training
step count and with others: the method claims robustness to the time discretisation. Defaults follow the authors'
code, hanyang1999/ContTimeRL4DM `ddpo_continuous/`. Lines that differ from ppo.py are marked `# SaA`.

    python score_as_action.py                                       # SD 1.5, JPEG compressibility, GPU
    python score_as_action.py --model tiny --reward color --prompts colors --num-steps 10 --learning-rate 3e-2
    torchrun --nproc_per_node 8 score_as_action.py --reward aesthetic --prompts simple_animals --beta 1e-4
"""

import math
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
SD_DEFAULTS = dict(num_steps=50, eta=1.0, guidance=7.0)  # SaA


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
    k: int = 1
    """images per prompt in a sampling batch"""
    learning_rate: float = 5e-5  # SaA
    """AdamW learning rate (the authors' 5e-5)"""
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
    clip: float = 1.5e-5  # SaA
    """PPO clip range epsilon on the per-step ratio (the authors' 1.5e-5)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max]"""
    beta: float = 0.0  # SaA
    """weight of the KL running reward -(beta/2) ||s_theta - s_pre||^2 log(alphabar_t' / alphabar_t); 0 turns it off"""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value network V_phi"""
    value_batch_size: int = 64
    """states (x_t, t, c) per V_phi minibatch"""
    value_epochs: int = 1
    """passes of V_phi over each epoch's states, made before that epoch's advantages are computed"""


def score_from_eps(eps, alphabar_t):  # SaA
    """The action: the score a = grad_x log p_t(x) = -eps_hat / sqrt(1 - alphabar_t) of an eps-prediction model.
    eps (B, ...), alphabar_t (B,)."""
    return -eps / (1 - alphabar_t).sqrt().view(-1, *[1] * (eps.ndim - 1))


def step_alphas(scheduler, t, num_steps: int):  # SaA
    """(alphabar_{t_k}, alphabar_{t_{k+1}}) of steps taken at timesteps t (B,), as common.ddim_step uses them:
    t_{k+1} = t_k - N // T, and the scheduler's final alphabar after the last step."""
    prev = t - scheduler.config.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod
    return alphas[t], torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod)


def kl_terms(score, score_pre, alphabar_t, alphabar_next, eta: float = 1.0):  # SaA
    """Per step: 1/2 ||s_theta - s_pre||^2 log(alphabar_{t_{k+1}} / alphabar_{t_k}), summed over latent dimensions.

    The Riemann sum of int 1/2 g^2 ||s_theta - s_pre||^2 dt, the KL between the path measures of the policy and the
    pretrained model (Girsanov); for the VP SDE g^2 dt = d log alphabar, positive towards t = 0, so each term is >= 0.
    eta != 1 scales it by ((1 + eta^2) / (2 eta))^2 as the authors' code does (1 at eta = 1). Returns (B,)."""
    factor = ((1 + eta**2) / (2 * eta)) ** 2
    return factor * 0.5 * (score - score_pre).pow(2).flatten(1).sum(1) * torch.log(alphabar_next / alphabar_t)


def structured_value(t, x0_reward, v_phi, num_train_timesteps: int = 1000):  # SaA
    """V(t, x_t, c) = cos(pi t / 2N) r(decode(x0_hat(t, x_t)), c) + sin(pi t / 2N) V_phi(x_t, t, c): near t = 0 the
    reward of the denoised image, at high noise the learned term."""
    angle = math.pi * t.float() / (2 * num_train_timesteps)
    return torch.cos(angle) * x0_reward + torch.sin(angle) * v_phi


def returns_to_go(rewards, running_rewards):  # SaA
    """G_k = r + sum_{j >= k} rr_j, V_phi's regression target for state k (the final reward when beta = 0).
    rewards (N,), running_rewards (N, T) -> (N, T)."""
    return rewards[:, None] + running_rewards.flip(1).cumsum(1).flip(1)


def step_advantages(values, rewards, running_rewards):  # SaA
    """A_k = rr_k + V(t_{k+1}, x_{k+1}) - V(t_k, x_k), with V after the last step = the final reward r, so that
    sum_k A_k = r + sum_k rr_k - V(t_0, x_T). values (N, T) of the states x_{t_k}, rewards (N,) -> (N, T)."""
    next_values = torch.cat([values[:, 1:], rewards[:, None]], dim=1)
    return running_rewards + next_values - values


def standardise_per_timestep(advantages):  # SaA
    """(A - mean) / (std + 1e-6) of each timestep (column) over the batch."""
    return (advantages - advantages.mean(0)) / (advantages.std(0, correction=0) + 1e-6)


class ValueNet(torch.nn.Module):  # SaA
    """V_phi(x_t, t, c) for any black-box reward: a strided conv encoder of the latent, Fourier features of t / N and
    the token-averaged prompt embedding, then an MLP. The last layer starts at zero (V starts as the x0_hat term)."""

    def __init__(self, channels: int, embed_dim: int, width: int = 64, hidden: int = 256, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs), persistent=False)
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, stride=2, padding=1), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(width + embed_dim + 2 * freqs, hidden), torch.nn.SiLU(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
        torch.nn.init.zeros_(self.head[-1].weight)
        torch.nn.init.zeros_(self.head[-1].bias)

    def forward(self, latents, t, embeds, num_train_timesteps: int = 1000):
        angle = t.float()[:, None] / num_train_timesteps * self.freqs  # (B, freqs)
        features = [self.encoder(latents.float()), embeds.float().mean(1), angle.sin(), angle.cos()]
        return self.head(torch.cat(features, dim=1)).squeeze(-1)


def state_values(value_net, samples: dict, timesteps, horizon: int, flat):  # SaA
    """The structured value V(t_k, x_{t_k}, c) of the epoch's states with flat indices n * T + k (`structured_value`
    of V_phi's output): samples["latents"] (N, T+1, ...), samples["x0_rewards"] (N, T), timesteps (T,)."""
    rows, steps = flat // len(timesteps), flat % len(timesteps)
    v_phi = value_net(samples["latents"][rows, steps], timesteps[steps], samples["embeds"][rows], horizon)
    return structured_value(timesteps[steps], samples["x0_rewards"][rows, steps], v_phi, horizon)


# The SHUFFLE stream's key of V_phi's fit, beside the policy's inner epochs 0, 1, ...
VALUE_FIT = -1
# V_phi's gradient-norm clip, its own and not the policy's --max-grad-norm: the reference clips the value step at
# config.pretrain_VN.max_grad_norm (hanyang1999/ContTimeRL4DM ddpo_continuous/scripts/train_with_valuefunc.py;
# 1.0 in config/dgx_with_value_func.py). DPOK's reference does not clip its value step, nor does dpok.py.
VALUE_MAX_GRAD_NORM = 1.0


def fit_value(value_net, value_optimizer, samples, timesteps, targets, horizon: int, *, epochs: int, batch_size: int,
              generator) -> list:  # SaA
    """V_phi's fit on the epoch's own N T states, before their advantages (as the reference fits V_phi before the
    policy in each epoch): `epochs` passes in minibatches of `batch_size` states, shuffled by `generator`; the MSE of
    the structured value to the reward-to-go `targets` (N, T); gradients averaged across processes; one AdamW step
    per minibatch, the gradient clipped to VALUE_MAX_GRAD_NORM (the reference's). Returns the losses, each before its
    step."""
    params, losses = list(value_net.parameters()), []
    for _ in range(epochs):
        order = torch.randperm(targets.numel(), generator=generator, device=targets.device)
        for flat in order.split(batch_size):
            loss = (state_values(value_net, samples, timesteps, horizon, flat) - targets.flatten()[flat]).pow(2).mean()
            loss.backward()
            runs.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, VALUE_MAX_GRAD_NORM)
            value_optimizer.step()
            value_optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    return losses


@torch.no_grad()
def denoised_rewards(pipe, reward_fn, pred_x0, texts, per_call: int):  # SaA
    """r(decode(x0_hat), c) of every state of B trajectories, pred_x0 (B, T, C, h, w) -> (B, T), in calls of
    `per_call`."""
    b, num_steps = pred_x0.shape[:2]
    flat, flat_texts = pred_x0.flatten(0, 1), [text for text in texts for _ in range(num_steps)]
    return torch.cat([reward_fn(common.decode_latents(pipe, flat[i : i + per_call]), flat_texts[i : i + per_call])
                      for i in range(0, len(flat), per_call)]).view(b, num_steps)


@torch.no_grad()
def sampled_kl(pipe, latents, timesteps, embeds, neg_embeds, *, num_steps, guidance, eta, per_call: int):  # SaA
    """kl_terms of every state x_{t_k} of B trajectories, latents (B, T+1, ...) -> (B, T): s_theta and s_pre (the
    same UNet with LoRA disabled) both CFG-guided with the same w, in UNet calls of `per_call` states. On a flow model
    (SD 3.x) each step's exact Gaussian KL, summed over dimensions: w_t |v_theta - v_pre|^2 (docs/flow.md)."""
    b = latents.shape[0]
    x, t = latents[:, :-1].flatten(0, 1), timesteps.repeat(b)  # (B*T, C, h, w), (B*T,)
    c = embeds.repeat_interleave(len(timesteps), dim=0)
    out = []
    for i in range(0, len(x), per_call):
        xi, ti, ci = x[i : i + per_call], t[i : i + per_call], c[i : i + per_call]
        if common.is_flow(pipe):
            v = common.guided_output(pipe, xi, ti, ci, neg_embeds, guidance)
            with common.adapters_disabled(pipe.transformer):
                v_pre = common.guided_output(pipe, xi, ti, ci, neg_embeds, guidance)
            weight = common.flow_kl_weight(pipe, ti, num_steps=num_steps, eta=eta)
            out.append(weight * (v - v_pre).pow(2).flatten(1).sum(1))
            continue
        alphabar_t, alphabar_next = step_alphas(pipe.scheduler, ti, num_steps)
        eps = common.guided_eps(pipe, xi, ti, ci, neg_embeds, guidance)
        with common.adapters_disabled(pipe.unet):
            eps_pre = common.guided_eps(pipe, xi, ti, ci, neg_embeds, guidance)
        score, score_pre = score_from_eps(eps, alphabar_t), score_from_eps(eps_pre, alphabar_t)
        out.append(kl_terms(score, score_pre, alphabar_t, alphabar_next, eta))
    return torch.cat(out).view(b, len(timesteps))


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
    if samples_per_process % (args.train_batch_size * args.gradient_accumulation_steps):
        cli.fail(f"{samples_per_process} samples per process (--sample-batch-size x "
                 f"--num-batches-per-epoch) must divide into --train-batch-size "
                 f"{args.train_batch_size} x --gradient-accumulation-steps "
                 f"{args.gradient_accumulation_steps}")
    if args.beta < 0 or (args.beta > 0 and args.lora_rank == 0):  # SaA
        cli.fail(f"--beta {args.beta}: must be >= 0, and > 0 needs LoRA (--lora-rank > 0) to "
                 f"disable for s_pre")
    if args.value_batch_size < 1 or args.value_epochs < 0:  # SaA
        cli.fail("--value-batch-size must be >= 1 and --value-epochs >= 0")
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
    with torch.random.fork_rng(devices=[]):  # SaA: V_phi, the same initial weights on every process
        torch.manual_seed(args.seed)
        value_net = ValueNet(denoiser.config.in_channels, neg_embeds.shape[-1]).to(device)
    value_optimizer = torch.optim.AdamW(value_net.parameters(), lr=args.value_learning_rate)
    horizon = pipe.scheduler.config.num_train_timesteps  # N of the structured value (1000)
    sample_kw = dict(num_steps=args.num_steps, guidance=args.guidance, eta=args.eta)
    start_epoch, global_step, reward_curve = 0, 0, []  # SaA
    eval_before = {}  # mean eval reward per step count before training: the gains' reference
    if checkpoint:
        state = runs.load_checkpoint(checkpoint, denoiser)
        runs.load_optimizer(optimizer, state["optimizer"])  # with this run's --learning-rate
        runs.load_scaler(scaler, state["scaler"])  # if both runs use fp16's scaler
        value_net.load_state_dict(state["value_net"])  # SaA
        runs.load_optimizer(value_optimizer, state["value_optimizer"])  # SaA
        start_epoch, global_step = state["epoch"], state["global_step"]
        reward_curve = state["reward_curve"]  # SaA
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
                traj = common.sample(pipe, embeds, neg_embeds, **sample_kw, generator=rngs,
                                     return_pred_x0=True)  # SaA: and Tweedie's x0_hat
                kl = torch.zeros_like(traj.log_probs)  # SaA: (B, T) KL terms
                if args.beta > 0:  # SaA
                    kl = sampled_kl(pipe, traj.latents, traj.timesteps, embeds, neg_embeds,
                                    **sample_kw, per_call=len(ids))
            # (B,) the weighted sum, (B, C) its terms
            rewards, reward_terms = reward_fn(traj.images, texts, components=True)
            # SaA: and r(decode(x0_hat)) (B, T)
            x0_rewards = denoised_rewards(pipe, reward_fn, traj.pred_x0, texts, per_call=len(ids))
            batches.append(dict(latents=traj.latents, log_probs=traj.log_probs, embeds=embeds,
                                rewards=rewards, reward_terms=reward_terms,
                                kl=kl, x0_rewards=x0_rewards))  # SaA
        samples = {key: torch.cat([s[key] for s in batches]) for key in batches[0]}
        timesteps = traj.timesteps  # (T,), the same grid for every trajectory

        # REWARDS AND ADVANTAGES
        rewards = runs.gather(samples["rewards"])  # (images_per_epoch,), in global sample order
        all_x0_rewards = runs.gather(samples["x0_rewards"]).flatten()  # SaA
        reward_fn.check(torch.cat([rewards, all_x0_rewards]), epoch, run)  # SaA
        # SaA: the KL is a running reward paid at the step that causes it, rr_k = -beta * kl_k
        # (docs/score_as_action.md, 8). V_phi is fitted first (MSE of the structured value to the
        # reward-to-go r + sum_{j >= k} rr_j), then gives every state's value for
        # A_k = rr_k + V(t_{k+1}, x_{k+1}) - V(t_k, x_k).
        running_rewards = -args.beta * samples["kl"]  # (N, T); zeros when beta = 0
        targets = returns_to_go(samples["rewards"], running_rewards)  # (N, T)
        rng = common.generator(device, args.seed, epoch, common.Stream.SHUFFLE, VALUE_FIT,
                               dist.rank)
        value_losses = fit_value(value_net, value_optimizer, samples, timesteps, targets, horizon,
                                 epochs=args.value_epochs, batch_size=args.value_batch_size,
                                 generator=rng)
        with torch.no_grad():
            all_states = torch.arange(targets.numel(), device=device).split(args.value_batch_size)
            values = torch.cat([state_values(value_net, samples, timesteps, horizon, flat)
                                for flat in all_states]).view(-1, args.num_steps)  # (N, T)
        advantages = runs.gather(step_advantages(values, samples["rewards"], running_rewards))
        # (images_per_epoch, T): per timestep, over the global batch
        advantages = standardise_per_timestep(advantages)
        advantages = advantages[first : first + samples_per_process]
        samples["advantages"] = advantages.clamp(-args.adv_clip_max, args.adv_clip_max)
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
                embeds = samples["embeds"][idx]
                adv = samples["advantages"][rows, steps]  # SaA: (b, T_train), one per step
                for j in range(0, num_train_timesteps, steps_per_call):
                    window = slice(j, j + steps_per_call)  # trained steps in one UNet call
                    with common.autocast(device, precision):  # (b, n): n steps per trajectory
                        log_prob, _ = common.step_log_prob(
                            pipe, latents[:, window], next_latents[:, window],
                            timesteps[steps[:, window]], embeds, neg_embeds, **sample_kw)
                    n, old = log_prob.shape[1], old_log_probs[:, window]
                    loss, approx_kl, clipfrac = policy_loss(log_prob, old, adv[:, window],
                                                            args.clip)  # SaA
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
            "debug/skipped_steps": run.skipped_steps,
            "debug/value_at_start": values[:, 0].mean()})  # SaA: V(t_0, x_T)
        if value_losses:  # SaA
            metrics["losses/value_loss"] = torch.stack(value_losses).mean()
        if args.beta > 0:  # SaA: sum_k of the per-step KL terms, per trajectory
            metrics["losses/kl_to_ref"] = samples["kl"].sum(1).mean()
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
                    "reward_curve": reward_curve, "eval_before": eval_before,
                    "value_net": value_net.state_dict(),  # SaA
                    "value_optimizer": value_optimizer.state_dict()})  # SaA
                runs.plot_curve(reward_curve, run_dir / "reward_curve.png",
                                title="mean reward per epoch")
    if is_main and reward_curve:
        runs.print0(f"mean reward: first epoch {reward_curve[0]:.4f}, "
                    f"last epoch {reward_curve[-1]:.4f}; outputs in {run_dir}")
    logger.close()
