"""What every method shares: the environment, not the algorithm.

The policy first: one DDIM(eta) step of Stable Diffusion 1.x/2.x and one step of Flow-GRPO's SDE on SD 3.x, each a
Gaussian with its log-probability; then the classifier-free-guidance forward and the training path that re-scores
stored transitions (`step_log_prob`), the sampler that stores them (`sample`), the flow-matching specifics, loading
(hub id, local folder, the offline stand-ins of offline.py, LoRA), and the prompt sets.

Nothing here asks which algorithm is running: advantages, losses, optimisers and the epoch loop live in the scripts;
run folders, checkpoints, logging and torchrun in runs.py; the flag rules and one-line errors in cli.py. The notation
follows Black et al. 2023 (DDPO, arXiv 2305.13301): denoising is an MDP whose action at timestep t is x_{t'} (t' the
previous timestep on the inference grid) and whose policy is the Gaussian of one denoising step.
"""

import contextlib
import dataclasses
import enum
import hashlib
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

import offline
from cli import fail, one_line, read_input_file

# The hub id of Stable Diffusion 1.5 (the original `runwayml/...` repository was withdrawn in 2024;
# this is its maintained mirror with the same weights).
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Offline stand-ins: same architecture classes, built from configs with seeded random weights.
TINY = "tiny"  # ~0.8M UNet parameters, 32x32 images: tests and CPU demos
SD15_RANDOM = "sd15-random"  # Stable Diffusion 1.5's exact shapes and cost: speed and memory benchmarks
# The pretrained model of the synthetic shapes world (world/shapes, made by `python -m world.pretrain`): a local
# diffusers folder that ships with the project, so learning can be seen on a CPU (docs/world.md).
SHAPES = "shapes"
# found by path: common imports neither world nor rewards
SHAPES_DIR = Path(__file__).resolve().parent / "world" / "shapes"
# Its flow-matching counterpart in SD 3.x's classes (world/shapes_flow, made by `python -m world.pretrain_flow`).
SHAPES_FLOW = "shapes-flow"
SHAPES_FLOW_DIR = SHAPES_DIR.parent / "shapes_flow"
TINY_SD3 = "tiny-sd3"  # a random SD3-class model (MMDiT, two CLIP encoders, no T5): tests of the flow path
SD35M_RANDOM = "sd35m-random"  # SD 3.5 Medium's exact shapes with random weights, no T5: flow benchmarks anywhere
# Flow-GRPO's SD 3.5 resolution (config/grpo.py: `config.resolution = 512` in geneval_sd3 and pickscore_sd3)
FLOW_RESOLUTION = 512


# ----------------------------------------------------------------------------------------------------
# The policy: one denoising step, a Gaussian with its log-probability
# ----------------------------------------------------------------------------------------------------

def gaussian_log_prob(x, mean, std):
    """Per-sample MEAN over latent dimensions of log N(x; mean, std^2), in float32.

    The mean (not the sum) is what every reference implementation uses and what makes PPO clip ranges
    of 1e-4 meaningful.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts: SD 1.x eps, SD 2.x (768 px) v


def _eps_and_x0(scheduler, model_output, a_t, latents):
    """(eps_hat, x0_hat) from the UNet output: for eps, x0 = (x - sqrt(1 - a) eps) / sqrt(a); for
    v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022), x0 = sqrt(a) x - sqrt(1 - a) v and
    eps = sqrt(a) v + sqrt(1 - a) x, as ddpo-pytorch's `ddim_step_with_logprob` and diffusers' DDIMScheduler."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output, (latents - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    if kind == "v_prediction":
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * latents
        return eps, a_t.sqrt() * latents - (1 - a_t).sqrt() * model_output
    fail(f"the scheduler's prediction_type is {kind!r}; supported: {', '.join(PREDICTION_TYPES)}")


def predicted_eps(scheduler, model_output, t, latents):
    """eps_hat from the (guided) UNet output at timestep(s) t: the output itself for an eps model, converted
    for a v model. float32 (B, C, h, w)."""
    model_output, latents = model_output.float(), latents.float()
    b = latents.shape[0]
    a_t = scheduler.alphas_cumprod[torch.as_tensor(t, device=latents.device).long().expand(b)].view(b, 1, 1, 1)
    return _eps_and_x0(scheduler, model_output, a_t, latents)[0]


def ddim_step(scheduler, model_output, t, latents, *, num_steps: int, eta: float, prev_sample=None, noise=None):
    """One DDIM(eta) step x_t -> x_{t'} with its log-probability (DDPO's DDIM policy; docs/ppo.md).

    model_output is the guided UNet output: eps_hat, or v_hat for a v-prediction scheduler (converted first).
    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                       (no clipping: latents)
    sigma  = eta * sqrt((1 - a_t') / (1 - a_t)) * sqrt(1 - a_t / a_t')
    mu     = sqrt(a_t') x0_hat + sqrt(1 - a_t' - sigma^2) eps;   x_{t'} = mu + sigma z
    with a = alphas_cumprod, t' = t - 1000 // num_steps, and `final_alpha_cumprod` past the first
    training timestep (SD 1.x: `set_alpha_to_one=False`, so sigma stays > 0 at the last step).

    Sampling passes the noise z; training passes the stored `prev_sample` and gets its log-probability
    under the current eps. `t` may be a scalar or (B,). All arithmetic is float32. With eta = 0 the
    step is deterministic and the log-probability is undefined: zeros are returned.
    Returns (x_{t'}, log_prob (B,), x0_hat).
    """
    model_output, latents = model_output.float(), latents.float()
    b = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device).long().expand(b)
    prev_t = t - scheduler.config.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod
    a_t = alphas[t].view(b, 1, 1, 1)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod).view(b, 1, 1, 1)
    eps, x0 = _eps_and_x0(scheduler, model_output, a_t, latents)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean if eta == 0 else mean + std * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std) if eta > 0 else latents.new_zeros(b)
    return prev_sample, log_prob, x0


def flow_std(sigma, sigma_1, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's std_t = a sqrt(sigma / (1 - sigma)); at sigma = 1 the reference divides by 1 - sigma_1 instead."""
    return noise_level * (sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_1, device=sigma.device),
                                                   sigma))).sqrt()


def flow_step(v, latents, sigma, sigma_next, sigma_1, *, noise_level: float, prev_sample=None, noise=None):
    """One step of Flow-GRPO's SDE (Liu et al. 2025, arXiv 2505.05470, eq. 9; the reference's `sde_step_with_logprob`):
    the ODE dx = v dt of x_t = (1 - t) x0 + t eps turned into an SDE with the same marginals,
        std_t  = a sqrt(sigma / (1 - sigma))                     (a = `noise_level`; at sigma = 1 the reference
                                                                   divides by 1 - sigma_1, sigma_1 the next sigma)
        mean   = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,   dt = sigma' - sigma < 0
        x'     = mean + std_t sqrt(-dt) z
    a Gaussian policy per step. With a = 0 it is the Euler step x + v dt of FlowMatchEulerDiscreteScheduler.
    `sigma`, `sigma_next`: scalars or (B,); `sigma_1`: the schedule's second sigma. Sampling passes the noise z;
    training passes the stored `prev_sample`. Returns (x', log_prob (B,): the MEAN over dimensions, as the DDIM
    path's, or zeros with a = 0, where the step is deterministic; x0_hat = x - sigma v). All float32."""
    v, latents = v.float(), latents.float()
    b, shape = latents.shape[0], (-1,) + (1,) * (latents.dim() - 1)
    sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b).reshape(shape)
    sigma_next = torch.as_tensor(sigma_next, device=latents.device, dtype=torch.float32).expand(b).reshape(shape)
    dt = sigma_next - sigma
    std_t = flow_std(sigma, sigma_1, noise_level)
    mean = latents * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * (-dt).sqrt()
    if prev_sample is None:
        prev_sample = mean if noise_level == 0 else mean + std * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std) if noise_level > 0 else latents.new_zeros(b)
    return prev_sample, log_prob, latents - sigma * v


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance, and the training path: stored transitions re-scored
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], pooled: bool = False):
    """CLIP text embeddings, padded to the tokenizer's 77 tokens: (B, 77, D); with `pooled`, also the pooled
    embedding (the last hidden state at the end-of-text token), (B, D), from the same forward. Each distinct prompt
    is encoded once (K images of a prompt share its embedding) and the rows are copied into place. For an SD 3.x model:
    `encode_flow_prompts`' packed conditioning, and as `pooled` its pooled CLIP vector zero-padded to D."""
    if is_flow(pipe):  # the pooled embedding is the packed conditioning's last row (SD3's pooled CLIP vector, padded)
        packed = encode_flow_prompts(pipe, prompts)
        return (packed, packed[:, -1]) if pooled else packed
    unique = list(dict.fromkeys(prompts))
    ids = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    out = pipe.text_encoder(ids.to(pipe.text_encoder.device))
    position = {prompt: i for i, prompt in enumerate(unique)}
    where = torch.tensor([position[p] for p in prompts], device=out[0].device)
    return (out[0][where], out[1][where]) if pooled else out[0][where]


def guided_noise(unet, latents, t, embeds, neg_embeds, guidance: float) -> torch.Tensor:
    """eps_hat = eps(x_t, t, 0) + w * (eps(x_t, t, c) - eps(x_t, t, 0)), both halves in ONE UNet call.

    `t` is a scalar or a (B,) tensor (training evaluates a different timestep per sample);
    `neg_embeds` is the empty-prompt embedding, (1, 77, D) or (B, 77, D). With w = 1 there is nothing
    to guide and a single conditional call is made. Returns float32 (B, C, h, w): the guided UNet output,
    which is v_hat for a v-prediction model (guidance is linear, so guiding v is guiding eps); `guided_eps`
    converts it.
    """
    return _guided_noise(unet, latents, t, cfg_embeds(embeds, neg_embeds, guidance), guidance)


def guided_output(pipe, latents, t, embeds, neg_embeds, guidance: float) -> torch.Tensor:
    """What `step_log_prob` returns beside the log-probability: eps_hat (SD 1.x/2.x), or v_hat (SD 3.x)."""
    if is_flow(pipe):
        return guided_velocity(pipe.transformer, latents, t, embeds, neg_embeds, guidance)
    return guided_eps(pipe, latents, t, embeds, neg_embeds, guidance)


def guided_eps(pipe, latents, t, embeds, neg_embeds, guidance: float) -> torch.Tensor:
    """The guided noise prediction eps_hat whatever the model predicts (`guided_noise`, then `predicted_eps`)."""
    return predicted_eps(pipe.scheduler, guided_noise(pipe.unet, latents, t, embeds, neg_embeds, guidance), t, latents)


def cfg_embeds(embeds, neg_embeds, guidance: float):
    """The UNet's text conditioning for one CFG call: [empty prompt x B; prompts], (2B, 77, D)."""
    return embeds if guidance == 1.0 else torch.cat([neg_embeds.expand(embeds.shape[0], -1, -1), embeds])


def _guided_noise(unet, latents, t, both_embeds, guidance: float):
    b = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device).expand(b)
    if guidance == 1.0:
        return unet(latents, t, encoder_hidden_states=both_embeds).sample.float()
    eps = unet(torch.cat([latents, latents]), torch.cat([t, t]), encoder_hidden_states=both_embeds).sample.float()
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def timesteps_per_call(flag: Optional[int], num_train_timesteps: int, device) -> int:
    """How many trained timesteps of each trajectory one training UNet call evaluates (`step_log_prob` on (B, n)):
    --timesteps-per-call if given, else all of them on a CPU, where one large call of a small model is faster, and 1
    on a GPU, the reference's loop and memory. Every value gives the same gradient up to float rounding."""
    return flag or (num_train_timesteps if torch.device(device).type == "cpu" else 1)


def trained_steps(pipe, n: int, num_steps: int, num_train: int, generator, device) -> torch.Tensor:
    """(n, num_train): the step indices each of n trajectories trains on. SD 1.x/2.x: a random permutation of its T
    steps per trajectory, cut to the first num_train (DDPO: ddpo-pytorch scripts/train.py line 460, "shuffle along time
    dimension independently for each sample"), drawn from `generator`. SD 3.x: the first num_train steps in order,
    the same for every trajectory (Flow-GRPO: scripts/train_sd3.py line 864, `range(num_train_timesteps)`), so that
    with its timestep_fraction 0.99 the last step, the narrowest Gaussian, is never trained; nothing is drawn."""
    if is_flow(pipe):
        return torch.arange(num_train, device=device).expand(n, -1)
    return torch.argsort(torch.rand(n, num_steps, generator=generator, device=device), dim=1)[:, :num_train]


def step_log_prob(pipe, latents, next_latents, t, embeds, neg_embeds, *, num_steps, guidance, eta):
    """The training path: log pi_theta(x_{t'} | x_t, c) of STORED transitions under the current weights.

    Same guided eps and same w as sampling (DDPO: training without CFG degrades quickly). On SD 1.x/2.x the gradient
    flows through both halves of the guidance, as ddpo-pytorch's (scripts/train.py, lines 516-520); on SD 3.x through
    the conditional half alone, as Flow-GRPO's (`guided_velocity`'s `detach_uncond`); the value is the same.
    Returns (log_prob (B,), eps_hat (B, C, h, w)) so that methods with a KL term can reuse eps_hat (converted
    from v_hat for a v-prediction model).

    `latents` and `next_latents` may also be (B, n, C, h, w) with `t` (B, n): n transitions of each of B trajectories
    (a minibatch's trained timesteps) in ONE UNet call of B n rows (2 B n with CFG), each row with its own timestep and
    its trajectory's prompt; log_prob and eps_hat then come back as (B, n) and (B, n, C, h, w). The rows are
    independent, so this equals n calls of B rows up to float rounding (a small model on a CPU is latency-bound: one
    large call is faster).
    """
    if latents.dim() == 5:
        b, n = latents.shape[:2]
        log_prob, eps = step_log_prob(pipe, latents.flatten(0, 1), next_latents.flatten(0, 1), t.flatten(),
                                      embeds.repeat_interleave(n, dim=0), neg_embeds, num_steps=num_steps,
                                      guidance=guidance, eta=eta)
        return log_prob.view(b, n), eps.view(b, n, *eps.shape[1:])
    if is_flow(pipe):  # Flow-GRPO's SDE step: t is sigma x 1000; the second element is v_hat, not eps_hat
        # with Flow-GRPO's gradient: the unconditional velocity detached (`guided_velocity`); SD 1.x keeps both halves'
        v = guided_velocity(pipe.transformer, latents, t, embeds, neg_embeds, guidance, detach_uncond=True)
        sigma, sigma_next, sigma_1 = flow_step_sigmas(pipe, t, len(v), num_steps, latents.device)
        _, log_prob, _ = flow_step(v, latents, sigma, sigma_next, sigma_1, noise_level=eta, prev_sample=next_latents)
        return log_prob, v
    output = guided_noise(pipe.unet, latents, t, embeds, neg_embeds, guidance)
    _, log_prob, _ = ddim_step(pipe.scheduler, output, t, latents, num_steps=num_steps, eta=eta,
                               prev_sample=next_latents)
    return log_prob, predicted_eps(pipe.scheduler, output, t, latents)


# ----------------------------------------------------------------------------------------------------
# Sampling: trajectories with every step's log-probability, from seeded noise
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trajectories:
    latents: torch.Tensor  # (B, T+1, C, h, w): x_T, ..., x_0 (float32)
    timesteps: torch.Tensor  # (T,): the timestep t of each step, from noisy to clean
    log_probs: torch.Tensor  # (B, T): log pi(x_{t'} | x_t, c) of each sampled step (float32)
    images: Optional[torch.Tensor]  # (B, 3, H, W) decoded x_0 in [0, 1] (float32), None if not decoded
    pred_x0: Optional[torch.Tensor] = None  # (B, T, C, h, w): Tweedie x0_hat at every step, on request


def draw_noise(shape, generator, device) -> torch.Tensor:
    """Gaussian noise of `shape` from one generator, or one row per generator from a list of them."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


class Stream(enum.IntEnum):
    """The independent random streams of one run: every draw is a pure function of (seed, epoch, stream, ...)
    (`generator`): the noise of each sample, the epoch's prompts, and the training shuffles."""

    NOISE = 0
    PROMPTS = 1
    SHUFFLE = 2


def generator(device, *keys: int) -> torch.Generator:
    """A torch.Generator seeded by a stable hash of integer keys, e.g. (seed, epoch, Stream.SHUFFLE, rank).

    Deriving every draw from the seed and the epoch makes runs reproducible and resumable bit-identically
    without saving RNG state.
    """
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_generators(seed: int, epoch: int, indices: Sequence[int], device) -> list:
    """One noise generator per sample, keyed by its GLOBAL index in the epoch: the samples do not depend
    on how a batch is split across processes (1 x 2b and 2 x b draw the same noise)."""
    return [generator(device, seed, epoch, Stream.NOISE, i) for i in indices]


@torch.no_grad()
def sample(pipe, embeds, neg_embeds, *, num_steps: int, guidance: float, eta: float, generator=None,
           latents=None, return_pred_x0: bool = False, decode: bool = True) -> Trajectories:
    """Sample B trajectories with DDIM(eta), storing every x_t and every step's log-probability.

    All the noise (x_T and one z per step) is drawn up front from `generator` (one, or a list of B),
    so the timestep loop makes no RNG calls and no host syncs. `latents` overrides x_T. An SD 3.x model samples
    Flow-GRPO's SDE instead (`flow_sample`), `eta` being its noise level a.
    """
    if is_flow(pipe):
        return flow_sample(pipe, embeds, neg_embeds, num_steps=num_steps, guidance=guidance, noise_level=eta,
                           generator=generator, latents=latents, return_pred_x0=return_pred_x0, decode=decode)
    unet, scheduler, device = pipe.unet, pipe.scheduler, embeds.device
    if num_steps > scheduler.config.num_train_timesteps:
        fail(f"{num_steps} sampling steps: the model has only {scheduler.config.num_train_timesteps} training "
             f"timesteps")
    b, c, h = embeds.shape[0], unet.config.in_channels, latent_side(pipe)
    noise = draw_noise((b, num_steps + 1, c, h, h), generator, device)  # (B, T+1, C, h, w)
    scheduler.set_timesteps(num_steps, device=device)
    x = (noise[:, 0] if latents is None else latents.float()) * scheduler.init_noise_sigma
    xs, log_probs, x0s = [x], [], []
    both_embeds = cfg_embeds(embeds, neg_embeds, guidance)  # concatenated once, not at every step
    for i, t in enumerate(scheduler.timesteps):
        output = _guided_noise(unet, x, t, both_embeds, guidance)  # eps_hat (or v_hat)
        x, log_prob, x0 = ddim_step(scheduler, output, t, x, num_steps=num_steps, eta=eta, noise=noise[:, i + 1])
        xs.append(x)
        log_probs.append(log_prob)
        if return_pred_x0:
            x0s.append(x0)
    return Trajectories(
        latents=torch.stack(xs, dim=1),
        timesteps=scheduler.timesteps.clone(),
        log_probs=torch.stack(log_probs, dim=1),
        images=decode_latents(pipe, x) if decode else None,
        pred_x0=torch.stack(x0s, dim=1) if return_pred_x0 else None,
    )


@torch.no_grad()
def evaluate(pipe, prompts: Sequence[str], reward_fn, neg_embeds, *, num_steps: int, guidance: float, eta: float,
             seed: int):
    """Fixed prompts and fixed noise (independent of the epoch): comparable images and rewards over training."""
    embeds = encode_prompts(pipe, prompts)
    gens = sample_generators(seed, -1, range(len(prompts)), embeds.device)
    c, h = denoiser(pipe).config.in_channels, latent_side(pipe)
    x_T = draw_noise((len(prompts), c, h, h), gens, embeds.device)  # its own draw: the same x_T for any step count
    traj = sample(pipe, embeds, neg_embeds, num_steps=num_steps, guidance=guidance, eta=eta, generator=gens,
                  latents=x_T)
    return traj.images, reward_fn(traj.images, list(prompts))


@torch.no_grad()
def decode_latents(pipe, latents) -> torch.Tensor:
    """VAE decode to float32 images in [0, 1]: (B, 3, H, W)."""
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if vae.config.shift_factor is not None:  # SD 3.x's VAE also shifts its latents; SD 1.x's has no shift
        latents = latents + vae.config.shift_factor
    images = vae.decode(latents).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# Flow matching (SD 3.x): Flow-GRPO's SDE around the step above (docs/flow.md)
# ----------------------------------------------------------------------------------------------------

def is_flow(pipe) -> bool:
    """A flow-matching model (SD 3.x: a transformer predicting the velocity), chosen by the loaded model, never by
    the algorithm."""
    return hasattr(pipe, "transformer") and not hasattr(pipe, "unet")


@torch.no_grad()
def encode_flow_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """SD3's text conditioning, packed in ONE tensor so that it travels like SD 1.x's (B, 77, D) embeddings (indexed,
    concatenated, repeated per trajectory): (B, L + 1, D), the L tokens of `encode_prompt` (both CLIPs padded to
    D, then T5's, zeros without T5) and one more row holding the pooled CLIP embedding (P <= D), zero-padded.
    `unpack_flow_embeds` splits it. Each distinct prompt is encoded once."""
    unique = list(dict.fromkeys(prompts))
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=unique, prompt_2=None, prompt_3=None,
                                              device=pipe.transformer.device, do_classifier_free_guidance=False,
                                              max_sequence_length=t5_tokens(pipe))
    if pooled.shape[-1] > embeds.shape[-1]:
        fail(f"the pooled text embedding ({pooled.shape[-1]}) is wider than the token embeddings ({embeds.shape[-1]})")
    packed = torch.cat([embeds, torch.nn.functional.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))[:, None]], 1)
    position = {prompt: i for i, prompt in enumerate(unique)}
    return packed[torch.tensor([position[p] for p in prompts], device=packed.device)]


def t5_tokens(pipe) -> int:
    """Rows of the T5 slot in SD3's conditioning: 128 with a T5 encoder, Flow-GRPO's `max_sequence_length`
    (yifan123/flow_grpo scripts/train_sd3.py, lines 220, 238, 540 and 625; the pipeline's default is 256); without
    one, diffusers fills the slot with `max_sequence_length` zero rows, and here it holds as many as the CLIP tokens
    (`tokenizer_max_length`: 77 for SD 3.5, 16 for the flow shapes model), which carry no prompt and would otherwise
    be most of the transformer's tokens. `StableDiffusion3Pipeline(..., max_sequence_length=t5_tokens(pipe))` gives
    the same images (docs/flow.md)."""
    return 128 if pipe.text_encoder_3 is not None else pipe.tokenizer_max_length


def unpack_flow_embeds(transformer, packed: torch.Tensor) -> tuple:
    """(token embeddings (B, L, D), pooled (B, P)) of `encode_flow_prompts`' packing."""
    return packed[:, :-1], packed[:, -1, :transformer.config.pooled_projection_dim]


def guided_velocity(transformer, latents, t, embeds, neg_embeds, guidance: float, detach_uncond: bool = False):
    """v_hat = v(x, t, 0) + w (v(x, t, c) - v(x, t, 0)) in ONE transformer call, as StableDiffusion3Pipeline guides
    (w = 1: one conditional call). `t` is the scheduler's timestep, sigma x 1000, a scalar or (B,). float32.
    `detach_uncond`: v(x, t, 0) enters as a constant, v_hat = sg(v_u) + w (v_c - sg(v_u)): the same value, but the
    gradient flows through the conditional half alone, w times, as Flow-GRPO's training step computes it
    (yifan123/flow_grpo scripts/train_sd3.py, `compute_log_prob`, line 190); `step_log_prob` does so."""
    b = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device).expand(b)
    both = cfg_embeds(embeds, neg_embeds, guidance)
    x, t = (latents, t) if guidance == 1.0 else (torch.cat([latents, latents]), torch.cat([t, t]))
    hidden, pooled = unpack_flow_embeds(transformer, both)
    v = transformer(hidden_states=x.to(transformer.dtype), timestep=t, encoder_hidden_states=hidden,
                    pooled_projections=pooled).sample.float()
    if guidance == 1.0:
        return v
    v_uncond, v_cond = v.chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance * (v_cond - v_uncond)


def flow_sigmas(scheduler, num_steps: int, device) -> torch.Tensor:
    """The sampling schedule sigma_0 = 1 > ... > sigma_T = 0 of `num_steps` steps (with the scheduler's shift), (T+1,),
    float32 on `device`; the timesteps the transformer sees are sigma_i x 1000, i < T. Computed once per (steps,
    device) and kept on the scheduler: the training path asks for it at every call, and a host-to-device copy there
    would wait for the GPU's queue."""
    cache = scheduler.__dict__.setdefault("_rl_sigmas", {})
    key = (num_steps, str(torch.device(device)))
    if key not in cache:
        scheduler.set_timesteps(num_steps, device=device)
        cache[key] = scheduler.sigmas.to(device, torch.float32)
    return cache[key]


def flow_step_sigmas(pipe, t, b: int, num_steps: int, device) -> tuple:
    """(sigma (b,), sigma' (b,), sigma_1) of transitions at timesteps t = sigma x 1000 (a scalar or (b,)), found on the
    `num_steps` sampling schedule: what `flow_step` needs to re-evaluate a stored transition."""
    sigmas = flow_sigmas(pipe.scheduler, num_steps, device)
    t = torch.as_tensor(t, device=device).float().expand(b)
    i = (sigmas[:-1, None] * 1000 - t).abs().argmin(dim=0)  # each transition's step on the sampling schedule
    return sigmas[i], sigmas[i + 1], sigmas[1]


def flow_kl_weight(pipe, t: torch.Tensor, *, num_steps: int, eta: float) -> torch.Tensor:
    """(b,) for timesteps t (b,): the factor w_t with KL(pi_theta(.|x_t) || pi_pre(.|x_t)) = w_t mean((v_theta -
    v_pre)^2) per dimension, for two models' flow steps at the same sigma: the means differ by (1 + std_t^2 (1 - sigma)
    / (2 sigma)) dt (v_theta - v_pre) and share the variance std_t^2 (-dt), so w_t = (1 + std_t^2 (1 - sigma) / (2
    sigma))^2 (-dt) / (2 std_t^2). Needs a noise level eta > 0."""
    sigma, sigma_next, sigma_1 = flow_step_sigmas(pipe, t, t.numel(), num_steps, pipe.transformer.device)
    std_t2 = flow_std(sigma, sigma_1, eta) ** 2
    return (1 + std_t2 * (1 - sigma) / (2 * sigma)) ** 2 * (sigma - sigma_next) / (2 * std_t2)


@torch.no_grad()
def flow_sample(pipe, embeds, neg_embeds, *, num_steps: int, guidance: float, noise_level: float, generator=None,
                latents=None, return_pred_x0: bool = False, decode: bool = True) -> "Trajectories":
    """`sample` for a flow-matching model: B trajectories of Flow-GRPO's SDE, every x_t and every step's
    log-probability (and on request x0_hat = x_t - sigma v_hat at every step). All noise drawn up front (x_1 and one z
    per step); `latents` overrides x_1."""
    transformer, device = pipe.transformer, embeds.device
    b, c, h = embeds.shape[0], transformer.config.in_channels, latent_side(pipe)
    noise = draw_noise((b, num_steps + 1, c, h, h), generator, device)
    sigmas = flow_sigmas(pipe.scheduler, num_steps, device)
    x = noise[:, 0] if latents is None else latents.float()
    xs, log_probs, x0s = [x], [], []
    for i in range(num_steps):
        v = guided_velocity(transformer, x, sigmas[i] * 1000, embeds, neg_embeds, guidance)
        x, log_prob, x0 = flow_step(v, x, sigmas[i], sigmas[i + 1], sigmas[1], noise_level=noise_level,
                                    noise=noise[:, i + 1])
        xs.append(x)
        log_probs.append(log_prob)
        if return_pred_x0:
            x0s.append(x0)
    return Trajectories(latents=torch.stack(xs, dim=1), timesteps=sigmas[:-1] * 1000,
                        log_probs=torch.stack(log_probs, dim=1), images=decode_latents(pipe, x) if decode else None,
                        pred_x0=torch.stack(x0s, dim=1) if return_pred_x0 else None)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

OFFLINE_MODELS = (TINY, SD15_RANDOM, TINY_SD3, SD35M_RANDOM)


def offline_pipeline(name: str, seed: int = 0):
    """One of OFFLINE_MODELS, built from its configs with weights seeded by `seed` (offline.py), without the network."""
    if name in (TINY_SD3, SD35M_RANDOM):
        return offline.stable_diffusion_3(tiny=name == TINY_SD3, seed=seed)
    return offline.stable_diffusion(tiny=name == TINY, scheduler=ddim_scheduler(), seed=seed)


def ddim_scheduler(config=None):
    """A DDIMScheduler with Stable Diffusion 1.x's schedule, or from a model's scheduler config.

    `clip_sample=False` is forced: a config without the key (SD's PNDM config has it, others do not)
    would default to clamping x0 to [-1, 1], which is wrong for latents. `steps_offset`,
    `timestep_spacing` and `set_alpha_to_one` come from the model's config.
    """
    from diffusers import DDIMScheduler

    if config is None:
        config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return DDIMScheduler.from_config(config, clip_sample=False)


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(mixed_precision: str, device) -> str:
    """`auto` is fp16 on a GPU (the reference's precision: measured on an H200, bf16 moves the on-policy ratio by
    3.8e-5 on average before any update, above clip/10, and fp16 by 4.2e-6; docs/performance.md) and float32 on CPU."""
    if mixed_precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "no"
    return mixed_precision


def load_pipeline(
    model: str,
    device: Union[str, torch.device] = "cpu",
    mixed_precision: str = "no",
    lora_rank: int = 4,
    lora_alpha: Optional[float] = None,
    lora_targets: Optional[Sequence[str]] = None,
    gradient_checkpointing: bool = False,
    compile: bool = False,
    seed: int = 0,
    channels_last: bool = False,
    resolution: Optional[int] = None,
):
    """Load Stable Diffusion for RL fine-tuning and make its UNet trainable.

    `model`: a hub id, a local folder in diffusers' layout, `tiny` or `sd15-random` (offline stand-ins
    built with seed 0, so every run starts from the same "pretrained" model); `seed` seeds the LoRA init. The VAE and
    text encoder are frozen and cast to the `mixed_precision` dtype. With `lora_rank > 0` the UNet is frozen too and
    peft LoRA adapters (zero-initialised B, so the model starts exactly at the pretrained one) are attached to
    `lora_targets`, kept in float32; with `lora_rank == 0` the whole UNet is trained in float32, loaded as float32 (not
    rounded through the mixed-precision dtype first). Attention uses PyTorch's SDPA (diffusers' default processor).
    `channels_last` stores the UNet's 4-D weights in channels-last memory format (the same model; convolutions may round
    differently, and run faster on some devices: docs/performance.md). `compile` wraps the UNet's forward in
    `torch.compile`. The model must predict eps or v (`PREDICTION_TYPES`).

    An SD 3.x model (a StableDiffusion3Pipeline folder or hub id, or `tiny-sd3`) loads the same way with its
    transformer in the UNet's place (`denoiser`), its three text encoders frozen (T5 may be absent) and its flow
    scheduler kept; `lora_targets` (default: the UNet's attention projections, or for SD3 `FLOW_LORA_TARGETS`).

    `resolution`: the images' side in pixels that `sample` and `evaluate` draw (`latent_side`); None: the family's
    default (`latent_size`). A size the model cannot take stops here, in one line.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    model = {SHAPES: str(SHAPES_DIR), SHAPES_FLOW: str(SHAPES_FLOW_DIR)}.get(model, model)
    if model in OFFLINE_MODELS:
        pipe = offline_pipeline(model, seed=0)  # the "pretrained" weights are the same for every run
    else:
        try:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(model)
            sd3 = index.get("_class_name", "").startswith("StableDiffusion3")
            # a folder saved without T5 (the flow shapes model) records it as null, which diffusers loads only if told
            no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if sd3 and not index.get("text_encoder_3",
                                                                                         [0])[0] else {}
            # float32 first: frozen parts are cast below, a trained full UNet must not start from rounded weights
            pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32, **no_t5) if sd3 else \
                StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False)
        except (OSError, ValueError) as e:  # not a folder, not in the cache, hub unreachable or id malformed
            fail(f"model {model!r} could not be loaded: it is not a local diffusers folder and not in the local "
                 f"Hugging Face cache ({type(e).__name__}). Use --model tiny for the offline model, or pass a local "
                 f"folder.")
        # a folder that is there but incomplete or foreign (e.g. model_index.json {})
        except Exception as e:  # noqa: BLE001
            fail(f"model {model!r} is not a complete diffusers Stable Diffusion folder ({one_line(e)}); check its "
                 f"model_index.json and subfolders, or use --model tiny for the offline model")
    if is_flow(pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            fail(f"model {model!r} is an SD 3.x model with a {type(pipe.scheduler).__name__}; the flow step here needs "
                 f"its FlowMatchEulerDiscreteScheduler")
    elif model not in (TINY, SD15_RANDOM):
        pipe.scheduler = ddim_scheduler(pipe.scheduler.config)
        if pipe.scheduler.config.set_alpha_to_one:
            fail(f"model {model!r} has a scheduler with set_alpha_to_one=True: its last DDIM step is deterministic and "
                 f"has no log-probability; these methods need SD 1.x/2.x's set_alpha_to_one=False")
        if pipe.scheduler.config.prediction_type not in PREDICTION_TYPES:
            fail(f"model {model!r} predicts {pipe.scheduler.config.prediction_type!r}; the DDIM step here supports "
                 f"{' and '.join(PREDICTION_TYPES)} models (SD 1.x, SD 2.x)")
    dtype = DTYPES[mixed_precision]
    pipe.set_progress_bar_config(disable=True)
    unet = denoiser(pipe)
    pipe.rl_latent_size = latent_size(unet.config, vae_scale(pipe.vae.config), is_flow(pipe), resolution)
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for frozen in [pipe.vae, *filter(None, encoders)] + ([unet] if lora_rank > 0 else []):
        frozen.requires_grad_(False).to(device)
        if dtype != frozen.dtype:
            frozen.to(dtype)
    if lora_rank > 0:
        targets = lora_targets or (FLOW_LORA_TARGETS if is_flow(pipe) else ("to_q", "to_k", "to_v", "to_out.0"))
        add_lora(unet, lora_rank, lora_alpha, targets, seed)
    else:
        unet.requires_grad_(True).to(device, torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile()
    if not is_flow(pipe):  # the DDIM step indexes these with device tensors: keep them on the device
        pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
        pipe.scheduler.final_alpha_cumprod = pipe.scheduler.final_alpha_cumprod.to(device)
    return pipe


def vae_scale(vae_config) -> int:
    """Pixels per latent cell: 2 per downsampling block of the VAE's encoder (8 for SD 1.x, 2.x and 3.x)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def latent_size(net_config, scale: int, flow: bool, resolution: Optional[int] = None) -> int:
    """The latent's side for images of `resolution` pixels, from the denoiser's config and the VAE's `scale` alone (no
    weights). None: on SD 1.x/2.x the model's native size (`sample_size` x scale: 512 px for SD 1.5, 768 for SD
    2.1-768); on SD 3.x Flow-GRPO's FLOW_RESOLUTION, 512 px (SD 3.5's native size is 1024), or the native size where
    that is smaller (the small offline and shapes models). The resolution must be a multiple of the scale times the
    transformer's patch size (SD 3.x: 8 x 2 = 16), and within its position embeddings: otherwise one line."""
    native = net_config.sample_size * scale
    if resolution is None:
        resolution = min(FLOW_RESOLUTION, native) if flow else native
    multiple = scale * (net_config.patch_size if flow else 1)
    if resolution % multiple:
        patch = f" x its patch size {net_config.patch_size}" if flow else ""
        fail(f"--resolution {resolution}: this model's images must be a multiple of {multiple} pixels (its VAE's "
             f"{scale}{patch}); use {resolution // multiple * multiple or multiple}")
    largest = getattr(net_config, "pos_embed_max_size", None) if flow else None
    if largest and resolution // multiple > largest:
        fail(f"--resolution {resolution}: this model's position embeddings reach {largest * multiple} pixels at most")
    return resolution // scale


def latent_side(pipe) -> int:
    """The latents' side for `sample`: from the resolution `load_pipeline` was given, else the family's default."""
    size = getattr(pipe, "rl_latent_size", None)
    return size or latent_size(denoiser(pipe).config, vae_scale(pipe.vae.config), is_flow(pipe))


def denoiser(pipe) -> torch.nn.Module:
    """The network that is trained: SD 1.x/2.x's UNet, or SD 3.x's transformer."""
    return pipe.transformer if is_flow(pipe) else pipe.unet


# LoRA on every attention projection of SD3's joint blocks, image and text streams (Flow-GRPO's SD 3.5 targets)
FLOW_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")


def add_lora(model: torch.nn.Module, rank: int, alpha: Optional[float], targets: Sequence[str], seed: int):
    """peft LoRA adapters of `rank` on the `targets` projections of a frozen denoiser: A random (seeded by `seed`), B
    zero, so the model starts exactly at the pretrained one; the adapters are kept in float32 under mixed precision."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA's A matrices are random: seed them
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                     target_modules=list(targets)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights stay in float32 under mixed precision


def trainable_parameters(module: torch.nn.Module):
    return [p for p in module.parameters() if p.requires_grad]


def autocast(device: torch.device, mixed_precision: str):
    """Mixed precision context for UNet, VAE and text encoder calls (a no-op for `no`)."""
    return torch.autocast(torch.device(device).type, dtype=DTYPES[mixed_precision], enabled=mixed_precision != "no")


def speed_flags(device: torch.device):
    """TF32 matmuls and convolutions on GPU (ddpo-pytorch's `allow_tf32 = True`): no effect on the algorithm. cuDNN
    autotuning (`cudnn.benchmark`) stays off, PyTorch's default and the references': it adds run-to-run variation."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def adapters_disabled(unet):
    """The pretrained model's prediction: the same UNet with its LoRA adapters switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


# ----------------------------------------------------------------------------------------------------
# Images and prompts (prompts/*.txt)
# ----------------------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor):
    """(B, 3, H, W) floats in [0, 1] -> list of HxWx3 uint8 PIL images (one host copy for the batch)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def prompt_sets() -> list:
    """The names of the built-in prompt sets: the files prompts/NAME.txt (sources and licences in prompts/README.md)."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


EVAL_IMAGES = 32  # images in each fixed evaluation (prompts and noise fixed for the whole run)


def load_eval_prompts(name: str, prompt_file: Optional[str] = None) -> list:
    """The fixed evaluation prompts, cycled to EVAL_IMAGES: the set's held-out counterpart prompts/NAME_eval.txt
    where one exists (disjoint from the training prompts, as T2I-CompBench keeps them), else the training prompts."""
    held_out = prompt_file is None and (PROMPTS_DIR / f"{name}_eval.txt").exists()
    prompts = load_prompts(f"{name}_eval") if held_out else load_prompts(name, prompt_file)
    return (prompts * EVAL_IMAGES)[:EVAL_IMAGES]


def load_prompts(name: str, prompt_file: Optional[str] = None) -> list:
    """A built-in prompt set, or one prompt per non-empty line of `prompt_file` (which wins)."""
    if prompt_file is None and name not in prompt_sets():
        fail(f"unknown prompt set {name!r}; choose one of {', '.join(prompt_sets())} or pass --prompt-file")
    path = prompt_file if prompt_file is not None else PROMPTS_DIR / f"{name}.txt"
    try:
        lines = read_input_file(str(path)).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read prompt file {str(path)!r} ({type(e).__name__}); give a UTF-8 text file, one prompt per line")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        fail(f"prompt file {str(path)!r} holds no prompts; write one prompt per line")
    return prompts
