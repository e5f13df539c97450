"""A fine-tuned shapes-world checkpoint against the pretrained model, on the same fixed noise.

For each prompt set and each step count: the mean shapes reward and the share of samples `world.judge` calls
right (strict binding), before (the LoRA switched off) and after. And the KL of the fine-tuned policy's sampling
path to the pretrained model's, at --kl-steps: along trajectories the fine-tuned policy samples, each DDIM step is
a Gaussian with the same sigma under both models, so its KL is |mu_theta - mu_pre|^2 / (2 sigma^2), here averaged
over the latent's dimensions (as the scripts' log-probabilities are) and summed over the steps: the KL of the
whole path per dimension, by the chain rule. This path KL bounds the KL of the final images (DPOK's lemma, Fan et
al. 2023); DPOK's regulariser is its per-step terms without their weights.

    python benchmarks/evaluate.py runs/loop__1__1700000000/checkpoints/epoch_0040 --prompts shapes_hard shapes_eval \\
        --steps 5 10 20 50 --out eval.json

benchmarks/study.py runs it on every run's last checkpoint; the same `--seed` gives every run the same noise.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import evaluate as evaluator  # noqa: E402 - the top-level evaluate.py: its fixed noise is this one's
import runs  # noqa: E402
import world  # noqa: E402


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """a checkpoint folder (RUN/checkpoints/epoch_N) or a run folder (its newest checkpoint)"""
    prompts: tuple[str, ...] = ("shapes_hard", "shapes_eval")
    """prompt sets (names in prompts/) evaluated"""
    images: int = 128
    """samples of each prompt set, its prompts cycled (a set of 8 prompts: 16 samples of each)"""
    steps: tuple[int, ...] = (10,)
    """DDIM step counts evaluated (the same x_T at every count)"""
    kl_steps: int = 10
    """step count of the KL to the pretrained model (on the first prompt set); 0: not computed"""
    guidance: float = 5.0
    """classifier-free guidance scale, as in training"""
    eta: float = 1.0
    """DDIM eta, as in training"""
    lora_rank: int = 4
    """the checkpoint's LoRA rank"""
    lora_alpha: Optional[float] = None
    """the checkpoint's LoRA alpha (default: the rank, as the scripts')"""
    seed: int = 0
    """seed of the evaluation noise (not the run's: runs evaluated with one seed see the same noise)"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda if available)"""
    threads: Optional[int] = None
    """torch threads (default: torch's)"""
    out: Optional[str] = None
    """write the results here as JSON (default: print them)"""


def check(args: Args):
    if args.images < 1 or not args.steps or min(args.steps) < 1 or max(args.steps) > 1000 or args.kl_steps < 0:
        cli.fail("--images and --steps must be at least 1 (steps at most 1000), --kl-steps at least 0")
    cli.check_flags(args, cli.ETA_RULES["sd"])  # --guidance, --eta, --lora-rank, --lora-alpha as the scripts
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        cli.fail(f"--out {args.out}: its folder does not exist; create it or choose another --out")
    for name in args.prompts:
        if name not in common.prompt_sets():
            cli.fail(f"--prompts {name}: not a prompt set; choose from {', '.join(common.prompt_sets())}")


def cycled(name: str, n: int) -> list:
    """The set's prompts cycled to n (every prompt n // len or n // len + 1 times)."""
    prompts = common.load_prompts(name)
    return (prompts * (n // len(prompts) + 1))[:n]


def sample_set(pipe, prompts, neg, *, steps, args, key):
    """Samples of `prompts` at `steps` from fixed noise keyed by (seed, key, image): the same for every model
    (evaluate.sample_set, the noise of the top-level evaluate.py)."""
    return evaluator.sample_set(pipe, prompts, neg, num_steps=steps, guidance=args.guidance, eta=args.eta,
                                seed=args.seed, key=key)


@torch.no_grad()
def path_kl(pipe, traj, embeds, neg, *, steps, args) -> torch.Tensor:
    """Per trajectory: sum over steps of mean over dimensions of KL(pi_theta(.|x_t) || pi_pre(.|x_t)), exact for the
    two Gaussians of equal sigma: log N(mu_theta; mu_theta, s) - log N(mu_theta; mu_pre, s) = |dmu|^2 / (2 s^2)."""
    total = torch.zeros(traj.latents.shape[0], device=traj.latents.device)
    for i, t in enumerate(traj.timesteps):
        x = traj.latents[:, i]
        output = common.guided_noise(pipe.unet, x, t, embeds, neg, args.guidance)
        mu, log_p_self, _ = common.ddim_step(pipe.scheduler, output, t, x, num_steps=steps, eta=args.eta,
                                             noise=torch.zeros_like(x))
        with common.adapters_disabled(pipe.unet):
            output = common.guided_noise(pipe.unet, x, t, embeds, neg, args.guidance)
        _, log_p_pre, _ = common.ddim_step(pipe.scheduler, output, t, x, num_steps=steps, eta=args.eta, prev_sample=mu)
        total += log_p_self - log_p_pre
    return total.cpu()


def evaluate(args: Args) -> dict:
    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    path, state = runs.find_checkpoint(args.checkpoint)
    flags = state.get("record", {}).get("flags", {}) if isinstance(state.get("record"), dict) else {}
    if flags.get("model", common.SHAPES) != common.SHAPES:
        cli.fail(f"{path} is a checkpoint of --model {flags['model']}; this evaluates shapes-world checkpoints only")
    for name in ("lora_rank", "lora_alpha"):
        ours = getattr(args, name) if name == "lora_rank" or args.lora_alpha is not None else float(args.lora_rank)
        if name in flags and flags[name] != ours:
            cli.fail(f"{path} was trained with --{name.replace('_', '-')} {flags[name]}; pass the same value here")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = common.load_pipeline("shapes", device, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    runs.load_checkpoint(path, pipe.unet)
    pipe.unet.eval()
    neg = common.encode_prompts(pipe, [""])
    result = {"checkpoint": str(path), "seed": args.seed, "images": args.images, "sets": {}}
    for key, name in enumerate(args.prompts):
        prompts = cycled(name, args.images)
        rows = {}
        for steps in args.steps:
            row = {}
            for when in ("before", "after"):
                if when == "before":
                    with common.adapters_disabled(pipe.unet):
                        traj, _ = sample_set(pipe, prompts, neg, steps=steps, args=args, key=key)
                else:
                    traj, _ = sample_set(pipe, prompts, neg, steps=steps, args=args, key=key)
                if not torch.isfinite(traj.images).all():
                    cli.fail(f"the {when} model gave non-finite images at {steps} steps (--guidance "
                                f"{args.guidance:g}, or diverged weights): nothing to score")
                row[f"reward_{when}"] = world.reward(traj.images, prompts).mean().item()
                row[f"judged_{when}"] = world.judge(traj.images, prompts).float().mean().item()
            rows[str(steps)] = row
        result["sets"][name] = rows
    if args.kl_steps:  # (the same noise as the first set's "after" samples, which were finite)
        prompts = cycled(args.prompts[0], args.images)
        traj, embeds = sample_set(pipe, prompts, neg, steps=args.kl_steps, args=args, key=0)
        result["kl_to_pretrained"] = path_kl(pipe, traj, embeds, neg, steps=args.kl_steps, args=args).mean().item()
    return result


def main(args: Args):
    result = evaluate(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
