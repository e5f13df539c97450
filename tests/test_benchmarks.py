"""The benchmarks run and print what they promise (their structure and sanity; timings are never asserted)."""

import itertools
import math
import re
import subprocess

import pytest
from helpers import OFFLINE, PYTHON, ROOT


def table(text: str, header: str) -> dict:
    """The markdown table whose header row starts with `header`: first cell -> the other cells."""
    lines = text[text.index(f"| {header} |"):].splitlines()[2:]  # below the header and the |---| row
    rows = [line.strip("|").split("|") for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])
def test_train_step_benchmark_prints_every_phase_and_the_on_policy_check(model):
    """On SD 1.x and on SD 3.x (the flow path, with the transformer's FLOPs counted) alike."""
    proc = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "train_step.py"), "--model", model, "--batch", "2",
                           "--num-steps", "3", "--matmul-size", "256"], cwd=ROOT, env=OFFLINE, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    phases = table(out, "phase")
    assert list(phases) == ["sampling", "decode", "reward", "training", "optimiser", "epoch"]
    seconds = {name: float(cells[0]) for name, cells in phases.items()}
    peaks = {name: float(cells[2]) for name, cells in phases.items()}
    assert all(math.isfinite(s) and s >= 0 for s in seconds.values()) and seconds["training"] > 0
    assert math.isclose(sum(seconds[p] for p in list(phases)[:-1]), seconds["epoch"], abs_tol=0.01)
    assert all(p > 0 for p in peaks.values()) and peaks["epoch"] == max(peaks.values())
    images_per_s = float(re.search(r"^images/s: (\S+)$", out, re.M).group(1))
    assert math.isfinite(images_per_s) and images_per_s > 0
    flops, rate, fraction, peak = re.search(r"^training: (\S+) TFLOP \(model, forward\+backward\), (\S+) TFLOP/s = (\S+)% "
                                            r"of the measured fp32 matmul peak (\S+) TFLOP/s$", out, re.M).groups()
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in (flops, rate, fraction, peak))
    assert math.isclose(float(rate) / float(peak) * 100, float(fraction), rel_tol=0.05, abs_tol=0.06)
    deviation = table(out, "precision")
    assert list(deviation) == ["fp32", "bf16", "fp16"]
    assert float(deviation["fp32"][0]) < 1e-5  # the on-policy check in float32
    for name in ("bf16", "fp16"):  # measured, or the reason it could not be, in one cell
        assert deviation[name][0].startswith("failed: ") or math.isfinite(float(deviation[name][0])), deviation[name]


def test_study_quick_runs_every_step_and_resumes(tmp_path):
    """`benchmarks/study.py --quick`: two configurations run as subprocesses of their scripts, a CSV row per
    evaluation with images and UNet rows that grow as the runs train, the table and both figures; a rerun skips
    the finished runs (resumable) and rewrites the same rows."""
    import csv

    cmd = [PYTHON, str(ROOT / "benchmarks" / "study.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "evals.csv")))
    assert {r["method"] for r in rows} == {"loop_k4", "ppo_k1"}
    for method in ("loop_k4", "ppo_k1"):
        mine = [r for r in rows if r["method"] == method]
        assert [int(r["images"]) for r in mine] == [0, 16, 32] and [r["final"] for r in mine] == ["False", "False", "True"]
        assert int(mine[0]["unet_evals"]) == 0 < int(mine[1]["unet_evals"]) < int(mine[2]["unet_evals"])
        assert all(0 <= float(r["eval_reward"]) <= 1 for r in mine)
        assert mine[0]["eval_reward"] == rows[0]["eval_reward"]  # the same pretrained model, prompts and noise
    assert set(table((tmp_path / "table.md").read_text(), "method")) == {"loop_k4", "ppo_k1"}
    assert (tmp_path / "reward_vs_images_and_time.png").stat().st_size > 0 and (tmp_path / "loop_reward_vs_k.png").exists()
    final = {r["method"]: r for r in csv.DictReader(open(tmp_path / "final.csv"))}  # the final evaluation, paired
    assert set(final) == {"loop_k4", "ppo_k1"} and "reward_gain_3steps" in final["ppo_k1"]
    assert all(-1 <= float(r[k]) <= 1 for r in final.values() for k in ("reward_gain", "judged_gain", "heldout_gain"))
    assert all(float(r["kl"]) > 0 for r in final.values())  # trained LoRA: not the pretrained model
    assert final["loop_k4"]["reward_before"] == final["ppo_k1"]["reward_before"]  # same seed: same noise
    claims = table((tmp_path / "table.md").read_text(), "claim (a - b > 0)")
    assert claims["LOOP K=4 beats PPO (DDPO, K=1): sample efficiency"][-1] == "no verdict (1 seed; at least 3)"
    assert re.fullmatch(r"\S+ \[n/a\] \([01]/1\)", table((tmp_path / "table.md").read_text(), "method | seeds")["loop_k4"][1])
    again = subprocess.run(cmd, cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skip ") == 2, again.stdout[-2000:]
    assert list(csv.DictReader(open(tmp_path / "evals.csv"))) == rows


def test_demo_seeds_runs_the_readme_command_and_judges_before_and_after(tmp_path):
    """`benchmarks/demo_seeds.py` reads the README's main job, runs it (here shortened to one small epoch by
    --extra, which replaces the README's values) and prints a row per seed with the eval reward and the judged-right
    fraction before and after, both fractions of the 32 eval samples."""
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "benchmarks" / "demo_seeds.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    argv = demo.readme_command()
    readme = (ROOT / "README.md").read_text()
    assert argv[0] == "loop.py" and f"python {shlex.join(argv)}" in readme and "--seed" not in argv
    assert demo.with_flags(["a.py", "--k", "4"], ["--k", "8", "--x", "1"]) == ["a.py", "--k", "8", "--x", "1"]
    extra = ("--num-epochs 1 --num-steps 2 --sample-batch-size 8 --train-batch-size 8 --k 4 --image-every 0 "
             "--eval-num-steps 3")
    proc = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "demo_seeds.py"), "--seeds", "3", "--jobs", "1",
                           "--out", str(tmp_path), f"--extra={extra}"], cwd=ROOT, env=OFFLINE, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = re.search(r"^\| 3 \| (\S+) -> (\S+) \| (\S+) \| (\d+)% -> (\d+)% \| (\S+)% \|$", proc.stdout, re.M)
    assert row, proc.stdout[-2000:]
    before, after, gain = (float(v) for v in row.groups()[:3])
    assert 0 <= before <= 1 and 0 <= after <= 1 and math.isclose(after - before, gain, abs_tol=1.5e-3)
    assert all(0 <= int(v) <= 100 for v in row.groups()[3:5])
    assert (tmp_path / "seed3" / "checkpoints" / "epoch_0001").exists()


def _module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_studys_intervals_and_verdicts():
    """The expanded-percentile bootstrap interval holds the mean, is a point for equal values, is the same at the same
    seed, and covers a normal mean's true value about 95% of the time with 5 seeds (93.8% over 400 simulations), where
    the plain percentile bootstrap covered 86.5%; Student's t quantile is right; verdicts follow the interval's side
    of 0 (and need 3 seeds)."""
    import numpy as np

    study = _module("study")
    assert study.bootstrap([0.2] * 5) == (0.2, 0.2, 0.2)
    mean, low, high = study.bootstrap([0.1, 0.3, -0.2, 0.5, 0.0])
    assert math.isclose(mean, 0.14) and -0.2 <= low < mean < high <= 0.5  # within the values' range
    assert abs(study.t_quantile(0.975, 4) - 2.7764) < 1e-3 and abs(study.t_quantile(0.975, 19) - 2.0930) < 1e-3
    assert study.bootstrap([0.1, 0.3, -0.2, 0.5, 0.0]) == (mean, low, high)
    rng = np.random.default_rng(0)  # coverage over 300 draws of 5 values: 94% +- 3 sd of a binomial (4.1%), and the
    covered = sum(low <= 0 <= high for low, high in  # 86.5% of the plain percentile interval below that range
                  (study.bootstrap(rng.normal(0, 1, 5), resamples=2000, seed=i)[1:] for i in range(300)))
    assert 0.90 * 300 <= covered <= 0.99 * 300, covered
    assert study.verdict(0.01, 0.2, 5) == "established" and study.verdict(-0.3, -0.01, 5) == "contradicted"
    assert study.verdict(-0.01, 0.2, 5) == "not established" and study.verdict(0.1, 0.2, 2).startswith("no verdict")
    evals = [(0, 0, 0.0, 0.3, 0.0), (4, 64, 1.0, 0.45, 0.0), (8, 128, 2.0, 0.5, 0.0)]
    assert study.images_to_target(evals, 0.14, 320) == (64, True)  # relative to the run's own first evaluation
    assert study.images_to_target(evals, 0.3, 320) == (320, False)
    assert study.images_to_target([(0, 0, 0.0, 0.6, 0.0), *evals[1:]], -0.5, 320) == (64, True)  # never at 0 images


def test_the_final_evaluations_path_kl_is_exact_and_zero_at_the_start():
    """benchmarks/evaluate.py's KL to the pretrained model: 0 with the LoRA as initialised (B = 0), and after a
    perturbation the sum over steps of mean((mu_theta - mu_pre)^2) / (2 sigma_t^2), with sigma_t from DDIM's formula
    and both means from deterministic steps (noise 0) of the two models."""
    import torch

    import common

    evaluate = _module("evaluate")
    pipe = common.load_pipeline("tiny", "cpu", lora_rank=4)
    args = evaluate.Args(checkpoint="unused", guidance=5.0, eta=1.0, seed=3)
    neg = common.encode_prompts(pipe, [""])
    prompts = ["a red circle", "a blue square", "a red circle"]
    steps = 3
    traj, embeds = evaluate.sample_set(pipe, prompts, neg, steps=steps, args=args, key=0)
    assert evaluate.path_kl(pipe, traj, embeds, neg, steps=steps, args=args).abs().max() == 0
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    kl = evaluate.path_kl(pipe, traj, embeds, neg, steps=steps, args=args)
    sched, expected = pipe.scheduler, torch.zeros(len(prompts))
    for i, t in enumerate(traj.timesteps):
        x = traj.latents[:, i]
        means = []
        for disabled in (False, True):
            with common.adapters_disabled(pipe.unet) if disabled else torch.enable_grad():
                with torch.no_grad():
                    out = common.guided_noise(pipe.unet, x, t, embeds, neg, 5.0)
            means.append(common.ddim_step(sched, out, t, x, num_steps=steps, eta=1.0, noise=torch.zeros_like(x))[0])
        prev = t - sched.config.num_train_timesteps // steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        expected += ((means[0] - means[1]) ** 2 / (2 * var)).mean(dim=(1, 2, 3))
    assert (kl > 0).all()
    # float32 arithmetic on both sides: a mean of squares of O(1e-1) differences, compared relatively
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-7)


def test_prompt_pairs_picks_the_studys_task_by_its_rule():
    """`benchmarks/prompt_pairs.py` scores every training pair and picks by the rule it prints: the chosen pairs meet
    --max-judged and --min-spread and are the least often judged right among those that do. The study's task is 8
    training pairs (none held out), each once."""
    prompts = lambda name: (ROOT / "prompts" / f"{name}.txt").read_text().split("\n")[:-1]
    study, train, heldout = prompts("shapes_study"), prompts("shapes"), prompts("shapes_eval")
    assert len(study) == len(set(study)) == 8 and set(study) <= set(train) and not set(study) & set(heldout)
    proc = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "prompt_pairs.py"), "--images", "3", "--count", "3",
                           "--max-judged", "0.67", "--min-spread", "0.1", "--threads", "1"], cwd=ROOT, env=OFFLINE,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m[0]: (float(m[1]), float(m[2]), int(m[3]) / 100)
            for m in re.findall(r"^\| (a .+?) \| ([\d.]+) \| ([\d.]+) \| (\d+)% \|$", proc.stdout, re.M)}
    assert list(rows) == train
    chosen = proc.stdout.split("eligible: ")[1].splitlines()[1:4]
    # the spread is printed to 3 decimals: a pair within 0.001 of --min-spread may fall either way
    eligible = lambda margin: [p for p, (_, spread, judged) in rows.items() if judged <= 0.67 and spread >= 0.1 + margin]
    assert set(chosen) <= set(eligible(-0.001)) and len(chosen) == 3
    worst = max(rows[p][2] for p in chosen)  # no eligible pair outside the choice is judged right less often
    assert all(rows[p][2] >= worst for p in eligible(0.001) if p not in chosen)
    assert re.search(r"^prompts/shapes_study.txt holds (these|other) pairs", proc.stdout, re.M)
