# DPOK (arXiv 2305.16381), derived from ppo.py: diff ppo.py dpok.py
"""DPOK: online policy gradient with a KL regulariser to the pretrained model (Fan et al. 2023).

Sampling is ppo.py's; what changes is what happens to the samples. Every transition (x_t, x_t', t, c, old
log-prob, final reward) goes into a replay buffer of the most recent transitions. The policy is trained on
transitions drawn uniformly from the buffer with the loss -alpha * (r - V) * clamp(rho, 1 - eps, 1 + eps)
+ beta * mean((eps_theta - eps_pre)^2), eps_pre being the same UNet with its LoRA adapters disabled; the value
network V_phi(x_t, c, t) is fitted to the final rewards before that (`--value-fit last`: after). Defaults follow
the reference code, google-research/google-research `dpok/train_online_pg.py`, with its README's single-prompt
settings. Changed lines of ppo.py's Args and main loop are marked `# DPOK`; docs/dpok.md has the details and the
deviations.

    python dpok.py --prompt-file prompts.txt --reward aesthetic     # SD 1.5, GPU; multi-prompt: --alpha 1000 --beta 0.1
    python dpok.py --model tiny --reward color --prompts colors --num-steps 10 --learning-rate 3e-2 \
        --sample-batch-size 8 --buffer-size 80 --num-policy-steps 1 --gradient-accumulation-steps 2 \
        --train-batch-size 40 --value-learning-rate 1e-3 --num-value-steps 20 --num-value-batches 1 --value-fit last
    torchrun --nproc_per_node 8 dpok.py --reward aesthetic --prompts simple_animals --alpha 1000 --beta 0.1
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
SD_DEFAULTS = dict(num_steps=50, eta=1.0, guidance=7.5)  # DPOK


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
    num_epochs: int = 2000  # DPOK
    """epochs of sampling then training (the reference: 10000 policy steps, 5 per sampling round)"""
    save_every: int = 100  # DPOK
    """save a checkpoint every this many epochs (and at the end); 0 saves only at the end"""
    image_every: int = 50  # DPOK
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
    sample_batch_size: int = 10  # DPOK
    """images per sampling call per process"""
    num_batches_per_epoch: int = 1  # DPOK
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
    learning_rate: float = 1e-5  # DPOK
    """AdamW learning rate"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    weight_decay: float = 0.0  # DPOK
    """AdamW weight decay"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float = 0.1  # DPOK
    """gradient-norm clip"""
    train_batch_size: int = 4  # DPOK
    """transitions per policy micro-batch per process, drawn uniformly from the replay buffer"""
    gradient_accumulation_steps: int = 12  # DPOK
    """micro-batches per policy optimiser step"""
    num_policy_steps: int = 5  # DPOK
    """policy optimiser steps per epoch (per sampling round)"""
    clip: float = 1e-4
    """the ratio is clamped to [1 - clip, 1 + clip] (a plain clamp: outside it a transition has no policy gradient)"""
    alpha: float = 10.0  # DPOK
    """reward weight alpha of the policy loss (the reference: 10 for one prompt, 1000 for many, with ImageReward
    standardised to about unit scale: with another reward scale, e.g. JPEG kB, alpha/beta weighs reward and KL anew)"""
    beta: float = 0.01  # DPOK
    """KL weight beta on mean((eps_theta - eps_pre)^2) (the reference: 0.01 for one prompt, 0.1 for many)"""
    value_fit: Literal["first", "last"] = "first"  # DPOK
    """when V_phi is fitted each epoch: first (the reference: on the buffer with the new transitions, then used for
    their advantages) or last (after the policy steps: advantages from a V_phi that has not seen these rewards)"""
    buffer_size: int = 1000  # DPOK
    """replay buffer: the most recent this many transitions of each process"""
    value_learning_rate: float = 1e-4  # DPOK
    """AdamW learning rate of the value network V_phi (torch's default weight decay 0.01, as the reference)"""
    value_batch_size: int = 256  # DPOK
    """transitions per value minibatch per process"""
    num_value_steps: int = 1  # DPOK
    """value optimiser steps per epoch (the reference: 1)"""
    num_value_batches: int = 5  # DPOK
    """value minibatches accumulated into each value optimiser step (the reference: 5)"""


class ValueNet(torch.nn.Module):  # DPOK
    """V_phi(x_t, c, t) ~ E[r(x_0, c) | x_t, c]: an MLP on [flattened x_t, pooled prompt embedding] with 3 hidden
    layers of 256 and ReLU, each layer's output scaled elementwise by a learned embedding of the step index t,
    h_l = relu(gamma_l(t) * (W_l h_{l-1} + b_l)). Initialised as the reference's `ValueMulti`: Xavier-normal
    weights, scales uniform in [0, 1)."""

    def __init__(self, latent_dim: int, text_dim: int, num_steps: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        dims = [latent_dim + text_dim] + [hidden] * depth
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.step_scales = torch.nn.ModuleList(torch.nn.Embedding(num_steps, hidden) for _ in range(depth))
        self.head = torch.nn.Linear(hidden, 1)
        for linear in [*self.layers, self.head]:
            torch.nn.init.xavier_normal_(linear.weight)
        for scale in self.step_scales:
            torch.nn.init.uniform_(scale.weight)

    def forward(self, latents, text, steps):  # (B, C, h, w), (B, D), (B,) step indices -> (B,)
        h = torch.cat([latents.flatten(1).float(), text.float()], dim=1)
        for layer, scale in zip(self.layers, self.step_scales):
            h = torch.relu(layer(h) * scale(steps))
        return self.head(h).squeeze(-1)


def value_loss(value_net, batch: dict):
    """The value regression on buffer transitions: L(phi) = mean((V_phi(x_t, c, t) - r(x_0, c))^2)."""
    prediction = value_net(batch["latents"], batch["text"], batch["steps"])
    return torch.nn.functional.mse_loss(prediction, batch["rewards"].float())


def to_transitions(latents, log_probs, rewards, text, prompt_ids) -> dict:
    """N trajectories (latents (N, T+1, C, h, w), log_probs (N, T)) -> N*T transitions, step-major as the reference
    stores them (all N at step 0, then step 1, ...). The prompt is kept as its id: the token embeddings for the UNet
    are re-encoded when a transition is trained on; `text` (N, D) is V_phi's pooled prompt embedding."""
    n, num_steps = log_probs.shape
    step_major = latents.transpose(0, 1)  # (T+1, N, C, h, w)
    steps = torch.arange(num_steps, device=latents.device).repeat_interleave(n)
    return dict(latents=step_major[:-1].flatten(0, 1), next_latents=step_major[1:].flatten(0, 1), steps=steps,
                log_probs=log_probs.T.flatten(), rewards=rewards.repeat(num_steps), text=text.repeat(num_steps, 1),
                prompt_ids=prompt_ids.repeat(num_steps))


def buffer_add(buffer: dict, transitions: dict, size: int) -> dict:
    """The replay buffer: append `transitions` and keep exactly the most recent `size` of them."""
    if buffer:
        transitions = {key: torch.cat([buffer[key], value]) for key, value in transitions.items()}
    return {key: value[-size:] for key, value in transitions.items()}


def fit_value(value_net, value_optimizer, buffer: dict, draws, num_value_batches: int) -> list:
    """V_phi's update on buffer transitions: one value_loss per row of `draws` (indices into the buffer), accumulated
    over num_value_batches rows per AdamW step (the reference's `_train_value_func`, divided by `v_step`); gradients
    averaged across processes. Returns the losses, each before its step."""
    params, losses = list(value_net.parameters()), []
    for v, idx in enumerate(draws):
        loss = value_loss(value_net, {key: value[idx] for key, value in buffer.items()})
        (loss / num_value_batches).backward()
        losses.append(loss.detach())
        if (v + 1) % num_value_batches == 0:
            runs.average_gradients(params)
            value_optimizer.step()
            value_optimizer.zero_grad(set_to_none=True)
    return losses


def draw_indices(num_draws: int, buffer_len: int, generator) -> torch.Tensor:
    """(num_draws, buffer_len): each row an independent uniform permutation of the buffer's rows, old and new alike.
    The first b entries of a row are a uniform draw of b transitions without replacement (the reference's
    `np.random.choice(n, b, replace=False)` per micro-batch)."""
    return torch.rand(num_draws, buffer_len, generator=generator, device=generator.device).argsort(dim=1)


def policy_loss(log_prob, old_log_prob, advantages, clip: float):
    """DPOK's policy term: mean(-A * clamp(rho, 1 - eps, 1 + eps)), rho = exp(log pi_theta - log pi_old) and
    A = r - V_phi(x_t, c, t) (no gradient into V_phi). At rho = 1 its gradient is REINFORCE's -A grad log pi_theta
    (the paper's policy gradient with a baseline); the plain clamp of the reference code (not PPO's min/max) gives
    no gradient once rho leaves [1 - eps, 1 + eps], whatever the sign of A. Returns (loss, approx_kl, clipfrac)
    with ppo.py's diagnostics: approx_kl = mean((log pi_theta - log pi_old)^2) / 2, clipfrac = mean(|rho - 1| > eps)."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = (-advantages * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, approx_kl.detach(), clipfrac


def kl_to_pretrained(eps, eps_pre, weight=1.0):
    """DPOK's KL regulariser per transition: mean over latent dimensions of (eps_theta - eps_pre)^2, both CFG-guided
    with the same w. One DDIM step is N(mu, sigma_t^2 I) with mu = c_t * eps + (terms without eps), so
    KL(pi_theta || pi_pre) = c_t^2 / (2 sigma_t^2) * ||eps_theta - eps_pre||^2: this is the per-step KL that the paper
    sums to bound KL(p_theta(x_0 | c) || p_pre(x_0 | c)), without the per-step weight (as the reference code).
    On a flow model eps is v and `weight` the per-step factor (common.flow_kl_weight) that makes it the exact
    Gaussian KL of the two steps per dimension (docs/flow.md: no reference defines DPOK there)."""
    return weight * ((eps.float() - eps_pre.float()) ** 2).mean(dim=tuple(range(1, eps.ndim)))


def dpok_loss(log_prob, old_log_prob, advantages, eps, eps_pre, *, alpha: float, beta: float, clip: float, weight=1.0):
    """The loss of a micro-batch, as the reference assembles it: alpha * policy_loss + beta * mean(kl_to_pretrained),
    L = -alpha * mean(A * clamp(rho, 1 - eps, 1 + eps)) + beta * mean((eps_theta - eps_pre)^2).
    Returns (loss, policy term, KL term, approx_kl, clipfrac)."""
    policy, approx_kl, clipfrac = policy_loss(log_prob, old_log_prob, advantages, clip)
    kl = kl_to_pretrained(eps, eps_pre, weight).mean()
    return alpha * policy + beta * kl, policy.detach(), kl.detach(), approx_kl, clipfrac


if __name__ == "__main__":
    args = tyro.cli(Args)
    # the family's defaults for the unset flags, every shared flag's range: before anything loads
    runs.validate_args(args, SD_DEFAULTS)
    dist = runs.setup_distributed(args.device)
    device, is_main = dist.device, dist.is_main
    precision = common.resolve_precision(args.mixed_precision, device)
    samples_per_process = args.sample_batch_size * args.num_batches_per_epoch
    images_per_epoch = samples_per_process * dist.world_size
    minibatches = args.num_policy_steps * args.gradient_accumulation_steps  # DPOK
    steps_per_epoch = args.num_policy_steps  # DPOK
    sizes = (args.num_policy_steps, args.gradient_accumulation_steps, args.num_value_steps,
             args.num_value_batches)  # DPOK
    if min(sizes) < 1:  # DPOK
        cli.fail("--num-policy-steps, --gradient-accumulation-steps, --num-value-steps, "
                 "--num-value-batches: each must be at least 1")
    if args.lora_rank < 1 and args.beta != 0:  # DPOK
        cli.fail("--lora-rank 0: the KL term's pretrained model is the UNet with its LoRA adapters "
                 "disabled; use --lora-rank 1 or more (or --beta 0)")
    if not 0 < args.alpha < float("inf"):  # DPOK
        cli.fail(f"--alpha {args.alpha}: must be a finite number > 0 (the reward's weight: 0 "
                 f"ignores it, < 0 inverts it)")
    if args.buffer_size < args.train_batch_size:  # DPOK
        cli.fail(f"--buffer-size {args.buffer_size} must hold at least one micro-batch of "
                 f"--train-batch-size {args.train_batch_size} transitions")
    runs.print0(f"{images_per_epoch} images per epoch ({dist.world_size} processes x "
                f"{args.num_batches_per_epoch} batches x {args.sample_batch_size}), "
                f"{steps_per_epoch} optimiser steps per epoch of "
                f"{args.gradient_accumulation_steps} x {args.train_batch_size} transitions from a "
                f"buffer of {args.buffer_size}, {args.num_value_steps} value steps of "
                f"{args.num_value_batches} x {args.value_batch_size}", enabled=is_main)  # DPOK

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
    # DPOK: V_phi (float32) on latents at --resolution, the same at start on every process
    latent_dim = denoiser.config.in_channels * common.latent_side(pipe) ** 2
    torch.manual_seed(args.seed)
    value_net = ValueNet(latent_dim, neg_embeds.shape[-1], args.num_steps).to(device)
    value_optimizer = torch.optim.AdamW(value_net.parameters(), lr=args.value_learning_rate)  # DPOK
    start_epoch, global_step, buffer, reward_curve = 0, 0, {}, []  # DPOK
    eval_before = {}  # mean eval reward per step count before training: the gains' reference
    if checkpoint:
        state = runs.load_checkpoint(checkpoint, denoiser)
        runs.load_optimizer(optimizer, state["optimizer"])  # with this run's --learning-rate
        runs.load_scaler(scaler, state["scaler"])  # if both runs use fp16's scaler
        start_epoch, global_step = state["epoch"], state["global_step"]
        reward_curve = state["reward_curve"]  # DPOK
        eval_before = state["eval_before"]
        value_net.load_state_dict(state["value_net"])  # DPOK
        runs.load_optimizer(value_optimizer, state["value_optimizer"])  # DPOK
        if state["world_size"] != dist.world_size:  # DPOK: the buffers are per process
            cli.fail(f"{checkpoint} holds the replay buffers of {state['world_size']} processes; "
                     f"resume with as many")
        buffer = {key: value.chunk(dist.world_size)[dist.rank].to(device)
                  for key, value in state["buffer"].items()}
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
            # DPOK: (B, 77, D), and the pooled (B, D) for V_phi
            embeds, pooled = common.encode_prompts(pipe, texts, pooled=True)
            rngs = common.sample_generators(args.seed, epoch, range(lo, lo + len(ids)), device)
            with common.autocast(device, precision):
                traj = common.sample(pipe, embeds, neg_embeds, **sample_kw, generator=rngs)
            # (B,) the weighted sum, (B, C) its terms
            rewards, reward_terms = reward_fn(traj.images, texts, components=True)
            batches.append(dict(latents=traj.latents, log_probs=traj.log_probs,
                                text=pooled.float(),  # DPOK
                                rewards=rewards, reward_terms=reward_terms))
        samples = {key: torch.cat([s[key] for s in batches]) for key in batches[0]}
        timesteps = traj.timesteps  # (T,), the same grid for every trajectory

        # REWARDS AND ADVANTAGES
        rewards = runs.gather(samples["rewards"])  # (images_per_epoch,), in global sample order
        reward_fn.check(rewards, epoch, run)  # one line if an image or a reward is not finite
        reward_curve.append(rewards.mean().item())
        # DPOK: this epoch's transitions join the replay buffer (one per process, the most recent
        # buffer_size kept); V_phi is fitted on it (--value-fit first, the reference's order; last:
        # after the policy steps, docs/dpok.md, detail 4), then every buffered transition gets
        # A = r - V_phi(x_t, c, t).
        own_prompt_ids = all_prompt_ids[first : first + samples_per_process].to(device)
        transitions = to_transitions(samples["latents"], samples["log_probs"], samples["rewards"],
                                     samples["text"], own_prompt_ids)
        buffer = buffer_add(buffer, transitions, args.buffer_size)
        rng = common.generator(device, args.seed, epoch, common.Stream.SHUFFLE, dist.rank)
        num_draws = minibatches + args.num_value_steps * args.num_value_batches
        draws = draw_indices(num_draws, len(buffer["rewards"]), rng)
        micro_batches = draws[:minibatches, : args.train_batch_size]
        value_batches = draws[minibatches:, : args.value_batch_size]
        if args.value_fit == "first":  # the reference's order
            value_losses = fit_value(value_net, value_optimizer, buffer, value_batches,
                                     args.num_value_batches)
        with torch.no_grad():
            values = value_net(buffer["latents"], buffer["text"], buffer["steps"])
            advantages = buffer["rewards"] - values
        # of the rewards by V_phi, as CleanRL logs it
        explained_variance = 1 - advantages.var() / buffer["rewards"].var()
        fresh = len(buffer["rewards"]) - len(transitions["rewards"])  # the first fresh row
        fresh_fraction = (micro_batches >= fresh).float().mean()

        # TRAINING
        # DPOK: num_policy_steps optimiser steps, each on gradient_accumulation_steps micro-batches
        # drawn uniformly from the buffer (without replacement within a draw), then V_phi's step(s)
        # with --value-fit last
        denoiser.train()
        info = {"policy_loss": [], "kl_to_ref": [], "approx_kl": [], "clipfrac": []}
        # |rho - 1| before the epoch's first step: ~0 at epoch 0, then the buffer's staleness
        ratio_dev = []
        for m, idx in enumerate(runs.progress(micro_batches, enabled=is_main, desc="training",
                                              leave=False)):
            batch = {key: value[idx] for key, value in buffer.items()}  # b transitions
            latents, t, adv = batch["latents"], timesteps[batch["steps"]], advantages[idx]
            texts = [prompts[i] for i in batch["prompt_ids"].tolist()]
            embeds = common.encode_prompts(pipe, texts)  # (b, 77, D)
            with common.autocast(device, precision):
                log_prob, eps = common.step_log_prob(pipe, latents, batch["next_latents"], t,
                                                     embeds, neg_embeds, **sample_kw)
                with torch.no_grad(), common.adapters_disabled(denoiser):  # v, not eps, on SD 3.x
                    eps_pre = common.guided_output(pipe, latents, t, embeds, neg_embeds,
                                                   args.guidance)
            weight = 1.0
            if common.is_flow(pipe):
                weight = common.flow_kl_weight(pipe, t, num_steps=args.num_steps, eta=args.eta)
            loss, policy, kl, approx_kl, clipfrac = dpok_loss(
                log_prob, batch["log_probs"], adv, eps, eps_pre, weight=weight, alpha=args.alpha,
                beta=args.beta, clip=args.clip)
            scaler.scale(loss / args.gradient_accumulation_steps).backward()
            info["policy_loss"].append(policy)
            info["kl_to_ref"].append(kl)
            info["approx_kl"].append(approx_kl)
            info["clipfrac"].append(clipfrac)
            if m < args.gradient_accumulation_steps:
                ratio = torch.exp(log_prob.detach() - batch["log_probs"])
                ratio_dev.append((ratio - 1).abs().mean())
            if (m + 1) % args.gradient_accumulation_steps == 0:
                runs.average_gradients(params)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if run.step_ok(grad_norm, scaler, epoch):  # a non-finite gradient: skipped
                    scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
        if args.value_fit == "last":  # DPOK: V_phi fitted after the policy steps
            value_losses = fit_value(value_net, value_optimizer, buffer, value_batches,
                                     args.num_value_batches)
        info["value_loss"] = value_losses  # DPOK

        # LOGGING AND CHECKPOINTS
        metrics = {f"losses/{k}": torch.stack(v).mean() for k, v in info.items()}
        metrics.update({
            "charts/reward_mean": rewards.mean(), "charts/reward_std": rewards.std(correction=0),
            "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/grad_norm": grad_norm,
            "charts/images_per_sec": images_per_epoch / (time.time() - t0), "charts/epoch": epoch,
            "debug/ratio_dev_at_start": torch.stack(ratio_dev).mean(),
            "debug/skipped_steps": run.skipped_steps,
            "losses/explained_variance": explained_variance,  # DPOK
            "debug/fresh_fraction": fresh_fraction})  # DPOK
        # (C,): each reward term's mean, unweighted
        reward_terms = runs.gather(samples["reward_terms"]).mean(0)
        metrics.update({f"rewards/{name}": t for name, t in zip(reward_fn.names, reward_terms)})
        logger.scalars(metrics, global_step)
        if epoch == 0:  # DPOK: later the buffer's staleness adds to it: the check is epoch 0's
            # warns once per run if above clip/10
            run.check_on_policy(metrics["debug/ratio_dev_at_start"], args.clip, epoch)
        bar.set_postfix(reward=f"{reward_curve[-1]:.4f}",
                        kl=f"{metrics['losses/kl_to_ref']:.2e}")  # DPOK
        last = epoch + 1 == args.num_epochs
        if args.image_every > 0 and ((epoch + 1) % args.image_every == 0 or last):
            evaluate(global_step, "after" if last else f"epoch_{epoch + 1:04d}")
        if (args.save_every > 0 and (epoch + 1) % args.save_every == 0) or last:
            # DPOK: every process's buffer, by rank
            all_buffers = {key: runs.gather(value) for key, value in buffer.items()}
            if is_main:
                run.save(epoch + 1, denoiser, {  # only finite weights; the state records the run
                    "epoch": epoch + 1, "global_step": global_step,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "reward_curve": reward_curve, "eval_before": eval_before,
                    "value_net": value_net.state_dict(),  # DPOK
                    "value_optimizer": value_optimizer.state_dict(),  # DPOK
                    "buffer": all_buffers, "world_size": dist.world_size})  # DPOK
                runs.plot_curve(reward_curve, run_dir / "reward_curve.png",
                                title="mean reward per epoch")
    if is_main and reward_curve:
        runs.print0(f"mean reward: first epoch {reward_curve[0]:.4f}, "
                    f"last epoch {reward_curve[-1]:.4f}; outputs in {run_dir}")
    logger.close()
