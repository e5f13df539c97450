"""The diffs between sibling scripts are part of the product: keep them small, keep shared blocks identical."""

import re
import subprocess

import pytest
from helpers import ROOT

# Changed lines (`diff a b | grep -c '^[<>]'`), set from the scripts as written; a later edit that widens a
# diff must raise its budget here on purpose. The headers and docstrings account for ~20 lines of each.
# reinforce/ppo +1: the on-policy warning is in the scripts that have a clip range, and reinforce.py has none.
# ppo/dpok +10 (--timesteps-per-call): DPOK trains on buffer transitions, one UNet call per micro-batch already, so it
# has no --timesteps-per-call and no loop over chunks of a trajectory's timesteps.
# Re-set once after the scripts were reflowed to read at 100 columns (CONTRIBUTING.md, "Style"): each budget is the
# measured diff (before the reflow: 111, 69, 239 and 350); a method line that is split in two counts twice.
BUDGETS = {("reinforce", "ppo"): 119, ("ppo", "loop"): 74, ("ppo", "score_as_action"): 277,
           ("ppo", "dpok"): 400}
SCRIPTS = ["reinforce", "ppo", "loop", "dpok", "score_as_action"]


def present(*names):
    return all((ROOT / f"{n}.py").exists() for n in names)


@pytest.mark.parametrize("parent,child", list(BUDGETS))
def test_sibling_diff_within_budget(parent, child):
    if not present(parent, child):
        pytest.skip(f"{child}.py not written yet")
    out = subprocess.run(["diff", ROOT / f"{parent}.py", ROOT / f"{child}.py"], capture_output=True, text=True).stdout
    changed = sum(line[:1] in "<>" for line in out.splitlines() if line)
    assert changed <= BUDGETS[parent, child], f"diff {parent}.py {child}.py: {changed} changed lines"


def args_blocks(script: str) -> dict:
    """The `# --- name` blocks of a script's Args dataclass: name -> text."""
    text = (ROOT / f"{script}.py").read_text()
    body = text[text.index("class Args:") : text.index("\n\n\n", text.index("class Args:"))]
    parts = re.split(r"^    # --- (.+)$", body, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def fields(block: str) -> list:
    """(name, type) of each field: the flags a block defines, whatever their defaults."""
    return re.findall(r"^    (\w+): ([^=]+?) =", block, flags=re.M)


def test_shared_args_blocks_read_the_same():
    """CONTRIBUTING.md: the experiment, model-and-sampler and reward-and-prompts blocks are the same in every script:
    the same flags with the same types everywhere (a method may change a default, e.g. DPOK's guidance scale
    7.5), and the same text to the letter along the reinforce -> ppo -> loop line."""
    scripts = [s for s in SCRIPTS if present(s)]
    blocks = {s: args_blocks(s) for s in scripts}
    for s in scripts:
        assert list(blocks[s])[:4] == ["experiment", "model and sampler", "reward and prompts", "algorithm"], s
        for name in ("experiment", "model and sampler", "reward and prompts"):
            assert fields(blocks[s][name]) == fields(blocks["ppo"][name]), (s, name)
            if s in ("reinforce", "loop"):
                assert blocks[s][name] == blocks["ppo"][name], (s, name)


def test_every_script_has_the_shared_banners_in_order():
    for s in (s for s in SCRIPTS if present(s)):
        text = (ROOT / f"{s}.py").read_text()
        banners = ("SAMPLING", "REWARDS AND ADVANTAGES", "TRAINING", "LOGGING AND CHECKPOINTS")
        positions = [text.find(f"# {b}") for b in banners]
        assert -1 not in positions and positions == sorted(positions), s
        assert len(re.findall(r"^import common$", text, flags=re.M)) == 1, s


def test_evaluation_is_the_same_call_in_every_script():
    """The evaluation (fixed prompts and noise, every --eval-num-steps, gains over the model before training) is
    runs.Evaluation, built from the same values and called at the same points in all five scripts: eval/ rewards of
    two methods are paired and comparable."""
    calls = {}
    for s in (s for s in SCRIPTS if present(s)):
        text = (ROOT / f"{s}.py").read_text()
        start = text.index("    evaluate = runs.Evaluation(")
        calls[s] = (text[start : text.index("\n\n", start)], re.findall(r"^ *evaluate\(.*$", text, flags=re.M))
        assert len(calls[s][1]) == 2, s  # before training, then every --image-every epochs and at the end
    assert len(set(map(str, calls.values()))) == 1, [s for s in calls if calls[s] != calls["ppo"]]


def test_on_policy_warning_and_optimiser_lines_are_shared():
    """Every script with a clip range warns (once, runs.Run.check_on_policy) when the on-policy check exceeds clip/10,
    with the same line; every script builds its AdamW with the same fused switch."""
    warning = 'run.check_on_policy(metrics["debug/ratio_dev_at_start"], args.clip, epoch)'
    for s in (s for s in SCRIPTS if present(s)):
        text = (ROOT / f"{s}.py").read_text()
        assert ("clip: float =" in text) == (warning in text), s
        assert 'eps=args.adam_epsilon, fused=device.type == "cuda")' in text, s


def project_imports() -> dict:
    """module -> the project modules it imports anywhere in its text (top level or inside functions), read
    statically with ast: the scripts, common, rewards, the world package and the benchmarks."""
    import ast

    files = {p.stem: p for p in ROOT.glob("*.py")}
    files.update({"world": ROOT / "world" / "__init__.py", "world.pretrain": ROOT / "world" / "pretrain.py"})
    files.update({f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")})
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for target in targets:
                found |= {t for t in (target, target.split(".")[0]) if t in files and t != name}
        graph[name] = found
    return graph


def test_project_modules_import_in_one_direction():
    """No import cycle among the project's modules (once common imported rewards and world, which imported
    common back), and nothing imports upward. The layers, from the bottom: cli (flag rules, one-line errors) and
    offline (the offline models); common (the sampler, loading, prompts); rewards, world and runs (the run's
    machinery) on common; the scripts, evaluate.py and the benchmarks on top."""
    graph = project_imports()
    assert {"cli", "offline", "common", "rewards", "runs", "world", "loop"} <= set(graph)
    assert graph["cli"] == set() and graph["offline"] == set() and graph["common"] == {"cli", "offline"}
    assert graph["runs"] == {"cli", "common"} and graph["rewards"] <= {"cli", "common", "offline"}
    assert "common" in graph["rewards"] and "common" in graph["world"] and "rewards" in graph["loop"]
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for target in sorted(graph[module]):
            visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_repository_cites_only_what_a_reader_can_open():
    """Every reference points inside the repository or to a public source (a paper, a reference repository and
    path): no file cites the team's private notes, nor a number on the project's own tracker, which no reader
    outside can open. (Issue numbers of public repositories, written as owner/repo#N, are fine.)"""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    private = re.compile(r"\b(ALGORITHMS|STYLE|OFFLINE_WORLD)\.md\b|\b[Ii]ssues? \d|\bissue #\d|\(#\d+\)")
    found = []
    for name in files:
        path = ROOT / name
        text_file = path.suffix in (".py", ".md", ".toml", ".txt", ".cfg", ".sh") or name == ".ci/run"
        if not text_file or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if private.search(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_main_loops_read_at_100_columns():
    """CONTRIBUTING.md, "Style": the scripts' main loops (sampling, advantages, the training step, the logging) are
    written to read without a scroll, at 100 columns; the linter holds the rest of the project to 120."""
    for s in (s for s in SCRIPTS if present(s)):
        text = (ROOT / f"{s}.py").read_text()
        start = text[: text.index('if __name__ == "__main__":')].count("\n") + 1
        long = [start + i for i, line in enumerate(text.splitlines()[start - 1 :]) if len(line) > 100]
        assert not long, f"{s}.py: lines {long} pass 100 columns"
