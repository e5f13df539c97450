# Evaluation of a fine-tuned checkpoint against its pretrained model, paired on the same noise
"""Score any checkpoint of the five scripts, on prompts of your choice, under several rewards at once.

The pretrained model (the LoRA switched off) and the fine-tuned one sample every prompt from the SAME noise, keyed
by --seed, at the run's own sampler settings (its checkpoint records them), so each image after training has a
partner before it that differs only by the fine-tuning. Every image is scored by every reward named, one reward
model in memory at a time, and on the shapes world also by its judge (`world.judge`: both objects right). For
each reward the table gives the mean before and after, the mean paired difference with a 95% interval and the win
rate; the trained reward is marked, and another reward whose whole interval lies below 0 while the trained one
rose is flagged as possible reward hacking. Papers report a trained model this way on held-out prompts (Flow-GRPO
on DrawBench; DanceGRPO and MixGRPO on HPDv2's test prompts; LOOP on T2I-CompBench's val prompts):
prompts/README.md says where those sets are.

    python evaluate.py runs/demo --rewards shapes,jpeg_compressibility
    python evaluate.py runs/NAME --rewards aesthetic,pickscore,hpsv2,imagereward,clipscore --prompts drawbench.txt
    python evaluate.py runs/NAME/checkpoints/epoch_0040 --num-steps 20 --images-per-prompt 8

It writes table.md (the table it prints), scores.json (every image's scores) and pairs.png (before/after pairs of
the prompts whose mean change is the largest and the smallest) into RUN/evaluations/CHECKPOINT__PROMPTS__seedN/.
It runs in one process: it does not split the prompts across torchrun's processes, and refuses to run under it.
"""

import contextlib
import functools
import gc
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

import cli
import common
import rewards
import runs


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """a run folder (its newest complete checkpoint) or a checkpoint folder RUN/checkpoints/epoch_N"""
    rewards: Optional[str] = None
    """rewards to score with, NAME,NAME,...: jpeg_compressibility, jpeg_incompressibility, shapes, color, aesthetic,
    pickscore, hpsv2, imagereward, clipscore, blip_vqa (default: the rewards the run trained on)"""
    reward_weights: Optional[str] = None
    """local weights of learned rewards, NAME=PATH,... (default: each from the hub; the README says what PATH is)"""
    prompts: Optional[str] = None
    """a prompt set in prompts/ or a text file, one prompt per line (default: the run's held-out set, its
    prompts/NAME_eval.txt, where its --prompts has one; else its own prompts, which it trained on)"""
    images_per_prompt: Optional[int] = None
    """noise samples per prompt, each sampled before and after (default: 4, or more so that the prompts get at least
    32 images, as the scripts' own evaluation)"""
    seed: int = 0
    """seed of the evaluation noise (not the run's: checkpoints evaluated with one seed see the same noise)"""
    num_steps: Optional[int] = None
    """sampling steps (default: the run's --num-steps)"""
    guidance: Optional[float] = None
    """classifier-free guidance scale (default: the run's --guidance)"""
    eta: Optional[float] = None
    """DDIM eta, or on an SD 3.x model the noise level of Flow-GRPO's SDE; 0 samples deterministically (default: the
    sampler of the run's own evaluation: its --eval-eta where set, 0 on SD 3.x as Flow-GRPO, else its --eta)"""
    resolution: Optional[int] = None
    """image side in pixels (default: the run's --resolution, else the model family's default)"""
    batch_size: int = 8
    """images per sampling call and per reward call"""
    grid_prompts: int = 2
    """prompts in pairs.png at each end: the largest and the smallest mean change of the ranked reward (the trained
    one where it is scored, else the first)"""
    out_dir: Optional[str] = None
    """where to write table.md, scores.json and pairs.png (default: RUN/evaluations/CHECKPOINT__PROMPTS__seedN)"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda if available)"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """frozen weights and activations in this dtype (auto: fp16 on GPU, as the scripts)"""


JUDGE = "judge"  # the shapes world's strict judge, scored where the model is the shapes world's
SAMPLER = ("num_steps", "guidance", "eta")  # the sampler's flags, read from the checkpoint unless given
EVAL_STREAM = -2  # the noise's key, apart from the scripts' epochs (>= 0) and their own evaluation (-1)


# ----------------------------------------------------------------------------------------------------
# Fixed noise, and the paired statistics
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_set(pipe, prompts, neg, *, num_steps: int, guidance: float, eta: float, seed: int, key: int = 0,
               first: int = 0):
    """Samples of `prompts` from fixed noise: image i draws x_T, then its steps' noise, from a generator keyed by
    (seed, EVAL_STREAM, key, first + i), so every model, batch split and step count sees the same x_T."""
    embeds = common.encode_prompts(pipe, prompts)
    gens = [common.generator(embeds.device, seed, EVAL_STREAM, key, first + i) for i in range(len(prompts))]
    side = common.latent_side(pipe)  # at the resolution load_pipeline was given
    shape = (len(prompts), common.denoiser(pipe).config.in_channels, side, side)
    x_T = common.draw_noise(shape, gens, embeds.device)
    return common.sample(pipe, embeds, neg, num_steps=num_steps, guidance=guidance, eta=eta, generator=gens,
                         latents=x_T), embeds


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom: the density integrated by Simpson's rule (2,000
    intervals on [0, |x|], exact to about 1e-9 for df >= 1 and |x| < 100)."""
    import numpy as np

    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    u = np.linspace(0.0, abs(x), 2001)
    f = c * (1 + u**2 / df) ** (-(df + 1) / 2)
    half = (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(half, x)


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection on t_cdf
    (t_0.975 with 4 degrees of freedom: 2.7764)."""
    low, high = 0.0, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired(before: torch.Tensor, after: torch.Tensor) -> dict:
    """Means before and after, and the mean paired difference d = after - before over the n (prompt, noise) pairs
    with its 95% t interval, mean(d) -+ t_{0.975, n-1} std(d) / sqrt(n). Given the prompts, the n differences are
    independent (each pair has its own noise); pooling them into one variance counts the spread between prompts'
    mean changes as noise too, so for this fixed set of prompts the interval is if anything wide; it does not say
    how another set of prompts would fare. The win rate is the share of pairs with after > before (a tie is no win)."""
    d = after.double() - before.double()
    n, mean = d.numel(), d.mean().item()
    half = t_quantile(0.975, n - 1) * d.std().item() / math.sqrt(n) if n > 1 else math.nan
    return dict(n=n, before=before.double().mean().item(), after=after.double().mean().item(), diff=mean,
                low=mean - half, high=mean + half, win_rate=(after > before).double().mean().item())


def table(summary: dict, trained: set) -> str:
    """The markdown table: one row per reward, the trained ones marked. Another reward whose whole interval lies
    below 0 is flagged as possible reward hacking where the trained reward rose (or was not scored); where it did
    not rise, it is only `lower`: the run learned nothing to trade it for."""
    rose = all(summary[name]["diff"] > 0 for name in trained)
    lines = ["| reward | before | after | after - before [95% interval] | win rate | note |",
             "|---|---:|---:|---|---:|---|"]
    for name, s in summary.items():
        lower = "possible reward hacking" if rose else "lower"
        note = "trained" if name in trained else lower if s["high"] < 0 else ""
        label = "judge (both objects right)" if name == JUDGE else name + " *" * (name in trained)
        lines.append(f"| {label} | {s['before']:.4g} | {s['after']:.4g} | {s['diff']:+.3g} [{s['low']:+.3g}, "
                     f"{s['high']:+.3g}] | {s['win_rate']:.0%} | {note} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# What to evaluate: the run's record, its prompts and rewards, all checked before anything loads
# ----------------------------------------------------------------------------------------------------


def read_run(path: str) -> tuple:
    """(checkpoint folder, its record: script, shape flags, experiment, prompt source); one line if there is none."""
    checkpoint, state = runs.find_checkpoint(path)
    record = state.get("record")
    if not isinstance(record, dict) or "experiment" not in record:
        cli.fail(f"{str(checkpoint)!r} does not record the script and flags that wrote it (an older version), so "
                    f"its model and sampler are unknown; evaluate a checkpoint written by this version")
    return checkpoint, record


def choose_prompts(args: Args, record: dict) -> tuple:
    """(label, distinct prompts in file order): --prompts, or the run's held-out set as its script evaluates it."""
    if args.prompts is None:
        flag, _, value = record.get("prompt_source", "").partition(" ")
        if flag == "--prompt-file":
            name, path = Path(value).stem, value
        elif flag == "--prompts":  # as common.load_eval_prompts chooses, with all of the set's prompts
            name, path = (f"{value}_eval" if f"{value}_eval" in common.prompt_sets() else value), None
        else:
            cli.fail(f"{record.get('prompt_source')!r}: the checkpoint does not say which prompts it trained on; "
                        f"pass --prompts")
    elif args.prompts in common.prompt_sets():
        name, path = args.prompts, None
    elif Path(args.prompts).is_file():
        name, path = Path(args.prompts).stem, args.prompts
    else:
        cli.fail(f"--prompts {args.prompts}: neither a prompt set ({', '.join(common.prompt_sets())}) nor a file")
    return name, list(dict.fromkeys(common.load_prompts(name, path)))


def choose_rewards(args: Args, record: dict, prompts: list) -> tuple:
    """(names, the trained ones, {name: local weights}), every name known and able to score the prompts."""
    spec = record["experiment"].get("reward", "")
    trained = {name for name, weight in rewards.parse_spec(spec) if weight != 0} if spec else set()
    names = [name.strip() for name in (args.rewards if args.rewards is not None else spec).split(",")]
    for name in names:
        if name not in rewards.REWARDS:
            cli.fail(f"--rewards: unknown reward {name!r}; choose from {', '.join(rewards.REWARDS)}, e.g. "
                        f"--rewards aesthetic,pickscore")
    if len(set(names)) < len(names):
        cli.fail(f"--rewards {args.rewards}: a reward appears twice; give each once")
    weights = rewards.parse_weights(args.reward_weights, names)
    for name in names:  # the prompt checks the scripts run (rewards.make), before any reward or model loads
        if rewards.REWARDS[name].prompts is not None:
            rewards._resolve(rewards.REWARDS[name].prompts)(prompts)
    return names, trained & set(names), weights


def sampler(args: Args, record: dict) -> dict:
    """The sampler of the run's own evaluation, each flag unless overridden: its --num-steps and --guidance, and as
    --eta its --eval-eta where the run set one (SD 3.x: 0, the ODE, as Flow-GRPO evaluates), else its --eta. Checked
    by the scripts' rules, --eta by the evaluation's (0 allowed: no log-probabilities are needed here)."""
    values = {}
    experiment = record["experiment"]
    rules = {**cli.FLAG_RULES, "eta": cli.ETA_RULES[runs.model_family(record["flags"]["model"])]["eval_eta"]}
    for name in SAMPLER:
        flag = "--" + name.replace("_", "-")
        value = getattr(args, name)
        if value is None:
            value = experiment.get("eval_eta") if name == "eta" and experiment.get("eval_eta") is not None else \
                experiment.get(name)
        requirement, ok = rules[name]
        if value is None:
            cli.fail(f"the checkpoint does not record {flag}; pass {flag}")
        if not ok(value):
            cli.fail(f"{flag} {value}: must be {requirement}")
        values[name] = value
    resolution = args.resolution if args.resolution is not None else record["experiment"].get("resolution")
    requirement, ok = cli.FLAG_RULES["resolution"]
    if not ok(resolution):
        cli.fail(f"--resolution {resolution}: must be {requirement}")
    values["resolution"] = resolution
    return values


if __name__ == "__main__":
    args = tyro.cli(Args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cli.fail("evaluate.py runs in one process and does not split the prompts across torchrun's processes; run "
                    "it with python")
    checkpoint, record = read_run(args.checkpoint)
    label, prompts = choose_prompts(args, record)
    names, trained, weights = choose_rewards(args, record, prompts)
    model, lora_rank = record["flags"]["model"], record["flags"]["lora_rank"]
    judged = model in (common.SHAPES, common.SHAPES_FLOW)  # the shapes world: its judge scores every image too
    if judged:
        import world

        world.parse_all(prompts)
    sample_kw = sampler(args, record)
    per_prompt = args.images_per_prompt
    if per_prompt is None:
        per_prompt = max(4, math.ceil(common.EVAL_IMAGES / len(prompts)))
    for flag, value in (("--images-per-prompt", per_prompt), ("--batch-size", args.batch_size)):
        if value < 1:
            cli.fail(f"{flag} {value}: must be an integer >= 1 (no images, nothing to compare)")
    if args.grid_prompts < 0:
        cli.fail(f"--grid-prompts {args.grid_prompts}: must be an integer >= 0 (0 draws no grid)")
    home = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else Path("runs")
    out = Path(args.out_dir or home / "evaluations" / f"{checkpoint.name}__{label}__seed{args.seed}")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        cli.fail(f"cannot write {str(out)!r}: {str(parent)!r} is not a writable folder; choose another --out-dir")
    texts = [p for p in prompts for _ in range(per_prompt)]  # prompt-major: pair i * per_prompt + j is prompt i's j-th
    runs.print0(f"{checkpoint} ({record['script']}.py, --model {model}): {len(prompts)} prompt(s) ({label}) x "
                  f"{per_prompt} noise samples = {len(texts)} pairs; " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                                    for k, v in sample_kw.items()))

    # SAMPLING: the pretrained model, then the fine-tuned one, from the same noise
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = common.resolve_precision(args.mixed_precision, device)
    common.speed_flags(device)
    resolution = sample_kw.pop("resolution")  # checked against the model's VAE and patch size once it loads
    pipe = common.load_pipeline(model, device, precision, lora_rank=lora_rank, lora_alpha=record["flags"]["lora_alpha"],
                                resolution=resolution)
    denoiser = common.denoiser(pipe).eval()
    if lora_rank > 0:  # the pretrained model is the same one with its adapters off
        runs.load_checkpoint(checkpoint, denoiser)
    neg = common.encode_prompts(pipe, [""])
    images = {}  # "before"/"after" -> (N, 3, H, W) uint8 on the CPU, as saved images are: a quarter of float32's memory
    bar = runs.progress(total=2 * len(texts), desc="sampling")
    for when in ("before", "after"):
        if when == "after" and lora_rank == 0:  # a fully fine-tuned UNet: its weights replace the pretrained ones now
            runs.load_checkpoint(checkpoint, denoiser)
        batches = []
        for lo in range(0, len(texts), args.batch_size):
            batch = texts[lo : lo + args.batch_size]
            off = common.adapters_disabled(denoiser) if when == "before" and lora_rank > 0 else contextlib.nullcontext()
            with off, common.autocast(device, precision):
                traj, _ = sample_set(pipe, batch, neg, **sample_kw, seed=args.seed, first=lo)
            batches.append((traj.images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            bar.update(len(batch))
        images[when] = torch.cat(batches)
    bar.close()
    del pipe, denoiser, traj
    gc.collect()
    torch.cuda.empty_cache()

    # REWARDS: each reward model loaded in turn and freed before the next
    scores = {}  # name -> {"before": (N,), "after": (N,)}
    for name in names:
        reward_fn = runs.CheckedReward(rewards.load(name, device, weights.get(name)), name)
        scores[name] = {}
        for when in ("before", "after"):
            chunks = []
            for lo in runs.progress(range(0, len(texts), args.batch_size), desc=f"{name} ({when})", leave=False):
                batch = images[when][lo : lo + args.batch_size].to(device).float() / 255
                chunks.append(reward_fn(batch, texts[lo : lo + args.batch_size]).cpu())
            scores[name][when] = torch.cat(chunks)
        del reward_fn
        gc.collect()
        torch.cuda.empty_cache()
    if judged:
        scores[JUDGE] = {when: world.judge(images[when].float() / 255, texts).float() for when in ("before", "after")}

    # LOGGING: the table, every score, and the pairs of the prompts that changed most and least
    summary = {name: paired(s["before"], s["after"]) for name, s in scores.items()}
    text = table(summary, trained)
    header = (f"{checkpoint}: {len(texts)} pairs ({len(prompts)} prompt(s) of {label} x {per_prompt} noise samples, "
              f"--seed {args.seed}), " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sample_kw.items()))
    runs.print0(f"{header}\n\n{text}\n\n* trained reward; possible reward hacking: a reward not trained on whose "
                  f"whole 95% interval lies below 0, while the trained reward rose")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{header}\n\n{text}\n")
    result = dict(checkpoint=str(checkpoint), script=record["script"], model=model, sampler=sample_kw, seed=args.seed,
                  prompts=label, images_per_prompt=per_prompt, trained=sorted(trained), summary=summary,
                  pairs=[dict(prompt=p, noise=i % per_prompt) for i, p in enumerate(texts)],
                  scores={name: {when: v.tolist() for when, v in s.items()} for name, s in scores.items()})
    (out / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
    ranked = next((name for name in names if name in trained), names[0])
    change = (scores[ranked]["after"] - scores[ranked]["before"]).view(len(prompts), per_prompt)  # (P, I)
    order = change.mean(1).argsort(descending=True).tolist()
    shown = list(dict.fromkeys(order[: args.grid_prompts] + order[::-1][: args.grid_prompts]))
    if shown:
        cols = min(per_prompt, 4)
        idx = [i * per_prompt + j for i in shown for j in range(cols)]
        grid = torch.stack([images[when][k] for k in idx for when in ("before", "after")]).float() / 255
        captions = [f"{when} {scores[ranked][when][k].item():.3g}" + (
            f": {texts[k]}" if when == "before" else f" ({ranked} {change.view(-1)[k].item():+.3g})")
            for k in idx for when in ("before", "after")]
        runs.image_grid(grid, captions, ncols=2 * cols).save(out / "pairs.png")
    runs.print0(f"wrote {out / 'table.md'}, {out / 'scores.json'}" + (f", {out / 'pairs.png'}" if shown else ""))
