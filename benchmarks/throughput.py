"""Images per second of the scripts on the shapes world, at HEAD against an earlier commit, on this machine.

Two settings, each a few epochs of a real run (a subprocess of the script, as a user runs it, without evaluations
or checkpoints):
- `readme`: the README's main job (loop.py, 32 images an epoch in one sampling call, minibatches of 16, 10 steps);
- `study`: benchmarks/study.py's single-prompt setting (every configuration there, 16 images an epoch, minibatches of
8).

Each runs at the given ref (checked out into a temporary git worktree, so its own code and model) and at the working
tree, alternately, `--repeats` times. It prints, per setting, the median over epochs of the scripts' own
`charts/images_per_sec` (sampling, reward and training of an epoch; the first epoch, which warms up, is left out)
and the whole run's images per wall-clock second including start-up, for both, and their ratio.

    python benchmarks/throughput.py                      # against the commit before --timesteps-per-call
    python benchmarks/throughput.py --ref HEAD~3 --epochs 6 --threads 1
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass
class Args:
    ref: str = "0873d40"
    """the git ref to compare with (its scripts and model, in a temporary worktree; default: the commit before
    --timesteps-per-call)"""
    settings: tuple[str, ...] = ("readme", "study")
    """which settings to measure: readme, study"""
    methods: tuple[str, ...] = ("loop_k4",)
    """study.py configurations measured in the `study` setting (its names: reinforce_k4, ppo_k1, dpok, ...)"""
    epochs: int = 4
    """epochs per run (the first is left out of the per-epoch figure)"""
    repeats: int = 1
    """runs of each (ref, HEAD) pair, alternating"""
    threads: int = 2
    """torch threads of each run (OMP_NUM_THREADS)"""


def commands(args: Args) -> dict:
    """setting name -> the script's argv (script file first), without --output-dir and --run-name."""
    import demo_seeds
    import study

    readme = demo_seeds.with_flags(demo_seeds.readme_command(), [
        "--num-epochs", str(args.epochs), "--image-every", "0", "--save-every", "0"])
    out = {}
    if "readme" in args.settings:
        out["readme"] = readme
    for name in args.methods if "study" in args.settings else ():
        run = study.Run(name, 1, *study.CONFIGS[name], dir=Path(), epochs=args.epochs, images_per_epoch=16)
        argv = study.experiment(run, study.Args(prompts="shapes_demo", learning_rate=3e-3, images=16 * args.epochs,
                                                  eval_every=args.epochs))
        out[f"study {name}"] = demo_seeds.with_flags(argv, ["--image-every", "0"])
    return out


def measure(tree: Path, argv: list, threads: int, out: Path) -> tuple:
    """(median images/s over epochs 2.., whole-run images per wall-clock second) of one run in `tree`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run_dir = Path(tempfile.mkdtemp(dir=out))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(tree / argv[0]), *argv[1:], "--output-dir", str(run_dir.parent),
                           "--run-name", run_dir.name], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {argv[0]} in {tree} failed: {proc.stderr.strip().splitlines()[-1:]}")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    per_epoch = [e.value for e in acc.Scalars("charts/images_per_sec")][1:]
    images = int(argv[argv.index("--sample-batch-size") + 1]) * int(argv[argv.index("--num-batches-per-epoch") + 1])
    return statistics.median(per_epoch), images * len(per_epoch + [0]) / seconds


def main(args: Args):
    if args.epochs < 2 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("error: --epochs must be at least 2 (the first warms up), --repeats and --threads at least 1")
    import study

    unknown = [name for name in args.methods if name not in study.CONFIGS] + [
        name for name in args.settings if name not in ("readme", "study")]
    if unknown:
        raise SystemExit(f"error: {unknown[0]} is neither a setting (readme, study) nor a study configuration "
                         f"({', '.join(study.CONFIGS)})")
    sha = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"error: --ref {args.ref}: not a commit of this repository ({sha.stderr.strip()})")
    runs = commands(args)
    print(f"ref {args.ref} ({sha.stdout.strip()}) against the working tree; {args.epochs} epochs, {args.threads} "
          f"thread(s), {args.repeats} repeat(s); load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.ref], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            results = {name: {"ref": [], "head": []} for name in runs}
            for _ in range(args.repeats):
                for name, argv in runs.items():
                    for which, where in (("ref", tree), ("head", ROOT)):
                        results[name][which].append(measure(where, argv, args.threads, Path(tmp)))
                        epoch, whole = results[name][which][-1]
                        print(f"  {name} at {which}: {epoch:.2f} images/s per epoch, {whole:.2f} whole run", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    print("\n| setting | ref images/s | HEAD images/s | ratio | ref whole run | HEAD whole run | ratio |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ref, head = ([statistics.median(x[i] for x in r[w]) for i in (0, 1)] for w in ("ref", "head"))
        print(f"| {name} | {ref[0]:.2f} | {head[0]:.2f} | {head[0] / ref[0]:.2f}x | {ref[1]:.2f} | {head[1]:.2f} | "
              f"{head[1] / ref[1]:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
