"""The efficiency-effectiveness study (LOOP's central experiment) on the pretrained shapes world, on a CPU.

Every method runs as a user runs it (a subprocess of its script, same flags where they mean the same thing)
at the same budget of generated images, over several seeds. From the runs' TensorBoard events it writes a CSV
of every evaluation and the figures: eval reward against images seen and against wall-clock (mean and a 95%
bootstrap band over seeds, one line per method), LOOP's final reward against K, DPOK's reward against its KL over
beta, and Score as Action's and PPO's gains at other step counts. After each run it evaluates the final checkpoint
against the pretrained model on the same noise (benchmarks/evaluate.py) and writes final.csv and, in table.md,
every configuration's paired gains and each paper's claims as paired differences with 95% bootstrap intervals and a
verdict.

    python benchmarks/study.py                  # the many-prompt study: benchmarks/study/ (docs/benchmarks.md)
    python benchmarks/study.py --prompts shapes_demo --images 320 --learning-rate 3e-3 --eval-every 4 \
        --out benchmarks/study_one_prompt       # the single-prompt study (DPOK's single-prompt claims)
    python benchmarks/study.py --quick          # a smoke test of the whole pipeline in a few minutes
    python benchmarks/study.py --jobs 1         # one run at a time (2 threads each) instead of two (1 each)

A run's folder is named by its configuration, its seed and a hash of its full command line, which done.json
records: a rerun reuses a finished run only when the command it would run now is the same, and a run made with other
flags (a different --num-steps, say) sits in a folder of its own and is never mixed into the table. An interrupted
run starts over. Stopping the study (Ctrl-C, SIGTERM) stops the runs it started before it exits.
"""

import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evaluate import t_quantile  # noqa: E402 - the top-level evaluate.py's Student's t quantile


@dataclass
class Args:
    out: str = str(ROOT / "benchmarks" / "study")
    """where the CSV, the figures and the table go (the runs go to OUT/runs)"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """seeds of every configuration"""
    methods: Optional[tuple[str, ...]] = None
    """run only these configurations (names as in the table), e.g. loop_k4 ppo_k1 (default: all)"""
    prompts: str = "shapes_study"
    """the training prompt set, also the set of the in-run evaluations (32 fixed-noise samples) and of the final
    reward gain: shapes_study (8 pairs the pretrained model binds poorly, the many-prompt task) or shapes_demo (one
    prompt, the single-prompt study: docs/benchmarks.md gives both commands)"""
    images: int = 1600
    """budget of generated training images per run"""
    images_per_epoch: int = 16
    """images sampled per epoch (a multiple of 16)"""
    learning_rate: float = 1e-3
    """every method's learning rate (DPOK's flags set its own, 1e-3)"""
    eval_every: int = 10
    """epochs between evaluations (32 fixed prompts and noise)"""
    num_steps: int = 10
    """DDIM steps of sampling and training"""
    jobs: int = 2
    """runs at once; each gets 2 // jobs torch threads (at least 1)"""
    heldout: str = "shapes_eval"
    """prompt set of the final evaluation's generalisation figure (prompts never trained on)"""
    final_images: int = 128
    """fixed-noise samples of each prompt set in the final evaluation (benchmarks/evaluate.py)"""
    robustness_steps: tuple[int, ...] = (5, 20, 50)
    """step counts the final evaluation adds for score_as_action and ppo_k1 (trained at --num-steps)"""
    device: Optional[str] = None
    """cuda or cpu for every run and final evaluation (default: theirs, cuda if available)"""
    quick: bool = False
    """smoke test: two configurations, one seed, 32 images, 5 DDIM steps"""
    target_gain: float = 0.1
    """a run reaches its target at the first in-run evaluation after training began that is this much above its own
    evaluation before training (the same prompts and noise for every configuration at a seed)"""


# One line per configuration: the script and the flags that make it that method. Shared by all: 16 images an
# epoch, guidance 5 (the pretrained model's; DPOK's and Score as Action's own defaults are 7.5 and 7), --learning-rate
# (1e-3; DPOK's flags set 1e-3 whatever it is), and for the clipped methods minibatches of 8 with one optimiser step
# each and clip 1e-2 (the learning tests' calibrated setting, docs/world.md: the 256-dimensional latent makes SD's
# 1e-4 far too tight).
CLIPPED = ["--train-batch-size", "8", "--gradient-accumulation-steps", "1", "--clip", "1e-2"]
# DPOK: a buffer of 5 epochs of transitions (800) so that V_phi, fitted first on the buffer, cannot memorise the
# current epoch's rewards (with a one-epoch buffer it explained 97% of their variance and left no advantage), 2
# policy steps of 64 transitions each, and learning rate 1e-3 (3e-3 also learns, less steadily: docs/world.md).
DPOK = ["--buffer-size", "800", "--num-value-steps", "5", "--num-policy-steps", "2", "--train-batch-size", "16",
        "--gradient-accumulation-steps", "4", "--num-value-batches", "1", "--value-learning-rate", "1e-3", "--clip", "1e-2",
        "--learning-rate", "1e-3"]
CONFIGS = {
    "reinforce_k4": ("reinforce", ["--k", "4", "--train-batch-size", "8"]),
    "ppo_k1": ("ppo", ["--k", "1", *CLIPPED]),
    "ppo_k4": ("ppo", ["--k", "4", *CLIPPED]),
    "loop_k2": ("loop", ["--k", "2", *CLIPPED]),
    "loop_k4": ("loop", ["--k", "4", *CLIPPED]),
    "loop_k8": ("loop", ["--k", "8", *CLIPPED]),
    "dpok": ("dpok", DPOK),  # beta 0.01, DPOK's single-prompt default
    "dpok_beta0": ("dpok", [*DPOK, "--beta", "0"]),  # no KL term: the policy gradient alone
    "dpok_beta0.1": ("dpok", [*DPOK, "--beta", "0.1"]),  # DPOK's multi-prompt beta
    "score_as_action": ("score_as_action", CLIPPED),
}
QUICK = ("loop_k4", "ppo_k1")
ROBUSTNESS = ("score_as_action", "ppo_k1")  # also evaluated at --robustness-steps (Score as Action's claim)

# The paired comparisons: (claim, metric, a, b); the difference a - b at each seed (same prompts and noise for both),
# and its bootstrap interval over the seeds. The claim holds in the direction a > b.
PAIRS = [
    ("LOOP K=4 beats PPO (DDPO, K=1): sample efficiency", "reward_gain", "loop_k4", "ppo_k1"),
    ("the leave-one-out baseline alone: LOOP K=4 beats PPO K=4", "reward_gain", "loop_k4", "ppo_k4"),
    ("more images per prompt alone: PPO K=4 beats PPO K=1", "reward_gain", "ppo_k4", "ppo_k1"),
    ("LOOP K=4 beats REINFORCE K=4 at equal compute", "reward_gain", "loop_k4", "reinforce_k4"),
    ("K: LOOP K=4 beats K=2", "reward_gain", "loop_k4", "loop_k2"),
    ("K: LOOP K=8 beats K=4", "reward_gain", "loop_k8", "loop_k4"),
    ("K: LOOP K=8 beats K=2", "reward_gain", "loop_k8", "loop_k2"),
    ("LOOP K=4 beats PPO K=1 in judged-right binding", "judged_gain", "loop_k4", "ppo_k1"),
    ("DPOK's KL term keeps the model closer to the pretrained one (KL, beta 0 minus 0.01)", "kl", "dpok_beta0", "dpok"),
    ("DPOK's KL term costs reward (gain, beta 0 minus 0.01)", "reward_gain", "dpok_beta0", "dpok"),
    ("DPOK's KL term protects prompts not trained (held-out gain, 0.01 minus beta 0)", "heldout_gain", "dpok", "dpok_beta0"),
    ("DPOK's KL term at beta 0.1 keeps the model closer (KL, beta 0 minus 0.1)", "kl", "dpok_beta0", "dpok_beta0.1"),
    ("DPOK's KL term at beta 0.1 costs reward (gain, beta 0 minus 0.1)", "reward_gain", "dpok_beta0", "dpok_beta0.1"),
    ("DPOK's KL term at beta 0.1 protects prompts not trained (held-out gain, 0.1 minus beta 0)", "heldout_gain",
     "dpok_beta0.1", "dpok_beta0"),
]
RESAMPLES = 10_000


@dataclass
class Run:
    name: str
    seed: int
    script: str
    flags: list
    dir: Path
    epochs: int
    images_per_epoch: int
    seconds: float = 0.0
    evals: list = field(default_factory=list)  # (epoch, images, seconds, reward, kl)
    metrics: dict = field(default_factory=dict)  # final_metrics of its final evaluation


def experiment(run: Run, args: Args) -> list:
    """The script and every flag of a run except where it writes: what makes two runs the same run."""
    batch = min(16, run.images_per_epoch)  # sampling batches of 16 (fewer only for an epoch of fewer images)
    return [f"{run.script}.py", "--model", "shapes", "--reward", "shapes", "--prompts", args.prompts,
            "--num-steps", str(args.num_steps), "--guidance", "5", "--learning-rate", repr(args.learning_rate),
            "--sample-batch-size", str(batch), "--num-batches-per-epoch", str(run.images_per_epoch // batch), *run.flags,
            "--num-epochs", str(run.epochs), "--image-every", str(args.eval_every), "--eval-num-steps", "--save-every",
            "0", "--seed", str(run.seed)]


def command(run: Run, args: Args) -> list:
    script, *flags = experiment(run, args)
    device = ["--device", args.device] if args.device else []
    return [sys.executable, str(ROOT / script), *flags, *device, "--output-dir", str(run.dir.parent), "--run-name",
            run.dir.name]


def run_folder(out: Path, run: Run, args: Args) -> Path:
    """OUT/runs/NAME__SEED__HASH, the hash of the run's experiment (its command line but for where it writes)."""
    key = hashlib.sha256(json.dumps(experiment(run, args)).encode()).hexdigest()[:8]
    return out / "runs" / f"{run.name}__{run.seed}__{key}"


def unet_rows_per_epoch(run: Run, args: Args) -> int:
    """UNet forward rows per epoch (a CFG call is 2 rows; backward passes not counted): sampling is
    images x steps x 2 for every method; training re-evaluates every trajectory step once with CFG (2 rows), except
    DPOK, which evaluates policy steps x accumulation x batch transitions, each also under the pretrained model for
    its KL term (4 rows)."""
    flag = lambda name: int(run.flags[run.flags.index(name) + 1])
    sampling = run.images_per_epoch * args.num_steps * 2
    if run.script == "dpok":
        return sampling + flag("--num-policy-steps") * flag("--gradient-accumulation-steps") * flag("--train-batch-size") * 4
    return sampling + run.images_per_epoch * args.num_steps * 2


def finished(run: Run, args: Args) -> bool:
    """The run's last checkpoint exists and done.json records the command it would run now."""
    try:
        done = json.loads((run.dir / "done.json").read_text())
    except (OSError, ValueError):
        return False
    return (run.dir / "checkpoints" / f"epoch_{run.epochs:04d}").exists() and \
        done.get("experiment") == experiment(run, args)


CHILDREN = set()  # the runs in progress (subprocess.Popen), stopped with the study
STOPPING = threading.Event()
STARTING = threading.Lock()  # held from the STOPPING check until the new child is in CHILDREN


def stop(signum, frame):
    """SIGINT or SIGTERM: stop the runs in progress (SIGTERM, then SIGKILL after 10 s), then exit 128 + signum. No run
    starts after this: a worker thread starts one only under STARTING, having checked STOPPING."""
    with STARTING:
        STOPPING.set()
        children = list(CHILDREN)
    for child in children:
        child.terminate()
    deadline = time.time() + 10
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    sys.stdout.flush()
    print(f"error: stopped by {signal.Signals(signum).name}, with the runs in progress; the finished runs are kept: "
          f"the same command continues the study", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def execute(run: Run, args: Args, threads: int, log) -> Run:
    if finished(run, args):
        run.seconds = json.loads((run.dir / "done.json").read_text())["seconds"]
        log(f"skip {run.dir.name} (finished)")
        return run
    shutil.rmtree(run.dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    with STARTING:
        if STOPPING.is_set():
            return run
        proc = subprocess.Popen(command(run, args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        CHILDREN.add(proc)
    _, err = proc.communicate()
    CHILDREN.discard(proc)
    if proc.returncode != 0:
        raise SystemExit(f"error: {run.dir.name} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    run.seconds = time.time() - t0
    (run.dir / "done.json").write_text(json.dumps({"seconds": run.seconds, "experiment": experiment(run, args),
                                                   "command": command(run, args)}))
    log(f"done {run.dir.name} in {run.seconds:.0f} s")
    return run


def final_eval_command(run: Run, args: Args) -> list:
    """benchmarks/evaluate.py on the run's last checkpoint: the trained prompts and the held-out set, before and after,
    on noise keyed by the run's seed (so every method at a seed is evaluated on the same samples' noise)."""
    steps = [args.num_steps, *(args.robustness_steps if run.name in ROBUSTNESS else ())]
    sets = list(dict.fromkeys([args.prompts, args.heldout]))
    return [sys.executable, str(ROOT / "benchmarks" / "evaluate.py"), str(run.dir), "--prompts", *sets,
            "--steps", *map(str, steps), "--kl-steps", str(args.num_steps), "--guidance", "5", "--images",
            str(args.final_images), "--seed", str(run.seed), "--out", str(run.dir / "final_eval.json")]


def final_eval(run: Run, args: Args, threads: int, log) -> dict:
    """The run's final evaluation, made once (final_eval.json records the command that made it)."""
    path = run.dir / "final_eval.json"
    cmd = final_eval_command(run, args)
    try:
        result = json.loads(path.read_text())
        if result.get("command") == cmd[1:]:
            return result
    except (OSError, ValueError):
        pass
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with STARTING:
        if STOPPING.is_set():
            return {}
        device = ["--device", args.device] if args.device else []
        proc = subprocess.Popen([*cmd, *device, "--threads", str(threads)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        CHILDREN.add(proc)
    _, err = proc.communicate()
    CHILDREN.discard(proc)
    if proc.returncode != 0:
        raise SystemExit(f"error: the final evaluation of {run.dir.name} failed ({proc.returncode}): "
                         f"{err.strip().splitlines()[-1:]}")
    result = json.loads(path.read_text())
    result["command"] = cmd[1:]
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"evaluated {run.dir.name}")
    return result


def final_metrics(run: Run, args: Args, result: dict) -> dict:
    """The paired figures of a run's final evaluation (after minus before on the same noise)."""
    def gain(name, steps, what):
        row = result["sets"][name][str(steps)]
        return row[f"{what}_after"] - row[f"{what}_before"]

    out = {"reward_gain": gain(args.prompts, args.num_steps, "reward"),
           "judged_gain": gain(args.prompts, args.num_steps, "judged"),
           "heldout_gain": gain(args.heldout, args.num_steps, "reward"),
           "heldout_judged_gain": gain(args.heldout, args.num_steps, "judged"),
           "reward_before": result["sets"][args.prompts][str(args.num_steps)]["reward_before"],
           "judged_before": result["sets"][args.prompts][str(args.num_steps)]["judged_before"],
           "kl": result.get("kl_to_pretrained", float("nan"))}
    for steps in (args.robustness_steps if run.name in ROBUSTNESS else ()):
        out[f"reward_gain_{steps}steps"] = gain(args.prompts, steps, "reward")
    return out


def bootstrap(values, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """(mean, low, high): the mean over seeds and its expanded-percentile bootstrap 95% interval (Hesterberg 2015,
    "What teachers should know about the bootstrap", section 4.3): the seeds are resampled with replacement and the
    interval is the alpha'/2 and 1 - alpha'/2 percentiles of the resampled means, with
    alpha'/2 = Phi(-sqrt(n / (n - 1)) t_{0.975, n-1}), which widens the plain percentile interval for the few seeds
    a study has. With 5 normal seeds the plain 95% percentile interval covered the mean 86.5% of the time (400
    simulations), this one 93.8%; unlike a bootstrap-t interval it stays within the values' range."""
    import numpy as np
    from statistics import NormalDist

    v = np.asarray(values, dtype=float)
    n = len(v)
    if n < 2 or v.min() == v.max():
        return float(v.mean()), float(v.mean()), float(v.mean())
    tail = NormalDist().cdf(-math.sqrt(n / (n - 1)) * t_quantile(0.975, n - 1))
    means = v[np.random.default_rng(seed).integers(0, n, (resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [100 * tail, 100 * (1 - tail)])
    return float(v.mean()), float(low), float(high)


MIN_SEEDS = 3  # fewer seeds give no verdict (a bootstrap over 1 or 2 values is no interval)


def verdict(low: float, high: float, seeds: int) -> str:
    """A claim that a - b > 0: established when the interval lies above 0, contradicted when below, else not."""
    if seeds < MIN_SEEDS:
        return f"no verdict ({seeds} seed{'s' * (seeds != 1)}; at least {MIN_SEEDS})"
    return "established" if low > 0 else "contradicted" if high < 0 else "not established"


def interval(mean: float, low: float, high: float, digits: int = 3, sign: str = "+", seeds: int = MIN_SEEDS) -> str:
    """`mean [low, high]`, or the mean alone below MIN_SEEDS seeds (no interval worth printing)."""
    if seeds < MIN_SEEDS:
        return f"{mean:{sign}.{digits}f} [n/a]"
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def images_to_target(evals: list, gain: float, budget: int) -> tuple:
    """(images at the first in-run evaluation after training began at or above the first evaluation + gain, reached?);
    a run that never reaches it counts as the budget (a lower bound: the interval of such a configuration understates
    its images)."""
    hit = [images for _, images, _, reward, _ in evals[1:] if reward >= evals[0][3] + gain]
    return (min(hit), True) if hit else (budget, False)


def final_tables(runs: list, args: Args) -> str:
    """The final evaluation's gains per configuration and the paired differences, with 95% bootstrap intervals."""
    names = list(dict.fromkeys(r.name for r in runs))
    by = {(r.name, r.seed): r for r in runs}
    lines = [f"| method | seeds | reward gain ({args.prompts}) (seeds > 0) | judged right: before -> gain | held-out reward gain "
             f"({args.heldout}) | KL to pretrained | images to +{args.target_gain:g} (reached) |", "|---|---|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in runs if r.name == name]
        m = [r.metrics for r in mine]
        reach = [images_to_target(r.evals, args.target_gain, args.images) for r in mine]
        judged_before = statistics.mean(x["judged_before"] for x in m)
        n = len(mine)
        gained = sum(x["reward_gain"] > 0 for x in m)
        lines.append(f"| {name} | {n} | {interval(*bootstrap([x['reward_gain'] for x in m]), seeds=n)} ({gained}/{n}) | "
                     f"{judged_before:.1%} -> {interval(*bootstrap([x['judged_gain'] for x in m]), seeds=n)} | "
                     f"{interval(*bootstrap([x['heldout_gain'] for x in m]), seeds=n)} | "
                     f"{interval(*bootstrap([x['kl'] for x in m]), digits=2, sign='', seeds=n)} | "
                     f"{interval(*bootstrap([i for i, _ in reach]), digits=0, sign='', seeds=n)} ({sum(ok for _, ok in reach)}/{len(mine)}) |")
    lines += ["", "| claim (a - b > 0) | metric | a - b, mean [95% interval] | seeds | verdict |", "|---|---|---|---|---|"]
    for claim, metric, a, b in PAIRS:
        seeds = sorted(s for (n, s) in by if n == a and (b, s) in by)
        if not seeds:
            continue
        diff = bootstrap([by[a, s].metrics[metric] - by[b, s].metrics[metric] for s in seeds])
        # identical runs (PPO K=1 and K=4 on one prompt: every image is of the same prompt) make no claim either way
        same = all(by[a, s].metrics == by[b, s].metrics for s in seeds)
        lines.append(f"| {claim} | {metric} | {interval(*diff)} | {len(seeds)} | "
                     f"{'n/a: identical runs' if same else verdict(*diff[1:], len(seeds))} |")
    robust = [(s, by["score_as_action", s], by["ppo_k1", s]) for (n, s) in by if n == "score_as_action" and ("ppo_k1", s) in by]
    for steps in args.robustness_steps if robust else ():
        # the drop of the gain from the training step count to `steps`: Score as Action's claim is a smaller drop
        drop = lambda r: r.metrics["reward_gain"] - r.metrics[f"reward_gain_{steps}steps"]
        diff = bootstrap([drop(ppo) - drop(saa) for _, saa, ppo in robust])
        lines.append(f"| Score as Action's gain drops less than PPO's from {args.num_steps} to {steps} steps (PPO's drop "
                     f"minus Score as Action's) | reward_gain | {interval(*diff)} | {len(robust)} | {verdict(*diff[1:], len(robust))} |")
    return "\n".join(lines)


def read_evals(run: Run, args: Args):
    """(epoch, images seen, seconds since the first evaluation, eval reward, kl) of each evaluation, in order.

    The scripts evaluate before training, every --image-every epochs and after the last; the i-th event is
    therefore at epoch min(i * eval_every, epochs).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.dir), size_guidance={"scalars": 0})
    acc.Reload()
    evals = acc.Scalars("eval/reward_mean")
    kl_tag = next((t for t in ("losses/kl_to_ref", "losses/approx_kl") if t in acc.Tags()["scalars"]), None)
    kls = acc.Scalars(kl_tag) if kl_tag else []
    rows = []
    for i, e in enumerate(evals):
        epoch = min(i * args.eval_every, run.epochs)
        kl = [k.value for k in kls if k.step <= e.step]
        rows.append((epoch, epoch * run.images_per_epoch, e.wall_time - evals[0].wall_time, e.value,
                     kl[-1] if kl and kl_tag == "losses/kl_to_ref" else float("nan")))
    return rows


def plot(rows: list, out: Path, prompts: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        images = sorted({r["images"] for r in mine})
        curves = [[r["eval_reward"] for r in mine if r["images"] == i] for i in images]
        mean, low, high = np.array([bootstrap(c) for c in curves]).T  # the band: a 95% interval over seeds
        seconds = np.array([np.mean([r["seconds"] for r in mine if r["images"] == i]) for i in images])
        for ax, x in ((axes[0], np.array(images)), (axes[1], seconds)):
            ax.plot(x, mean, label=name)
            ax.fill_between(x, low, high, alpha=0.15)
    axes[0].set_xlabel("training images generated")
    axes[1].set_xlabel("wall-clock seconds (CPU)")
    for ax in axes:
        ax.set_ylabel(f"eval reward ({prompts})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_images_and_time.png", dpi=110)
    plt.close(fig)

    loops = sorted((int(n.split("_k")[1]), n) for n in names if n.startswith("loop_k"))
    if loops:
        fig, ax = plt.subplots(figsize=(5, 4))
        finals = np.array([bootstrap([r["eval_reward"] for r in rows if r["method"] == n and r["final"]]) for _, n in loops])
        ax.errorbar([k for k, _ in loops], finals[:, 0], yerr=[finals[:, 0] - finals[:, 1], finals[:, 2] - finals[:, 0]],
                    marker="o", capsize=4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (images per prompt)")
        ax.set_ylabel("final eval reward")
        ax.set_title("LOOP at the same image budget")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loop_reward_vs_k.png", dpi=110)
        plt.close(fig)


def plot_claims(runs: list, out: Path, args: Args):
    """DPOK's reward against its KL to the pretrained model over beta, and the reward gain of Score as Action and PPO
    (K = 1) against the step count of the evaluation: means over seeds with 95% bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = lambda name: [r.metrics for r in runs if r.name == name]
    dpok = [(n, by(n)) for n in ("dpok_beta0", "dpok", "dpok_beta0.1") if by(n)]
    robust = [(n, by(n)) for n in ROBUSTNESS if by(n)]
    if not dpok and not robust:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, m in dpok:
        (gx, gl, gh), (kx, kl, kh) = bootstrap([x["reward_gain"] for x in m]), bootstrap([x["kl"] for x in m])
        axes[0].errorbar([kx], [gx], xerr=[[kx - kl], [kh - kx]], yerr=[[gx - gl], [gh - gx]], marker="o", capsize=4,
                         label={"dpok": "beta 0.01", "dpok_beta0": "beta 0", "dpok_beta0.1": "beta 0.1"}[name])
    axes[0].set_xlabel("KL to the pretrained model (path, per dimension)")
    axes[0].set_ylabel(f"reward gain ({args.prompts})")
    axes[0].set_title("DPOK: reward against KL over beta")
    steps = sorted({args.num_steps, *args.robustness_steps})
    for name, m in robust:
        key = lambda k: "reward_gain" if k == args.num_steps else f"reward_gain_{k}steps"
        mean, low, high = np.array([bootstrap([x[key(k)] for x in m]) for k in steps]).T
        axes[1].errorbar(steps, mean, yerr=[mean - low, high - mean], marker="o", capsize=4, label=name)
    axes[1].axvline(args.num_steps, color="grey", lw=0.8, ls="--")
    axes[1].set_xscale("log")
    axes[1].set_xticks(steps, [str(k) for k in steps])
    axes[1].minorticks_off()
    axes[1].set_xlabel(f"DDIM steps at evaluation (trained at {args.num_steps})")
    axes[1].set_ylabel("reward gain over the pretrained model")
    axes[1].set_title("Score as Action: robustness to the step count")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dpok_and_score_as_action.png", dpi=110)
    plt.close(fig)


def table(rows: list, target_gain: float) -> str:
    names = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"| method | final eval reward (mean ± std) | gain over pretrained | images to +{target_gain:g} | s / 1000 images |",
             "|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        seeds = sorted({r["seed"] for r in mine})
        final = [next(r["eval_reward"] for r in mine if r["seed"] == s and r["final"]) for s in seeds]
        start = [next(r["eval_reward"] for r in mine if r["seed"] == s and r["images"] == 0) for s in seeds]
        reach = []
        for s in seeds:  # the rows of a run are its evaluations in order, as read_evals gave them
            evals = [(r["epoch"], r["images"], r["seconds"], r["eval_reward"], r["kl_to_ref"]) for r in mine if r["seed"] == s]
            images, reached = images_to_target(evals, target_gain, 0)
            reach.append(images if reached else None)
        reached = [x for x in reach if x is not None]
        reach_text = f"{statistics.mean(reached):.0f} ({len(reached)}/{len(seeds)} seeds)" if reached else f"not reached (0/{len(seeds)})"
        per_k = statistics.mean(r["run_seconds"] / r["budget"] * 1000 for r in mine if r["final"])
        gain = [f - s for f, s in zip(final, start)]
        sd = statistics.stdev(final) if len(final) > 1 else 0.0
        gsd = statistics.stdev(gain) if len(gain) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(final):.3f} ± {sd:.3f} | {statistics.mean(gain):+.3f} ± {gsd:.3f} | "
                     f"{reach_text} | {per_k:.0f} |")
    return "\n".join(lines)


def main(args: Args):
    out = Path(args.out)
    if args.quick:
        args.seeds, args.images, args.images_per_epoch, args.num_steps, args.eval_every = args.seeds[:1], 32, 16, 5, 1
        args.final_images, args.robustness_steps = 16, (3,)
    names = args.methods or (QUICK if args.quick else tuple(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.images % args.images_per_epoch or args.images_per_epoch % 16 or args.images < 1:
        raise SystemExit("error: --images must be a positive multiple of --images-per-epoch, itself a multiple of 16")
    if args.eval_every < 1 or args.jobs < 1 or args.num_steps < 1 or not args.seeds:
        raise SystemExit("error: --eval-every, --jobs and --num-steps must be at least 1, and --seeds must name one")
    if not 0 < args.learning_rate < 1:
        raise SystemExit(f"error: --learning-rate {args.learning_rate}: give a rate in (0, 1), such as 1e-3")
    if args.final_images < 1 or not all(1 <= n <= 1000 for n in args.robustness_steps):
        raise SystemExit("error: --final-images must be at least 1 and --robustness-steps in [1, 1000]")
    sets = sorted(p.stem for p in (ROOT / "prompts").glob("*.txt"))
    for flag, name in (("--prompts", args.prompts), ("--heldout", args.heldout)):
        if name not in sets:
            raise SystemExit(f"error: {flag} {name}: not a prompt set in prompts/; choose from {', '.join(sets)}")
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: --out {out}: {existing} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out).cleanup()
    except OSError as e:
        raise SystemExit(f"error: --out {out} is not writable ({type(e).__name__}: {e.strerror}); choose another --out")
    epochs = args.images // args.images_per_epoch
    runs = [Run(n, s, CONFIGS[n][0], CONFIGS[n][1], Path(), epochs, args.images_per_epoch)
            for s, n in itertools.product(args.seeds, names)]
    for run in runs:
        run.dir = run_folder(out, run, args)
    threads = max(1, 2 // args.jobs)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    done = [0]

    def log(msg):
        done[0] += msg.startswith(("done", "skip"))
        print(f"[{time.strftime('%H:%M:%S')}] [{done[0]}/{len(runs)}] {msg}", flush=True)

    log(f"{len(runs)} runs: {len(names)} configurations x {len(args.seeds)} seeds, {args.images} images each, "
        f"{args.jobs} at once with {threads} thread(s)")
    def execute_and_evaluate(run):
        execute(run, args, threads, log)
        run.metrics = final_metrics(run, args, final_eval(run, args, threads, log))
        return run

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(execute_and_evaluate, runs))

    rows = []
    for run in runs:
        evals = run.evals = read_evals(run, args)
        for j, (epoch, images, seconds, reward, kl) in enumerate(evals):
            rows.append(dict(method=run.name, k=next((int(f) for f, g in zip(run.flags[1:], run.flags) if g == "--k"), 1),
                             seed=run.seed, epoch=epoch, images=images, unet_evals=epoch * unet_rows_per_epoch(run, args), seconds=round(seconds, 2),
                             eval_reward=round(reward, 5), kl_to_ref=kl, final=j == len(evals) - 1, budget=args.images,
                             run_seconds=round(run.seconds, 1)))
    with open(out / "evals.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows, args.target_gain) + "\n\nFinal evaluation (benchmarks/evaluate.py), paired gains over the " \
        "pretrained model with 95% expanded-percentile bootstrap intervals over seeds:\n\n" + final_tables(runs, args)
    with open(out / "final.csv", "w", newline="") as f:
        keys = sorted({k for r in runs for k in r.metrics})
        writer = csv.DictWriter(f, fieldnames=["method", "seed", *keys])
        writer.writeheader()
        writer.writerows({"method": r.name, "seed": r.seed, **r.metrics} for r in runs)
    (out / "table.md").write_text(text + "\n")
    plot(rows, out, args.prompts)
    plot_claims(runs, out, args)
    print(text)
    print(f"wrote {out / 'evals.csv'}, {out / 'final.csv'}, {out / 'table.md'} and the figures in {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
