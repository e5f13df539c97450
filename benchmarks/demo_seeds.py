"""The README's main job at many seeds: eval reward and the fraction of eval samples judged right, before and after.

It runs the README's command exactly as written there (read from README.md), adding only `--seed S`, `--run-name` and
`--output-dir`, then re-samples the run's 32 fixed-noise eval images with the pretrained model and with the final
LoRA checkpoint and asks `world.judge` (exactly the named objects, each of the named shape) of each.

    python benchmarks/demo_seeds.py                          # seeds 42 and 1-9, two runs at a time (docs/world.md)
    python benchmarks/demo_seeds.py --seeds 42 7 --jobs 1    # two seeds, one run at a time with 2 threads
    python benchmarks/demo_seeds.py --extra="--learning-rate 1e-3"  # the job with other flags (calibration)

A finished run (its final checkpoint exists) is not rerun; delete its folder to redo it.
"""

import os
import re
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    seeds: tuple[int, ...] = (42, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    """the seeds to run (42 is the scripts' default)"""
    out: str = str(ROOT / "runs" / "demo_seeds")
    """where the runs go"""
    jobs: int = 2
    """runs at once; each gets 2 // jobs torch threads (at least 1)"""
    extra: str = ""
    """flags that replace or add to the README's, as one string (calibration: `--extra="--learning-rate 1e-3"`; the
    table then is not the README job's)"""


def readme_command() -> list:
    """The main job's `python loop.py ...` arguments, as the README's set-up command has them."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"&& python (loop\.py --model shapes [^\n`]*)", text)
    if match is None:
        sys.exit("error: README.md has no `&& python loop.py --model shapes ...` command")
    return shlex.split(match.group(1))


def flag(argv: list, name: str) -> str:
    return argv[argv.index(name) + 1]


def run(seed: int, args: Args, argv: list) -> Path:
    run_dir = Path(args.out) / f"seed{seed}"
    epochs = int(flag(argv, "--num-epochs"))
    if (run_dir / "checkpoints" / f"epoch_{epochs:04d}").exists():
        return run_dir
    argv = [a for i, a in enumerate(argv) if a != "--run-name" and (i == 0 or argv[i - 1] != "--run-name")]
    threads = str(max(1, 2 // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, *argv, "--seed", str(seed), "--output-dir", args.out, "--run-name", f"seed{seed}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: seed {seed} failed:\n{proc.stderr[-2000:]}")
    return run_dir


def judged(run_dir: Path, seed: int, argv: list) -> dict:
    """Eval reward and judged-right fraction before (adapters off) and after (the final checkpoint)."""
    import torch

    import common
    import rewards
    import runs
    import world

    torch.set_num_threads(2)
    epochs = int(flag(argv, "--num-epochs"))
    pipe = common.load_pipeline("shapes", lora_rank=4, seed=seed)
    runs.load_checkpoint(run_dir / "checkpoints" / f"epoch_{epochs:04d}", pipe.unet)
    prompts = common.load_eval_prompts(flag(argv, "--prompts"), None)
    reward = rewards.make(flag(argv, "--reward"), "cpu")
    neg = common.encode_prompts(pipe, [""])
    kw = dict(num_steps=int(flag(argv, "--num-steps")), guidance=5.0, eta=1.0, seed=seed)
    out = {}
    for tag in ("before", "after"):
        with common.adapters_disabled(pipe.unet) if tag == "before" else torch.no_grad():
            images, rewards = common.evaluate(pipe, prompts, reward, neg, **kw)
        out[tag] = (rewards.mean().item(), world.judge(images, prompts).float().mean().item())
    return out


def with_flags(argv: list, extra: list) -> list:
    """argv with each `--flag value` of extra replacing the same flag's value, or appended."""
    argv = list(argv)
    for name, value in zip(extra[::2], extra[1::2]):
        if name in argv:
            argv[argv.index(name) + 1] = value
        else:
            argv += [name, value]
    return argv


def check(args: Args) -> list:
    """The extra flags as a list, after checking the arguments (one line each)."""
    if args.jobs < 1 or not args.seeds:
        sys.exit(f"error: --jobs {args.jobs} and --seeds {' '.join(map(str, args.seeds)) or '(none)'}: give at least "
                 f"one seed and --jobs >= 1")
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        sys.exit(f"error: --extra {args.extra!r}: {e}")
    if len(extra) % 2 or any(not name.startswith("--") for name in extra[::2]):
        sys.exit(f"error: --extra {args.extra!r}: give pairs of a flag and its value, "
                 f"e.g. --extra='--learning-rate 1e-3'")
    fixed = [name for name in extra[::2] if name in ("--guidance", "--eta", "--output-dir", "--run-name", "--seed")]
    if fixed:
        sys.exit(f"error: --extra {args.extra!r}: {fixed[0]} is fixed here (the judged table samples with guidance 5 "
                 f"and eta 1; --out and --seeds place the runs)")
    return extra


def main(args: Args):
    argv = with_flags(readme_command(), check(args))
    print("README job:" if not args.extra else "README job with changes:", " ".join(argv))
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(args.seeds, pool.map(lambda s: run(s, args, argv), args.seeds)))
    rows = {seed: judged(d, seed, argv) for seed, d in dirs.items()}
    print("\n| seed | eval reward before -> after | gain | judged right before -> after | gain |"
          "\n|---|---|---|---|---|")
    for seed, r in rows.items():
        (rb, jb), (ra, ja) = r["before"], r["after"]
        print(f"| {seed} | {rb:.3f} -> {ra:.3f} | {ra - rb:+.3f} | {jb:.0%} -> {ja:.0%} | {ja - jb:+.0%} |")
    gains = [r["after"][0] - r["before"][0] for r in rows.values()]
    jgains = [r["after"][1] - r["before"][1] for r in rows.values()]
    print(f"\nreward gain: mean {statistics.mean(gains):+.3f}, min {min(gains):+.3f}, max {max(gains):+.3f}; "
          f"seeds gaining >= 0.15: {sum(g >= 0.15 for g in gains)} of {len(gains)}")
    print(f"judged-right gain: mean {statistics.mean(jgains):+.0%}, min {min(jgains):+.0%}, max {max(jgains):+.0%}; "
          f"seeds gaining >= 25 points: {sum(g >= 0.25 - 1e-9 for g in jgains)} of {len(jgains)}")
    before = [r["before"][1] for r in rows.values()]
    after = [r["after"][1] for r in rows.values()]
    print(f"judged right: before {statistics.mean(before):.0%} (range {min(before):.0%}-{max(before):.0%}), "
          f"after {statistics.mean(after):.0%} (range {min(after):.0%}-{max(after):.0%})")


if __name__ == "__main__":
    main(tyro.cli(Args))
