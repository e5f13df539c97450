"""The run's machinery: its flags, its folder, its checkpoints, its processes, its logs.

`validate_args` gives the flags left unset their model family's defaults and checks every shared flag before anything
loads (the rules are cli.py's). `start` then decides, still before the model loads, what a run resumes and where it
writes: it checks that the resumed checkpoint comes from the same script and the same experiment, and locks the run
folder for the run's life. A run folder holds one run's history: TensorBoard events, image grids, and
checkpoints/epoch_N, each the LoRA weights in diffusers' format plus a training state; `Run.save` writes them
atomically and only from finite weights. From then on, a Ctrl-C or a write the machine refuses (a full disk) ends
the run in one line that says how to continue. Below those: the torchrun helpers (`setup_distributed`, `gather`,
`average_gradients`), the reward's checks (`CheckedReward`), the fixed evaluation every script runs (`Evaluation`),
and the logger, image grids and progress bars. The method itself is the scripts'; the sampler, common.py's.
"""

import atexit
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import cli
import common
from cli import fail, one_line

# ----------------------------------------------------------------------------------------------------
# Flags: the family's defaults and every shared flag's range, before anything loads
# ----------------------------------------------------------------------------------------------------


def model_family(model: str) -> str:
    """"flow" for an SD 3.x model, "sd" for SD 1.x/2.x, read from the offline name or the folder's (or the local hub
    cache's) model_index.json without loading any weights; a model that cannot be found stops here, in one line."""
    if model in (common.TINY, common.SD15_RANDOM, common.SHAPES):
        return "sd"
    if model in (common.TINY_SD3, common.SD35M_RANDOM, common.SHAPES_FLOW):
        return "flow"
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(model).get("_class_name", "")
    except (OSError, ValueError) as e:
        fail(f"model {model!r} could not be loaded: it is not a local diffusers folder and not in the local Hugging "
             f"Face cache ({type(e).__name__}). Use --model tiny for the offline model, or pass a local folder.")
    return "flow" if name.startswith("StableDiffusion3") else "sd"


def fill_family_defaults(args, sd_defaults: dict):
    """Set the sampling flags left unset (None) to the loaded model family's values: `sd_defaults` (over
    SD_COMMON_DEFAULTS) on SD 1.x/2.x, FLOW_DEFAULTS on SD 3.x; a value given on the command line is kept. An unset
    --eval-eta stays unset on SD 1.x/2.x (the scripts then evaluate with --eta, as they always have). Then --eta and
    --eval-eta are checked against the family's rule (ETA_RULES)."""
    family = model_family(args.model)
    for name, value in (cli.FLOW_DEFAULTS if family == "flow" else {**cli.SD_COMMON_DEFAULTS, **sd_defaults}).items():
        if getattr(args, name, False) is None:
            setattr(args, name, value)
    for name, (requirement, ok) in cli.ETA_RULES[family].items():
        if getattr(args, name, None) is not None and not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {requirement}")


def validate_args(args, sd_defaults: Optional[dict] = None):
    """Stop in one line on a flag value that would crash later or silently change the algorithm (ranges, NaN,
    divisibility of the shared sizes). Called by every script right after parsing, before anything is loaded
    or written; checks the flags by name, so a script gets exactly the checks of the flags it has. From here on a
    Ctrl-C ends the process in one line (exit_in_one_line; runs.start names the run folder later). First the
    sampling flags left unset (None) take the model family's defaults: `sd_defaults` (the script's) or FLOW_DEFAULTS."""
    cli.exit_in_one_line(lambda: "nothing was written; run it again")  # from here on: Ctrl-C is one line
    fill_family_defaults(args, sd_defaults or {})
    cli.check_flags(args)
    if hasattr(args, "timestep_fraction") and int(args.num_steps * args.timestep_fraction) < 1:
        fail(f"--timestep-fraction {args.timestep_fraction} of --num-steps {args.num_steps} trains "
             f"int({args.num_steps * args.timestep_fraction:g}) = 0 timesteps per trajectory; use at least "
             f"{1 / args.num_steps:g}")
    if args.sample_batch_size % args.k:
        fail(f"--sample-batch-size {args.sample_batch_size} must hold whole groups of --k {args.k} images")



# ----------------------------------------------------------------------------------------------------
# Optimiser and GradScaler state
# ----------------------------------------------------------------------------------------------------


def load_scaler(scaler, state: dict):
    """The fp16 GradScaler's scale from a checkpoint, when this run uses one and the checkpoint's did: --mixed-precision
    may change on resume (a run saved in fp32 has an empty state; a run resumed in fp32 needs none)."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def load_optimizer(optimizer, state: dict):
    """An optimiser's moments from a checkpoint, with THIS run's hyperparameters (lr, betas, eps, weight decay):
    load_state_dict alone brings back the checkpoint's, so a changed --learning-rate would silently do nothing."""
    flags = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign optimiser state is one user error
        fail(f"cannot resume: the checkpoint's optimiser state does not fit this run ({one_line(e, 100)}); resume from "
             f"another checkpoint")
    for group, values in zip(optimizer.param_groups, flags):
        group.update(values)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: LoRA (or full UNet) weights in diffusers' format + a training-state file, written atomically
# ----------------------------------------------------------------------------------------------------

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"


def _tensors(obj):
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _is_sd3(model) -> bool:
    """The denoiser is SD 3.x's transformer (its LoRA is saved under `transformer.`, SD 1.x's UNet's under `unet.`)."""
    return type(model).__name__ == "SD3Transformer2DModel"


def save_checkpoint(path: Union[str, Path], unet, state: dict):
    """Write `path/` = LoRA weights (loadable by `pipe.load_lora_weights(path)`) + training state.

    Only finite weights and state are written: a diverged run stops here in one line and its earlier checkpoints
    stay the newest. Everything is written into `path.tmp/` and renamed into place only when complete, so a save
    that is interrupted (killed, disk full) never leaves a half-written checkpoint and never destroys an earlier one.
    Tensors go to safetensors; the training state (optimizer, epoch, statistics) is a torch file of
    tensors and plain containers that loads with `weights_only=True`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    bad = [name for name, p in unet.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad or not all(torch.isfinite(t).all() for t in _tensors(state) if t.is_floating_point()):
        fail(f"not saving {path.name}: the {'weights (' + bad[0] + ', ...)' if bad else 'training state'} are not "
             "finite, the run diverged; lower --learning-rate and resume from an earlier checkpoint, which is intact")
    tmp = path.with_name(path.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if getattr(unet, "peft_config", None) and _is_sd3(unet):  # diffusers' SD3 LoRA format: peft keys
            from diffusers import StableDiffusion3Pipeline
            from peft.utils import get_peft_model_state_dict

            StableDiffusion3Pipeline.save_lora_weights(
                tmp, transformer_lora_layers=get_peft_model_state_dict(unet),
                transformer_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        elif getattr(unet, "peft_config", None):
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        else:
            save_file({k: v.contiguous().cpu() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
        torch.save(state, tmp / STATE_FILE)
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - disk full (torch.save raises RuntimeError), folder made read-only, ...
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(path.parent).free / 1e6 if path.parent.exists() else 0
        fail(f"could not write checkpoint {str(path)!r} ({one_line(e)}; {free:.1f} MB free on its disk); earlier "
             f"checkpoints are intact: free disk space and resume")


def load_checkpoint(path: Union[str, Path], unet) -> dict:
    """Load weights into `unet` (in place, exactly) and return the training state; fail in one line."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        if getattr(unet, "peft_config", None):
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft import set_peft_model_state_dict

            if _is_sd3(unet):
                weights = {k.removeprefix("transformer."): v for k, v in load_file(path / LORA_FILE).items()}
            else:
                weights = convert_unet_state_dict_to_peft(
                    {k.removeprefix("unet."): v for k, v in load_file(path / LORA_FILE).items()})
            result = set_peft_model_state_dict(unet, weights)
            if getattr(result, "unexpected_keys", None):
                raise KeyError(f"unexpected LoRA keys {result.unexpected_keys[:3]}")
            # the model's own weights are "missing" from a LoRA file; a LoRA tensor that is missing would silently keep
            # this run's fresh initialisation, and the resume would not be exact
            missing = [k for k in getattr(result, "missing_keys", ()) if "lora_" in k]
            if missing or not weights:
                total = sum(1 for name, _ in unet.named_parameters() if "lora_" in name)
                raise KeyError(f"{len(missing) if weights else total} of its {total} LoRA tensors are missing, e.g. "
                               f"{(missing or ['all'])[0]}")
        else:
            unet.load_state_dict(load_file(path / "unet.safetensors"))
        bad = [name for name, p in unet.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"its weights are not finite ({bad[0]}, {len(bad)} tensors in all): damaged")
        state = TrainingState(torch.load(path / STATE_FILE, map_location="cpu", weights_only=True))
        state.path = str(path)
        return state
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign checkpoint is one user error
        fail(f"cannot resume from {str(path)!r}: not a complete checkpoint of this model ({one_line(e)}); resume "
             f"from an earlier checkpoint")


def checkpoint_folders(run_dir: Union[str, Path]) -> list:
    """(epoch, folder) of a run folder's `checkpoints/epoch_N`, sorted by the NUMBER N (epoch_10000 after epoch_9999);
    the `.tmp` and `.old` folders of a save in progress are not checkpoints."""
    found = [(int(m.group(1)), p) for p in Path(run_dir, "checkpoints").glob("epoch_*")
             if (m := re.fullmatch(r"epoch_(\d+)", p.name)) and p.is_dir()]
    return sorted(found, key=lambda item: item[0])


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint folder is not complete, or None, without loading it: the training state must be a whole
    torch (zip) archive and the weights a safetensors file as long as its header says."""
    import zipfile

    weights = path / LORA_FILE if (path / LORA_FILE).exists() else path / "unet.safetensors"
    if not (path / STATE_FILE).is_file() or not weights.is_file():
        return f"{STATE_FILE} or the weights file is missing"
    if not zipfile.is_zipfile(path / STATE_FILE):
        return f"{STATE_FILE} is truncated or not a torch file"
    try:
        with open(weights, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if weights.stat().st_size != 8 + header_size + end:
            return f"{weights.name} is truncated"
    except Exception as e:  # noqa: BLE001 - any unreadable header is the same damage
        return f"{weights.name} is unreadable ({one_line(e, 60)})"
    return None


def read_checkpoint(path: Path) -> tuple:
    """(training state, None) of a complete checkpoint folder, or (None, why it is not)."""
    problem = checkpoint_problem(path)
    if problem is None:
        try:
            return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True), None
        except Exception as e:  # noqa: BLE001 - a whole archive with damaged contents
            problem = f"{STATE_FILE} does not load ({one_line(e, 60)})"
    return None, problem


def find_checkpoint(path: Union[str, Path], enabled: bool = True) -> tuple:
    """(folder, training state) of the checkpoint to resume: `path` if it is a checkpoint folder, else the newest
    complete one, by epoch number, under the run folder's `checkpoints/`; damaged newer ones are skipped, saying so."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        damaged = []
        for _, folder in reversed(checkpoint_folders(path)):
            state, problem = read_checkpoint(folder)
            if state is not None:
                if damaged:
                    print0(f"warning: {'; '.join(damaged)}: resuming from {folder.name}, the newest complete "
                           "checkpoint",
                           enabled=enabled, file=sys.stderr)
                return folder, state
            damaged.append(f"{folder.name} is damaged ({problem})")
        if damaged:
            fail(f"cannot resume from {str(path)!r}: it has no complete checkpoint ({'; '.join(damaged)})")
    elif path.is_dir() and any((path / name).exists() for name in (STATE_FILE, LORA_FILE, "unet.safetensors")):
        state, problem = read_checkpoint(path)
        if state is None:
            fail(f"cannot resume from {str(path)!r}: not a complete checkpoint ({problem})")
        return path, state
    diverged = sorted(p.name for p in path.glob("checkpoints/*.diverged*"))
    if diverged:
        fail(f"cannot resume from {str(path)!r}: its only checkpoints were written from diverged weights "
             f"({', '.join(diverged)})")
    fail(f"no checkpoint found at {str(path)!r}: give a checkpoint folder or a run folder that has checkpoints/")


class TrainingState(dict):
    """A checkpoint's training state: a key it lacks (a damaged or foreign file) stops the run in one line."""

    path: str = "the checkpoint"

    def __missing__(self, key):
        fail(f"cannot resume from {self.path!r}: its training state lacks {key!r} (damaged, or written by another "
             f"version); resume from an earlier checkpoint")


# ----------------------------------------------------------------------------------------------------
# The experiment a checkpoint belongs to
# ----------------------------------------------------------------------------------------------------

# The flags that fix the model's shape: a checkpoint's weights fit only a run with the same values.
SHAPE_FLAGS = ("model", "lora_rank", "lora_alpha")
# The flags that may change on resume: where and how often the run writes and logs, how long it runs, how the same
# computation is executed (device, precision, recomputation, compilation, timesteps per UNet call), and the
# optimisers' settings, which load_optimizer applies over the checkpoint's moments (lowering the learning rate after a
# divergence is why one resumes an earlier checkpoint). --prompt-file may move: the prompts' text is what is checked.
FREE_FLAGS = ("exp_name", "run_name", "output_dir", "num_epochs", "save_every", "image_every", "eval_num_steps",
              "resume", "fork", "track", "wandb_project", "device", "mixed_precision", "gradient_checkpointing",
              "compile", "timesteps_per_call", "learning_rate", "value_learning_rate", "adam_beta1", "adam_beta2",
              "weight_decay", "adam_epsilon", "max_grad_norm", "prompt_file")
# Every other flag defines the experiment (the reward and its weights, the prompts, the seed, the sampler, the batch
# sizes, the algorithm's settings), as does the number of processes (the images per epoch): a resume keeps them,
# unless --fork says that the change is meant.


def shape_flags(args) -> dict:
    """The SHAPE_FLAGS, with LoRA alpha as it takes effect (the rank when omitted)."""
    flags = {name: getattr(args, name) for name in SHAPE_FLAGS}
    if flags["lora_alpha"] is None:
        flags["lora_alpha"] = float(args.lora_rank)
    return flags


def prompt_source(args) -> str:
    return f"--prompt-file {args.prompt_file}" if args.prompt_file is not None else f"--prompts {args.prompts}"


def experiment(args, processes: int) -> dict:
    """The values that define the experiment: every flag that is neither a SHAPE_FLAG nor a FREE_FLAG, the number of
    processes, and, as `prompts`, a hash of the training and evaluation prompts' text (a built-in set may change)."""
    flags = {name: value for name, value in sorted(vars(args).items()) if name not in SHAPE_FLAGS + FREE_FLAGS}
    text = "\n".join(common.load_prompts(args.prompts, args.prompt_file)) + "\n\n" + "\n".join(
        common.load_eval_prompts(args.prompts, args.prompt_file))
    flags["prompts"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    flags["processes"] = processes
    return flags


def _describe(name: str, value, record: dict) -> str:
    if name == "prompts":
        return f"{record.get('prompt_source', '--prompts')} (text sha256 {value})"
    if name == "processes":
        return f"{value} processes"
    return f"--{name.replace('_', '-')} {value}"


# ----------------------------------------------------------------------------------------------------
# One writer per run folder
# ----------------------------------------------------------------------------------------------------

_HELD = {}  # lock file -> (descriptor, folders created for it), released at exit


def lock(run_dir: Path):
    """Take the run folder's lock, `.NAME.lock` beside it, for this process's life, or stop in one line naming the
    folder and its owner. The lock is the kernel's (flock): it dies with its owner however the owner ends (killed,
    out of memory, the machine rebooted), so a lock file left behind is simply taken over, and no live owner is ever
    second-guessed. The file only names the owner (pid, host, start) for the message. Folders made to hold the lock
    are removed again if the run ends before writing anything there."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): no lock
        return
    run_dir = run_dir.resolve()  # a symlink to the folder locks the folder itself
    path = run_dir.parent / f".{run_dir.name}.lock"
    created = [p for p in (run_dir.parent, *run_dir.parent.parents) if not p.exists()]
    while True:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # its folder is read-only, or not ours
            _remove_empty(created)
            fail(f"cannot lock the run folder {str(run_dir)!r}: the lock file {path.name!r} cannot be created beside "
                 f"it ({one_line(e, 80)}); the folder that holds the run folder must be writable: choose another "
                 f"--output-dir, or copy the run elsewhere and resume it there")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            _remove_empty(created)
            fail(f"the run folder {str(run_dir)!r} is in use by another run ({owner}); wait for it to end, or "
                 f"choose another --run-name")
        try:  # the previous owner may have removed the file between our open and our lock: lock the new one
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _HELD[path] = fd, created


def _remove_empty(folders):
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def release():
    """Release every run-folder lock this process holds: at exit, or after a script run in-process (tests)."""
    for path, (fd, created) in list(_HELD.items()):
        try:
            os.unlink(path)  # while still locked: a process that opened it meanwhile sees a new file and retries
        except OSError:
            pass
        os.close(fd)
        _remove_empty(created)
        del _HELD[path]


atexit.register(release)


@dataclasses.dataclass
class Run:
    """One run: its folder, its record, what it resumes, and the divergence checks that guard its checkpoints.

    A non-finite gradient norm (a NaN or inf loss, an overflow in the backward pass) skips the optimiser step and is
    counted; `patience` of them in a row stop the run. The norm is the one clip_grad_norm_ returns anyway, after the
    all-reduce, so every process decides the same, with one host sync per optimiser step and none in the timestep loop.
    Under fp16 a non-finite gradient is the GradScaler's normal overflow while its scale is >= 1 (it skips the step and
    lowers the scale itself); only below that does it count. Skipped steps leave the weights as they are, so weights
    that gave a non-finite gradient are never saved, and when the run stops as diverged, the checkpoints written from
    the same weights are renamed `epoch_N.diverged`: a resume never picks them.
    """

    dir: Path  # the run folder; the Logger creates it, once the model and any checkpoint have loaded
    record: dict  # in every checkpoint: the script, the run's id, the run it branched from, its flags and experiment
    args: object  # the parsed flags (for the messages)
    checkpoint: Optional[Path] = None  # the checkpoint to resume from
    enabled: bool = True  # the main process: it writes, renames and prints
    patience: int = 3
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    current: list = dataclasses.field(default_factory=list)  # checkpoints written from the current weights
    off_policy_warned: bool = False
    resumed_weights: bool = False  # the weights are still the resumed checkpoint's (no optimiser step taken yet)

    def check_on_policy(self, ratio_dev, clip: float, epoch: int):
        """Warn once per run, in one line on stderr, when `debug/ratio_dev_at_start` (mean |rho - 1| before the epoch's
        first update, ~0 on-policy) exceeds clip / 10: sampling and training then evaluate measurably different policies
        (the precision, a kernel that depends on the batch), and rounding alone starts to fill the clip range
        (docs/performance.md has the measurements). Called once per epoch with the logged value (one host sync)."""
        if self.off_policy_warned or not float(ratio_dev) > clip / 10:
            return
        self.off_policy_warned = True
        print0(f"warning: epoch {epoch}: debug/ratio_dev_at_start {float(ratio_dev):.2e} exceeds clip/10 = "
               f"{clip / 10:.2g}: sampling and training disagree before any update, so rounding fills part of the clip "
               f"range (try --mixed-precision fp16 or no; docs/performance.md); warned once per run",
               enabled=self.enabled, file=sys.stderr)

    def step_ok(self, grad_norm, scaler, epoch: int) -> bool:
        """True if the optimiser step may be taken; False (skip it) if the gradient is not finite."""
        if torch.isfinite(grad_norm):
            self.nonfinite_in_a_row, self.current, self.resumed_weights = 0, [], False  # the step changes the weights
            return True
        self.skipped_steps += 1
        if scaler.is_enabled() and scaler.get_scale() >= 1:
            return False
        self.nonfinite_in_a_row += 1
        print0(f"warning: epoch {epoch}: gradient norm {float(grad_norm)}, optimiser step skipped "
               f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in this run)", enabled=self.enabled,
               file=sys.stderr)
        if self.nonfinite_in_a_row >= self.patience:
            self.diverged(f"the gradient was not finite in {self.patience} optimiser steps in a row (epoch {epoch})")
        return False

    def diverged(self, what: str):
        """Stop: the current weights diverged. Checkpoints written from them are renamed so that resume skips them."""
        renamed = []
        for path in self.current if self.enabled else []:
            target, n = path.with_name(path.name + ".diverged"), 1
            while target.exists():
                target, n = path.with_name(f"{path.name}.diverged{n}"), n + 1
            path.rename(target)
            renamed.append(path.name)
        note = (f"{', '.join(renamed)} held these weights and became *.diverged" if renamed else
                f"these are the weights of the resumed checkpoint {str(self.checkpoint)!r}: resume an earlier one"
                if self.resumed_weights else "no checkpoint holds these weights")
        fail(f"{what}: the model diverged ({cli.divergence_hint(self.args)}); {note}")

    def save(self, epoch: int, unet, state: dict):
        """This run's checkpoint of `epoch`: checkpoints/epoch_NNNN, its training state carrying the run's record."""
        path = self.dir / "checkpoints" / f"epoch_{epoch:04d}"
        if self.nonfinite_in_a_row:
            self.diverged(f"not saving {path.name}: the weights gave a non-finite gradient at the last optimiser step")
        types = {key: type(value).__name__ for key, value in state.items()}
        save_checkpoint(path, unet, {**state, "record": {**self.record, "keys": sorted(state), "types": types}})
        self.current.append(path)

    def next_step(self) -> str:
        """What to do after the run was stopped: resume its newest complete checkpoint, or start again."""
        done = [folder for _, folder in checkpoint_folders(self.dir) if checkpoint_problem(folder) is None]
        if done:
            return f"the newest checkpoint is {done[-1]}; continue with the same flags and --resume {self.dir}"
        return f"no checkpoint was written yet (--save-every {self.args.save_every}); start the run again"


def start(args, script: str, dist) -> Run:
    """Decide, before the model loads, what this run resumes and where it writes; lock that folder; write nothing else.

    --resume takes a checkpoint folder or a run folder (its newest complete checkpoint, by epoch number). The
    checkpoint must come from the same script, with the same SHAPE_FLAGS and the same experiment (see FREE_FLAGS),
    below --num-epochs; a mismatch stops in one line naming both values. With --fork the experiment may differ, and
    the run branches into a new run folder whose record names its parent. The run continues in the checkpoint's run
    folder when that checkpoint is the newest complete one there; resumed from an OLDER one, it branches into a new
    run folder next to it, so that no checkpoint is ever overwritten and every run folder holds one history (refusing
    instead would only make the user choose a folder name). No run writes into a folder that holds another run's
    checkpoints, or into one that another process holds (`lock`).
    """
    enabled = dist.is_main
    record = dict(script=script, run=uuid.uuid4().hex[:12], parent=None, flags=shape_flags(args),
                  experiment=experiment(args, dist.world_size), prompt_source=prompt_source(args))
    if args.fork and not args.resume:
        fail("--fork branches a resumed run into a new run folder; give --resume too")
    checkpoint, home, later, changed = None, None, [], []
    if args.resume:
        checkpoint, state = find_checkpoint(args.resume, enabled)
        theirs, where = state.get("record"), f"cannot resume from {str(checkpoint)!r}"
        if not isinstance(theirs, dict):
            fail(f"{where}: it does not record the script and flags that wrote it (an older version), so it cannot be "
                 f"checked; start a new run")
        if theirs["script"] != script:
            fail(f"{where}: it was written by {theirs['script']}.py, not {script}.py; resume it with "
                 f"{theirs['script']}.py")
        for name, value in record["flags"].items():
            if theirs["flags"].get(name) != value:
                flag = "--" + name.replace("_", "-")
                fail(f"{where}: {flag} {value} here, {flag} {theirs['flags'].get(name)} in the checkpoint; the flags "
                     f"that fix the model's shape must match: pass {flag} {theirs['flags'].get(name)}, or start a new "
                     "run")
        if "experiment" not in theirs and not args.fork:
            fail(f"{where}: it does not record its experiment (reward, prompts, seed, batch sizes: an older "
                 f"version), so a resume cannot check it; add --fork to resume it into a new run folder anyway")
        ours, recorded = record["experiment"], theirs.get("experiment", {})
        changed = [name for name in sorted(set(ours) | set(recorded)) if ours.get(name) != recorded.get(name)]
        if changed and not args.fork:
            name, more = changed[0], f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if changed[1:] else ""
            here, there = _describe(name, ours.get(name), record), _describe(name, recorded.get(name), theirs)
            fail(f"{where}: {here} here, {there} in the checkpoint{more}; these define the experiment: pass the "
                 f"checkpoint's values, or add --fork to branch a new run folder with the change")
        lacking = [key for key in theirs.get("keys", ()) if key not in state]
        if lacking:
            fail(f"{where}: its training state lacks {', '.join(map(repr, lacking))} (damaged); resume from an "
                 f"earlier checkpoint")
        expected = {**theirs.get("types", {}), "epoch": "int", "global_step": "int"}  # older records lack "types"
        wrong = [f"{key!r} is of type {type(state[key]).__name__}, not {kind}" for key, kind in expected.items()
                 if key in state and type(state[key]).__name__ != kind]
        if wrong or state["epoch"] < 0:
            fail(f"{where}: its training state is damaged ({'; '.join(wrong) or 'a negative epoch'}); resume from an "
                 f"earlier checkpoint")
        if state["epoch"] >= args.num_epochs:
            fail(f"{where}: it is at epoch {state['epoch']} and --num-epochs is {args.num_epochs}, so there is nothing "
                 f"to train; raise --num-epochs")
        if checkpoint.parent.name == "checkpoints":
            home = checkpoint.parent.parent
            later = [f.name for e, f in checkpoint_folders(home)
                     if e > state["epoch"] and checkpoint_problem(f) is None]
    if args.run_name:
        run_dir = Path(args.output_dir) / args.run_name
    elif home is not None:
        run_dir = home.parent / f"{home.name}__from_{checkpoint.name}__{int(time.time())}" if later or changed else home
    else:
        run_dir = Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if dist.world_size > 1:  # the time in the name is process 0's: every process names the same folder when it stops
        shared = [str(run_dir)]
        torch.distributed.broadcast_object_list(shared, src=0, device=dist.device)
        run_dir = Path(shared[0])
    continuing = home is not None and run_dir.resolve() == home.resolve()
    if continuing and changed:
        fail(f"--run-name {args.run_name}: --fork branches a changed experiment into a new run folder, and this is the "
             f"checkpoint's own; leave out --run-name or choose another")
    if continuing and later:
        fail(f"--run-name {args.run_name}: resuming from {checkpoint.name} in its own run folder would overwrite its "
             f"later checkpoints ({', '.join(later)}); leave out --run-name to branch into a new run folder")
    if len(f".{run_dir.name}.lock".encode()) > 255:  # the lock file's name; most file systems allow 255 bytes
        fail(f"the run folder's name {run_dir.name[:40]!r}... is {len(run_dir.name.encode())} bytes, and its lock "
             "file's name may have at most 255 (each --fork adds about 30); choose a shorter --run-name")
    try:
        run_dir.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13, OSError ELOOP after)
        fail(f"cannot use the run folder {str(run_dir)!r} ({one_line(e, 100)}); choose another --output-dir")
    if enabled:  # the folder is created only once the run can start; check now that it can be, and hold it
        parent = run_dir
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            fail(f"cannot create the run folder {str(run_dir)!r}: {str(parent)!r} is a file; choose another "
                 "--output-dir")
        try:
            tempfile.TemporaryDirectory(dir=parent).cleanup()
        except OSError as e:
            fail(f"cannot create the run folder {str(run_dir)!r}: {str(parent)!r} is not writable ({one_line(e, 60)}); "
                 f"choose a writable --output-dir")
        lock(run_dir)  # before the checks below, so that two runs starting together cannot both pass them
    if continuing and any(e > state["epoch"] and checkpoint_problem(f) is None for e, f in checkpoint_folders(home)):
        fail(f"{str(home)!r} got a checkpoint newer than {checkpoint.name} while this run started (its previous run "
             f"was still saving); resume again")
    if not continuing and checkpoint_folders(run_dir):
        fail(f"the run folder {str(run_dir)!r} already holds checkpoints of another run; choose another --run-name, or "
             f"continue that run with --resume {run_dir}")
    if continuing:
        record.update(run=theirs["run"], parent=theirs["parent"])
    elif checkpoint is not None:
        record["parent"] = f"{theirs['run']} at {checkpoint}" + (f", changing {', '.join(changed)}" if changed else "")
        if later:
            print0(f"{checkpoint.name} is older than its run's newest checkpoint {later[-1]}: this run branches into "
                   f"{run_dir}, and the later checkpoints stay as they are", enabled=enabled)
        elif changed:
            print0(f"--fork: this run branches from {checkpoint} into {run_dir}, changing {', '.join(changed)}",
                   enabled=enabled)
    run = Run(run_dir, record, args, checkpoint, enabled, resumed_weights=checkpoint is not None)
    cli.exit_in_one_line(run.next_step, enabled, run_dir)  # Ctrl-C or a full disk from here on: one line
    return run


# ----------------------------------------------------------------------------------------------------
# torch.distributed (torchrun): one process per device
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> Dist:
    """One process per device under `torchrun` (NCCL on GPU, gloo on CPU); a plain run is world size 1. A process
    that waits longer than `cli.collective_timeout()` for the others ends the job (cli.TIMEOUT_VARIABLE)."""
    import datetime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        dev = torch.device(f"cuda:{local}" if cuda else "cpu") if device in (None, "cuda") else torch.device(device)
    except RuntimeError:
        fail(f"--device {device!r} is not a device torch knows; use cuda, cuda:N or cpu")
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device {device}: the scripts run on cuda, cuda:N or cpu, not on {dev.type} devices")
    if cuda and not torch.cuda.is_available():
        fail(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or leave --device out)")
    if cuda and (dev.index or 0) >= torch.cuda.device_count():
        fail(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use a lower index")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None,
                                timeout=datetime.timedelta(seconds=cli.collective_timeout()))
        # torn down explicitly: left to the interpreter's exit, gloo's threads sometimes abort a finished process
        # ("terminate called without an active exception", about 1 run in 4 of a 2-process CPU run here)
        atexit.register(dist.destroy_process_group)
    return Dist(rank=dist.get_rank() if world > 1 else 0, world_size=world, device=dev)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every process in rank order (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def average_gradients(params):
    """All-reduce the accumulated gradients to their mean over processes (what DDP does, once per step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_flag(flag: bool, device) -> bool:
    """True on every process if it is True on any (used to stop all processes together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())



# ----------------------------------------------------------------------------------------------------
# The reward's checks, the fixed evaluation, logging and images
# ----------------------------------------------------------------------------------------------------


class CheckedReward:
    """A reward with the checks every method needs, in one place.

    A reward that raises stops the run in one line; so does one that does not return one number per image. Images
    that are not finite (a diverged model, an overflowing sampler) get a NaN reward and are counted on the device
    (no host sync per call), so that `check` can tell a diverged model from a broken reward: a reward of NaN images
    is not the reward's fault, and a reward such as JPEG size would otherwise score them as if they were fine.
    """

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.nonfinite_images = fn, name, 0

    @property
    def names(self) -> list:
        """The names of the reward's terms (rewards.WeightedSum)."""
        return self.fn.names

    def __call__(self, images, prompts, components: bool = False):
        """The reward (B,); with `components`, also its unweighted terms (B, C), as rewards.WeightedSum returns them."""
        try:
            rewards, terms = self.fn(images, prompts,
                                     components=True) if components else (self.fn(images, prompts), None)
        except Exception as e:  # noqa: BLE001 - whatever a reward raises is reported the same way
            fail(f"reward {self.name!r} raised {one_line(e)}; no update was made with these samples and earlier "
                 f"checkpoints are intact: fix the reward function")
        if not isinstance(rewards, torch.Tensor) or rewards.shape != images.shape[:1]:
            fail(f"reward {self.name!r} returned {getattr(rewards, 'shape', type(rewards).__name__)} for "
                 f"{images.shape[0]} images; a reward returns a ({images.shape[0]},) tensor, one number per image")
        finite = torch.isfinite(images).flatten(1).all(1)  # (B,)
        self.nonfinite_images = self.nonfinite_images + (~finite).sum()
        rewards = torch.where(finite, rewards.float(), torch.nan)
        return (rewards, terms) if components else rewards

    def check(self, rewards, epoch: int, run):
        """Stop (every process together) if any image since the last check, or any of `rewards`, is not finite."""
        bad_images = broadcast_flag(bool(self.nonfinite_images), rewards.device)
        self.nonfinite_images = 0
        if bad_images:
            run.diverged(f"the sampler produced non-finite images at epoch {epoch}, so no update was made with them")
        if not torch.isfinite(rewards).all():
            fail(f"reward {self.name!r} returned non-finite values for finite images at epoch {epoch}; no update was "
                 "made and earlier checkpoints are intact: check the reward function and its inputs")


class Evaluation:
    """The fixed evaluation of every script, before, during and after training: the same prompts (the set's held-out
    counterpart where one exists: common.load_eval_prompts) and the same noise (common.evaluate) at every call, so that
    images and rewards compare across epochs, and between methods run with the same seed.

    A call samples at --num-steps (the training count: its grid goes to images/TAG.png and TensorBoard) and at every
    --eval-num-steps, with --eval-eta (unset: --eta), and logs eval/reward_mean, eval/reward_mean_Nsteps and the gain
    eval/reward_gain_Nsteps over the model before training: `before`, the dict that the call tagged "before" fills and
    the checkpoints keep. Only the main process evaluates."""

    def __init__(self, args, pipe, prompts, reward_fn, neg_embeds, precision: str, logger, run_dir: Path,
                 before: dict, enabled: bool):
        self.args, self.pipe, self.prompts, self.reward_fn, self.neg_embeds = args, pipe, prompts, reward_fn, neg_embeds
        self.precision, self.logger, self.run_dir = precision, logger, run_dir
        self.before, self.enabled = before, enabled

    def __call__(self, step: int, tag: str):
        if not self.enabled:
            return
        args, device = self.args, common.denoiser(self.pipe).device
        eta = args.eta if args.eval_eta is None else args.eval_eta
        means = {}  # mean eval reward per step count: --num-steps (the training one), then --eval-num-steps
        for num_steps in dict.fromkeys([args.num_steps, *args.eval_num_steps]):
            with common.autocast(device, self.precision):
                images, rewards = common.evaluate(self.pipe, self.prompts, self.reward_fn, self.neg_embeds,
                                                  num_steps=num_steps, guidance=args.guidance, eta=eta, seed=args.seed)
            means[num_steps] = rewards.mean().item()
            if num_steps == args.num_steps:  # the image grid is of the training step count
                captions = [f"{r:.3f} {p}" for p, r in zip(self.prompts, rewards.tolist())]
                grid = image_grid(images, captions)
                (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
                grid.save(self.run_dir / "images" / f"{tag}.png")
                self.logger.image("images/eval", grid, step)
        if tag == "before":
            self.before.update(means)  # the reference of every later gain (saved in checkpoints)
        gains = {n: mean - self.before[n] for n, mean in means.items() if n in self.before}
        self.logger.scalars({"eval/reward_mean": means[args.num_steps],
                             **{f"eval/reward_mean_{n}steps": m for n, m in means.items()},
                             **{f"eval/reward_gain_{n}steps": g for n, g in gains.items()}}, step)
        print0(f"eval reward ({tag}): " + ", ".join(
            f"{n} steps {m:.4f}" + (f" ({gains[n]:+.4f})" if n in gains else "") for n, m in means.items()))


class Logger:
    """TensorBoard (and wandb with `track`) on the main process; a no-op on the others."""

    def __init__(self, run_dir: Path, config: dict, enabled: bool, track: bool = False, project: str = "diffusion-rl"):
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        try:  # the run folder is created here, once the model and any checkpoint have loaded: the run can start
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"cannot create the run folder {str(run_dir)!r} ({one_line(e)}); choose a writable --output-dir")
        if track:
            import wandb

            self.wandb = wandb.init(project=project, name=run_dir.name, config=config, sync_tensorboard=True,
                                    dir=str(run_dir))
        self.writer = SummaryWriter(str(run_dir))
        rows = "\n".join(f"|{k}|{v}|" for k, v in config.items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def scalars(self, values: dict, step: int):
        if self.enabled:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def image(self, tag: str, image: Image.Image, step: int):
        if self.enabled:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self):
        """The end of a run, on every process: the logs are closed, and under torchrun the processes wait for each other
        so that none tears down its connections while another still uses them (gloo aborted a finished process with
        "terminate called without an active exception" in about 1 run in 10 without this)."""
        if self.enabled:
            self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def image_grid(images: torch.Tensor, captions: Sequence[str] = (), ncols: int = 8, size: int = 128,
               lines: int = 3) -> Image.Image:
    """Tile images (B, 3, H, W) in [0, 1] into a grid, each with its caption under it (wrapped to `lines` lines)."""
    import textwrap

    pils = [im.resize((size, size),
                      Image.NEAREST if im.width < size else Image.BICUBIC) for im in common.to_uint8(images)]
    wrapped = [textwrap.wrap(str(c), size // 6, max_lines=lines, placeholder="..") for c in captions]
    ncols = min(ncols, len(pils))
    nrows, cap = math.ceil(len(pils) / ncols), 12 * max(map(len, wrapped), default=0) + 2 * bool(captions)
    grid = Image.new("RGB", (ncols * size, nrows * (size + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pils):
        x, y = (i % ncols) * size, (i // ncols) * (size + cap)
        grid.paste(im, (x, y))
        for j, line in enumerate(wrapped[i] if captions else ()):
            draw.text((x + 2, y + size + 1 + 12 * j), line, fill="black")
    return grid


def plot_curve(values: Sequence[float], path: Union[str, Path], title: str = "reward", size=(480, 300)):
    """A line plot as PNG with PIL alone (no plotting dependency): x = epoch, y = value."""
    w, h, pad = size[0], size[1], 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    xy = [(pad + i * (w - 2 * pad) / max(len(values) - 1, 1), h - pad - (v - lo) / (hi - lo) * (h - 2 * pad))
          for i, v in enumerate(values)]
    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    if len(xy) > 1:
        draw.line(xy, fill="blue", width=2)
    draw.text((pad, 8), f"{title}: {values[0]:.4f} -> {values[-1]:.4f}", fill="black")
    draw.text((2, pad - 4), f"{hi:.3f}", fill="black")
    draw.text((2, h - pad - 4), f"{lo:.3f}", fill="black")
    draw.text((w // 2 - 20, h - pad + 10), f"epoch (0-{len(values) - 1})", fill="black")
    img.save(path)


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar on the main process only."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)


def print0(*args, enabled: bool = True, **kwargs):
    """print on the main process only."""
    if enabled:
        print(*args, flush=True, **kwargs)
