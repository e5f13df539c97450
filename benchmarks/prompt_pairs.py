"""How well the pretrained shapes model binds each training pair, and the many-prompt study's prompt set.

Samples --images fixed-noise images of each of the 60 training pairs (prompts/shapes.txt) at 10 DDIM steps and
guidance 5 (the study's sampling), and prints per pair the mean shapes reward, its spread over the samples and the
share `world.judge` calls right. It then picks the study's task (prompts/shapes_study.txt): the --count pairs
judged right least often, among those judged right at most --max-judged of the time whose reward spread is at least
--min-spread, ties broken by the lower mean reward. The spread is the condition a policy gradient needs: a pair the
model draws the same way every time (nearly always wrong) gives every sample of it the same reward and leaves no
advantage to learn from; the pretrained model draws most of the worst pairs so (prompts/shapes_hard.txt, on which
no setting learned: docs/world.md).

    python benchmarks/prompt_pairs.py       # the table, the chosen 8, and whether prompts/shapes_study.txt holds them

The file lists them in an order of its own (the order it was written in when the study ran); the runs' prompt draws
are indices into it, so the order is part of the study's setting and is not rewritten here.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import world  # noqa: E402

STREAM = -3  # the noise's key, apart from the scripts' epochs and evaluations and benchmarks/evaluate.py's


@dataclass
class Args:
    images: int = 24
    """fixed-noise samples of each pair"""
    seed: int = 123
    """seed of the noise"""
    count: int = 8
    """pairs to choose"""
    max_judged: float = 0.25
    """a chosen pair is judged right at most this share of its samples"""
    min_spread: float = 0.3
    """a chosen pair's reward has at least this standard deviation over its samples"""
    threads: Optional[int] = None
    """torch threads (default: torch's)"""


@torch.no_grad()
def main(args: Args):
    if args.images < 2 or args.count < 1:
        cli.fail("--images must be at least 2 (a spread needs two samples) and --count at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = common.load_pipeline("shapes", "cpu")
    neg = common.encode_prompts(pipe, [""])
    c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    rows = []
    for j, prompt in enumerate(common.load_prompts("shapes")):
        prompts = [prompt] * args.images
        gens = [common.generator("cpu", args.seed, STREAM, j, i) for i in range(args.images)]
        x_T = common.draw_noise((args.images, c, h, h), gens, "cpu")
        traj = common.sample(pipe, common.encode_prompts(pipe, prompts), neg, num_steps=10, guidance=5.0, eta=1.0,
                             generator=gens, latents=x_T)
        reward = world.reward(traj.images, prompts)
        judged = world.judge(traj.images, prompts).float().mean().item()
        rows.append((prompt, reward.mean().item(), reward.std().item(), judged))
    print("| pair | reward | spread | judged right |\n|---|---|---|---|")
    for prompt, mean, spread, judged in rows:
        print(f"| {prompt} | {mean:.3f} | {spread:.3f} | {judged:.0%} |")
    eligible = [r for r in rows if r[3] <= args.max_judged and r[2] >= args.min_spread]
    chosen = sorted(eligible, key=lambda r: (r[3], r[1]))[:args.count]
    if len(chosen) < args.count:
        cli.fail(f"only {len(chosen)} pairs meet --max-judged {args.max_judged} and --min-spread {args.min_spread}")
    mean = lambda i: sum(r[i] for r in chosen) / len(chosen)
    print(f"\nchosen {len(chosen)} of {len(eligible)} eligible: reward {mean(1):.3f}, judged right {mean(3):.0%} "
          f"(all 60: {sum(r[1] for r in rows) / len(rows):.3f}, {sum(r[3] for r in rows) / len(rows):.0%})")
    for prompt, *_ in chosen:
        print(prompt)
    study = common.load_prompts("shapes_study")
    same = sorted(study) == sorted(r[0] for r in chosen)
    print(f"prompts/shapes_study.txt {'holds these pairs' if same else 'holds other pairs: ' + '; '.join(study)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
