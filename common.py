"""What every method shares: the environment, not the algorithm.

Stable Diffusion loading (hub id, local folder, or the offline `tiny` model), LoRA, prompt encoding,
the classifier-free-guidance forward, the DDIM(eta) step with its log-probability, the sampler, the entry to
the rewards (which live in rewards.py), prompt sets, image grids, logging, torch.distributed helpers, and the
one-line report of what a user can cause. Run folders, checkpoints and resume live in runs.py.

Nothing here asks which algorithm is running: advantages, losses, optimisers and the epoch loop live
in the scripts. The notation follows Black et al. 2023 (DDPO, arXiv 2305.13301):
denoising is an MDP whose action at timestep t is x_{t'} (t' the previous timestep on the inference
grid) and whose policy is the Gaussian of one DDIM(eta) step.
"""

import atexit
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

# The hub id of Stable Diffusion 1.5 (the original `runwayml/...` repository was withdrawn in 2024;
# this is its maintained mirror with the same weights).
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Offline stand-ins: same architecture classes, built from configs with seeded random weights.
TINY = "tiny"  # ~0.8M UNet parameters, 32x32 images: tests and CPU demos
SD15_RANDOM = "sd15-random"  # Stable Diffusion 1.5's exact shapes and cost: speed and memory benchmarks
# The pretrained model of the synthetic shapes world (world/shapes, made by `python -m world.pretrain`): a local
# diffusers folder that ships with the project, so learning can be seen on a CPU (docs/world.md).
SHAPES = "shapes"
SHAPES_DIR = Path(__file__).resolve().parent / "world" / "shapes"  # found by path: common imports neither world nor rewards
# Its flow-matching counterpart in SD 3.x's classes (world/shapes_flow, made by `python -m world.pretrain_flow`).
SHAPES_FLOW = "shapes-flow"
SHAPES_FLOW_DIR = SHAPES_DIR.parent / "shapes_flow"


def fail(message: str):
    """Stop with one line on stderr and a non-zero exit (the one way bad input is reported). In a torchrun job the line
    names the process, and the others are told (`tell_the_others`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tell_the_others(f"process {dist.get_rank()} failed: {message}")
        message = f"process {dist.get_rank()}: {message}"
    raise SystemExit(f"error: {message}")


# A torchrun process that fails leaves its line in the job's key-value store (torchrun's agent holds it) before it
# exits, so that the others, which see only a closed connection or torchrun's SIGTERM, can say which process failed
# and why. A process killed outright (SIGKILL, out of memory) leaves nothing: the others then say "another process".
FAILED_KEY = "diffusion_rl/failed"


def tell_the_others(line: str):
    try:
        dist.distributed_c10d._get_default_store().set(FAILED_KEY, " ".join(line.split()))
    except Exception:  # noqa: BLE001 - no store (a plain run), or it is gone: the line on stderr is what matters
        pass


def what_the_others_said() -> Optional[str]:
    """The line a failed process of this torchrun job left (see FAILED_KEY), or None."""
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.get(FAILED_KEY).decode(errors="replace") if store.check([FAILED_KEY]) else None
    except Exception:  # noqa: BLE001
        return None


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception as `Type: message` on one line (library messages often span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


# A write the machine refused: disk full, over quota, read-only file system, over the file-size limit. (Permission
# and I/O errors also come from reads, of a model or reward weights: those keep their own messages or tracebacks.)
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


# What a collective raises when another process of the job died or stopped answering (gloo; NCCL's watchdog aborts).
PEER_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def exit_in_one_line(next_step: Callable[[], str], enabled: bool = True, folder: Optional[Path] = None):
    """From now on, a Ctrl-C, a SIGTERM or a write the machine refuses ends the process with one line on stderr,
    ending with `next_step()` (what to do now), instead of a traceback. Any other exception keeps its traceback: it is
    a bug. (A sys.excepthook: it runs once the exception has unwound the program, so every `finally` has run. A refused
    write in a background writer thread is left to the main thread, to which TensorBoard's writer re-raises it.)
    `folder` is where the process writes (the run folder): a refused write without a file name is on its disk. The
    hook itself never fails: whatever the exception carries (a bytes or str file name, none), it prints its line.
    In a torchrun job a process that fails tells the others (FAILED_KEY), which then name it in their own line; once
    the line is printed, SIGTERM (torchrun's, to every process when one fails) is ignored for the rest of the exit."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        try:  # the process is ending: torchrun's SIGTERM, sent when a process fails, must not interrupt this hook or
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup at exit with a traceback of its own
        except ValueError:  # not the main thread
            pass
        try:
            line = describe(kind, error)
        except Exception:  # noqa: BLE001 - a handler that fails would print its own traceback over the original
            line = None
        try:  # a failure of this process's own, in a torchrun job: tell the others
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not (
                    issubclass(kind, KeyboardInterrupt) or peer_failed(kind, error)):
                tell_the_others(f"process {dist.get_rank()} failed: {line or one_line(error) + ' (a traceback)'}")
        except Exception:  # noqa: BLE001
            pass
        if line is None:
            return previous(kind, error, traceback)
        try:
            step = next_step()
        except Exception as e:  # noqa: BLE001
            step = f"(what to do next is unknown: {one_line(e, 60)})"
        if enabled or issubclass(kind, RuntimeError):  # a failed peer: every process says so, and what to do
            print(f"\nerror: {line}; {step}", file=sys.stderr, flush=True)
        elif not issubclass(kind, KeyboardInterrupt):  # another process of a torchrun job: its own cause, named
            print(f"\nerror (process {os.environ.get('RANK', '?')}): {line}", file=sys.stderr, flush=True)

    def describe(kind, error) -> Optional[str]:
        if issubclass(kind, KeyboardInterrupt):
            line = f"interrupted{' by SIGTERM' if str(error) == 'SIGTERM' else ''}"
            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return line
            other = what_the_others_said()  # torchrun ends every process with SIGTERM when one fails
            why = f" after {other}" if other else (" (torchrun ends every process when one fails: another process "
                                                   "failed, or the job was stopped)" if str(error) == "SIGTERM" else "")
            return f"process {dist.get_rank()}: {line}{why}"
        if issubclass(kind, OSError) and error.errno in REFUSED_WRITES:
            name = getattr(error, "filename", None)
            where = Path(os.fsdecode(name)).absolute().parent if isinstance(name, (str, bytes, os.PathLike)) else (
                Path(folder).absolute() if folder is not None else Path.cwd())
            while not where.exists() and where != where.parent:
                where = where.parent
            try:
                free = f"; {shutil.disk_usage(where).free / 1e6:.1f} MB free on the disk of {str(where)!r}"
            except OSError:
                free = ""
            return f"a write failed ({one_line(error)}{free})"
        name = getattr(error, "filename", None)
        if issubclass(kind, FileNotFoundError) and folder is not None and isinstance(name, (str, bytes, os.PathLike)) \
                and Path(folder).absolute() in Path(os.fsdecode(name)).absolute().parents:
            return (f"the run folder {str(folder)!r} was removed or moved while the run wrote to it "
                    f"({one_line(error, 100)})")
        if peer_failed(kind, error):
            other = what_the_others_said()
            if other:
                return f"process {dist.get_rank()}: stopped because {other}"
            said = " ".join(str(error).split("] ", 1)[-1].split())[:100]  # gloo's message, without its source file
            return (f"process {os.environ.get('RANK', '?')}: another process of this torchrun job failed or stopped "
                    f"answering (RuntimeError: {said}); a process waits {collective_timeout():g} s for the others "
                    f"(set {TIMEOUT_VARIABLE} to change it)")
        return None

    def peer_failed(kind, error) -> bool:
        return issubclass(kind, RuntimeError) and dist.is_available() and dist.is_initialized() and any(
            sign in str(error) for sign in PEER_FAILURES)

    def thread_hook(info):  # a writer thread (TensorBoard's) that fails hands its error to the main thread's next write
        if not (issubclass(info.exc_type, OSError) and info.exc_value.errno in REFUSED_WRITES):
            previous_thread_hook(info)

    sys.excepthook, previous_thread_hook, threading.excepthook = hook, threading.excepthook, thread_hook
    if threading.current_thread() is threading.main_thread():  # SIGTERM (a scheduler, torchrun, a study) as Ctrl-C:
        signal.signal(signal.SIGTERM, _terminated)  # the run unwinds, releases its folder and says how to continue
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)


def _terminated(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


# ----------------------------------------------------------------------------------------------------
# Flags: checked by name before anything loads, so every script that has a flag checks it the same way
# ----------------------------------------------------------------------------------------------------


def _at_least(n):
    return f"an integer >= {n}", lambda v: v >= n


_POSITIVE = "a finite number > 0", lambda v: math.isfinite(v) and v > 0
_SIZE = _at_least(1)
# flag -> (what it must be, test). A comparison with NaN is False, so every test below also rejects NaN. A flag that
# only one method has is checked in its script, after this.
FLAG_RULES = {
    "num_epochs": _at_least(1),
    "save_every": ("an integer >= 0 (0 saves only at the end)", lambda v: v >= 0),
    "image_every": ("an integer >= 0 (0 logs no images)", lambda v: v >= 0),
    "eval_num_steps": ("step counts in [1, 1000] (none: only --num-steps)", lambda v: all(1 <= n <= 1000 for n in v)),
    "lora_rank": ("an integer >= 0 (0 trains the whole UNet)", lambda v: v >= 0),
    "lora_alpha": ("a finite number > 0, or omitted for the rank", lambda v: v is None or (math.isfinite(v) and v > 0)),
    "num_steps": ("an integer in [1, 1000], Stable Diffusion's training timesteps", lambda v: 1 <= v <= 1000),
    "guidance": ("a finite number", math.isfinite),
    "sample_batch_size": _SIZE, "num_batches_per_epoch": _SIZE, "train_batch_size": _SIZE,
    "gradient_accumulation_steps": _SIZE, "num_inner_epochs": _SIZE, "value_batch_size": _SIZE, "k": _SIZE,
    "learning_rate": _POSITIVE, "value_learning_rate": _POSITIVE, "adam_epsilon": _POSITIVE,
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "max_grad_norm": ("> 0 (a negative norm reverses every update; inf turns clipping off)", lambda v: v > 0),
    "clip": ("> 0 (a negative range drops the gradient of every ratio on one side)", lambda v: v > 0),
    "adv_clip_max": ("> 0 (a negative bound sets every advantage to it)", lambda v: v > 0),
    "timestep_fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
    "timesteps_per_call": ("an integer >= 1, or omitted for the device's default", lambda v: v is None or v >= 1),
    "beta": ("a finite number >= 0 (0 turns the KL term off)", lambda v: math.isfinite(v) and v >= 0),
    "resolution": ("a positive multiple of 8 (pixels), or omitted for the model family's default",
                   lambda v: v is None or (v > 0 and v % 8 == 0)),
}
# --eta and --eval-eta depend on the family (checked in `fill_family_defaults`): family -> flag -> (requirement, test).
# DDIM's eta: above 1 a step's variance exceeds DDPM's and the mean's sqrt(1 - a' - sigma^2) turns NaN. Flow-GRPO's
# noise level a: std_t = a sqrt(sigma / (1 - sigma)) is finite for any a (flow_grpo/diffusers_patch/
# sd3_sde_with_logprob.py, line 47). 0 is deterministic, without log-probabilities: evaluation only.
ETA_RULES = {
    "sd": {"eta": ("in (0, 1]: 0 is deterministic and has no log-probabilities; above 1 a step's variance exceeds "
                   "DDPM's and the mean's sqrt(1 - a' - sigma^2) turns NaN", lambda v: 0 < v <= 1),
           "eval_eta": ("in [0, 1] on an SD 1.x/2.x model (DDIM's eta; 0 evaluates the deterministic sampler)",
                        lambda v: 0 <= v <= 1)},
    "flow": {"eta": ("a finite number > 0 on an SD 3.x model (Flow-GRPO's noise level a; 0 is the ODE, which has no "
                     "log-probabilities)", lambda v: math.isfinite(v) and v > 0),
             "eval_eta": ("a finite number >= 0 on an SD 3.x model (0 evaluates the ODE, as Flow-GRPO)",
                          lambda v: math.isfinite(v) and v >= 0)},
}


# The sampling flags a script leaves unset take its model family's defaults: on SD 1.x/2.x the script's own (its
# paper's, `SD_DEFAULTS` at the top of each script, over SD_COMMON_DEFAULTS); on SD 3.x Flow-GRPO's SD 3.5 configs
# (yifan123/flow_grpo config/grpo.py, geneval_sd3 and pickscore_sd3: 10 steps, guidance 4.5, evaluation at 40 steps,
# timestep_fraction 0.99; config/base.py: noise level 0.7; its evaluation samples with noise level 0,
# scripts/train_sd3.py line 258): no method here has a flow source of its own. (Flow-GRPO's learning rate 3e-4 and
# clip range 1e-4 are DDPO's, which PPO and LOOP already use.) An unset --eval-eta on SD 1.x/2.x stays unset: the
# evaluation samples with --eta, as it always has (and a checkpoint of an earlier version resumes unchanged). docs/flow.md has the table with every line.
FLOW_DEFAULTS = dict(num_steps=10, guidance=4.5, eta=0.7, timestep_fraction=0.99, eval_eta=0.0, eval_num_steps=(40,))
SD_COMMON_DEFAULTS = dict(timestep_fraction=1.0, eval_num_steps=(25, 100))
# Flow-GRPO's SD 3.5 resolution (config/grpo.py: `config.resolution = 512` in geneval_sd3 and pickscore_sd3)
FLOW_RESOLUTION = 512


def model_family(model: str) -> str:
    """"flow" for an SD 3.x model, "sd" for SD 1.x/2.x, read from the offline name or the folder's (or the local hub
    cache's) model_index.json without loading any weights; a model that cannot be found stops here, in one line."""
    if model in (TINY, SD15_RANDOM, SHAPES):
        return "sd"
    if model in (TINY_SD3, SD35M_RANDOM, SHAPES_FLOW):
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
    for name, value in (FLOW_DEFAULTS if family == "flow" else {**SD_COMMON_DEFAULTS, **sd_defaults}).items():
        if getattr(args, name, False) is None:
            setattr(args, name, value)
    for name, (requirement, ok) in ETA_RULES[family].items():
        if getattr(args, name, None) is not None and not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {requirement}")


def validate_args(args, sd_defaults: Optional[dict] = None):
    """Stop in one line on a flag value that would crash later or silently change the algorithm (ranges, NaN,
    divisibility of the shared sizes). Called by every script right after parsing, before anything is loaded
    or written; checks the flags by name, so a script gets exactly the checks of the flags it has. From here on a
    Ctrl-C ends the process in one line (exit_in_one_line; runs.start names the run folder later). First the
    sampling flags left unset (None) take the model family's defaults: `sd_defaults` (the script's) or FLOW_DEFAULTS."""
    exit_in_one_line(lambda: "nothing was written; run it again")  # from here on: Ctrl-C is one line
    fill_family_defaults(args, sd_defaults or {})
    check_flags(args)
    if hasattr(args, "timestep_fraction") and int(args.num_steps * args.timestep_fraction) < 1:
        fail(f"--timestep-fraction {args.timestep_fraction} of --num-steps {args.num_steps} trains "
             f"int({args.num_steps * args.timestep_fraction:g}) = 0 timesteps per trajectory; use at least {1 / args.num_steps:g}")
    if args.sample_batch_size % args.k:
        fail(f"--sample-batch-size {args.sample_batch_size} must hold whole groups of --k {args.k} images")


def check_flags(args, rules: Optional[dict] = None):
    """FLAG_RULES (and a tool's own `rules`, in the same form) for every flag `args` has, by name: the benchmarks and
    the world tools check the flags they share with the scripts exactly as the scripts do."""
    for name, (requirement, ok) in {**FLAG_RULES, **(rules or {})}.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {requirement}")


def divergence_hint(args) -> str:
    """The usual causes of non-finite losses, gradients or images, with this run's values."""
    value_lr = f" or --value-learning-rate {args.value_learning_rate:g}" if hasattr(args, "value_learning_rate") else ""
    return (f"likely causes: --learning-rate {args.learning_rate:g}{value_lr} too large, --guidance {args.guidance:g} "
            f"too large, or a reward of huge scale; lower the learning rate, then resume an earlier checkpoint or start again")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def clip_tokenizer():
    """The CLIP BPE tokenizer of Stable Diffusion 1.x, built without the network.

    open_clip ships the BPE merges (`bpe_simple_vocab_16e6.txt.gz`); the vocabulary is derived from
    them exactly as CLIP does it: 256 byte symbols, the same with `</w>`, one entry per merge, then the
    two special tokens (ids 49406 and 49407). transformers' CLIPTokenizer reads the same two files.
    """
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    merges = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(oct.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(Path(tmp, "vocab.json").as_posix(), Path(tmp, "merges.txt").as_posix(), pad_token="<|endoftext|>", model_max_length=77)


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


def _offline_pipeline(name: str, seed: int = 0):
    """Stable Diffusion built from configs with seeded random weights, without touching the network."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = name == TINY
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4) if tiny else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4,
        ) if tiny else UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, sample_size=32,
        ) if tiny else AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512,
        )
        if tiny:  # a random decoder squashes colours towards grey; amplify its output so latents move colours visibly
            vae.decoder.conv_out.weight.data.mul_(3.0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=text["hidden_size"],
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **text))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


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
    built with seed 0, so every run starts from the same "pretrained" model); `seed` seeds the LoRA init. The VAE and text encoder are frozen and cast to the `mixed_precision`
    dtype. With `lora_rank > 0` the UNet is frozen too and peft LoRA adapters (zero-initialised B, so
    the model starts exactly at the pretrained one) are attached to `lora_targets`, kept in float32;
    with `lora_rank == 0` the whole UNet is trained in float32, loaded as float32 (not rounded through the
    mixed-precision dtype first). Attention uses PyTorch's SDPA (diffusers' default processor). `channels_last`
    stores the UNet's 4-D weights in channels-last memory format (the same model; convolutions may round
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
    if model in (TINY_SD3, SD35M_RANDOM):
        pipe = _offline_sd3(model, seed=0)
    elif model in (TINY, SD15_RANDOM):
        pipe = _offline_pipeline(model, seed=0)  # the "pretrained" weights are the same for every run
    else:
        try:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(model)
            sd3 = index.get("_class_name", "").startswith("StableDiffusion3")
            # a folder saved without T5 (the flow shapes model) records it as null, which diffusers loads only if told
            no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if sd3 and not index.get("text_encoder_3", [0])[0] else {}
            # float32 first: frozen parts are cast below, a trained full UNet must not start from rounded weights
            pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32, **no_t5) if sd3 else \
                StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False)
        except (OSError, ValueError) as e:  # not a folder, not in the cache, hub unreachable or id malformed
            fail(f"model {model!r} could not be loaded: it is not a local diffusers folder and not in the local "
                 f"Hugging Face cache ({type(e).__name__}). Use --model tiny for the offline model, or pass a local folder.")
        except Exception as e:  # noqa: BLE001 - a folder that is there but incomplete or foreign (e.g. model_index.json {})
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
    """The side of the latents `sample` and `evaluate` draw: the resolution `load_pipeline` was given, else the
    family's default (`latent_size`)."""
    size = getattr(pipe, "rl_latent_size", None)
    return size or latent_size(denoiser(pipe).config, vae_scale(pipe.vae.config), is_flow(pipe))


def denoiser(pipe) -> torch.nn.Module:
    """The network that is trained: SD 1.x/2.x's UNet, or SD 3.x's transformer."""
    return pipe.transformer if is_flow(pipe) else pipe.unet


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
    """TF32 matmuls and convolutions on GPU (ddpo-pytorch's `allow_tf32 = True`): no effect on the algorithm.

    cuDNN autotuning (`cudnn.benchmark`) is left off, PyTorch's default and the references': it picks convolution
    kernels by timing them, which adds run-to-run variation on GPU for a gain nobody has measured here.
    """
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
# Prompt encoding, the CFG forward and the DDIM step with its log-probability
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
        return a_t.sqrt() * model_output + (1 - a_t).sqrt() * latents, a_t.sqrt() * latents - (1 - a_t).sqrt() * model_output
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
    _, log_prob, _ = ddim_step(pipe.scheduler, output, t, latents, num_steps=num_steps, eta=eta, prev_sample=next_latents)
    return log_prob, predicted_eps(pipe.scheduler, output, t, latents)


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


# Independent random streams of one run; every draw is a pure function of (seed, epoch, stream, ...).
NOISE, PROMPTS, SHUFFLE = 0, 1, 2


def generator(device, *keys: int) -> torch.Generator:
    """A torch.Generator seeded by a stable hash of integer keys, e.g. (seed, epoch, SHUFFLE, rank).

    Deriving every draw from the seed and the epoch makes runs reproducible and resumable bit-identically
    without saving RNG state.
    """
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_generators(seed: int, epoch: int, indices: Sequence[int], device) -> list:
    """One noise generator per sample, keyed by its GLOBAL index in the epoch: the samples do not depend
    on how a batch is split across processes (1 x 2b and 2 x b draw the same noise)."""
    return [generator(device, seed, epoch, NOISE, i) for i in indices]


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
        fail(f"{num_steps} sampling steps: the model has only {scheduler.config.num_train_timesteps} training timesteps")
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
def evaluate(pipe, prompts: Sequence[str], reward_fn, neg_embeds, *, num_steps: int, guidance: float, eta: float, seed: int):
    """Fixed prompts and fixed noise (independent of the epoch): comparable images and rewards over training."""
    embeds = encode_prompts(pipe, prompts)
    gens = sample_generators(seed, -1, range(len(prompts)), embeds.device)
    c, h = denoiser(pipe).config.in_channels, latent_side(pipe)
    x_T = draw_noise((len(prompts), c, h, h), gens, embeds.device)  # its own draw: the same x_T for any step count
    traj = sample(pipe, embeds, neg_embeds, num_steps=num_steps, guidance=guidance, eta=eta, generator=gens, latents=x_T)
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
# Flow matching (SD 3.x): Flow-GRPO's SDE step with its log-probability (docs/flow.md)
# ----------------------------------------------------------------------------------------------------

TINY_SD3 = "tiny-sd3"  # a random SD3-class model (MMDiT, two CLIP encoders, no T5): tests of the flow path
SD35M_RANDOM = "sd35m-random"  # SD 3.5 Medium's exact shapes with random weights, no T5: flow benchmarks anywhere
# LoRA on every attention projection of SD3's joint blocks, image and text streams (Flow-GRPO's SD 3.5 targets)
FLOW_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")


# SD 3.5 Medium's published configs (stabilityai/stable-diffusion-3.5-medium: transformer/, vae/, text_encoder/ CLIP-L,
# text_encoder_2/ OpenCLIP bigG), for `sd35m-random`
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_CLIPS = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, hidden_act="quick_gelu"),
               dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu"))


def _offline_sd3(name: str = TINY_SD3, seed: int = 0):
    """A StableDiffusion3Pipeline with seeded random weights, built without the network, and without T5 (diffusers
    then feeds zeros in its place, as for SD 3.5 loaded without T5); the scheduler is SD3's
    FlowMatchEulerDiscreteScheduler with shift 3. `tiny-sd3`: an 8 x 8 x 16 latent (4 x 4 patches of 2), two joint transformer blocks (the last, as in
    every SD3, without the text stream's output), two 32-wide CLIP encoders with projections (their pooled outputs
    concatenated: 64 = `pooled_projection_dim`). `sd35m-random`: SD 3.5 Medium's shapes (`SD35M_TRANSFORMER`, its
    VAE and two CLIP encoders: 1024 px, a 128 x 128 x 16 latent), 3.15B random parameters (2.24B in the transformer)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tiny = name == TINY_SD3
    clips = [dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                  hidden_act="quick_gelu")] * 2 if tiny else SD35M_CLIPS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=8) if tiny else SD3Transformer2DModel(**SD35M_TRANSFORMER)
        vae = AutoencoderKL(block_out_channels=(16, 32) if tiny else (128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
                            up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
                            layers_per_block=1 if tiny else 2,
                            norm_num_groups=8 if tiny else 32, latent_channels=16, sample_size=16 if tiny else 1024,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            **clip)) for clip in clips]
    tokenizer = clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


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


def flow_std(sigma, sigma_1, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's std_t = a sqrt(sigma / (1 - sigma)); at sigma = 1 the reference divides by 1 - sigma_1 instead."""
    return noise_level * (sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_1, device=sigma.device), sigma))).sqrt()


def flow_kl_weight(pipe, t: torch.Tensor, *, num_steps: int, eta: float) -> torch.Tensor:
    """(b,) for timesteps t (b,): the factor w_t with KL(pi_theta(.|x_t) || pi_pre(.|x_t)) = w_t mean((v_theta -
    v_pre)^2) per dimension, for two models' flow steps at the same sigma: the means differ by (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    (v_theta - v_pre) and share the variance std_t^2 (-dt), so w_t = (1 + std_t^2 (1 - sigma) / (2 sigma))^2 (-dt) /
    (2 std_t^2). Needs a noise level eta > 0."""
    sigma, sigma_next, sigma_1 = flow_step_sigmas(pipe, t, t.numel(), num_steps, pipe.transformer.device)
    std_t2 = flow_std(sigma, sigma_1, eta) ** 2
    return (1 + std_t2 * (1 - sigma) / (2 * sigma)) ** 2 * (sigma - sigma_next) / (2 * std_t2)


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
# Rewards (rewards.py) and prompts (prompts/*.txt)
# ----------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor):
    """(B, 3, H, W) floats in [0, 1] -> list of HxWx3 uint8 PIL images (one host copy for the batch)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


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
            rewards, terms = self.fn(images, prompts, components=True) if components else (self.fn(images, prompts), None)
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
            fail(f"reward {self.name!r} returned non-finite values for finite images at epoch {epoch}; no update was made "
                 f"and earlier checkpoints are intact: check the reward function and its inputs")


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


PIPE_TIMEOUT = 10.0  # seconds a prompt file that is a pipe may take to deliver its text
_PIPES = {}  # a pipe's path -> its bytes: a pipe can be read only once, and a run reads its prompts several times


def _prompt_file_bytes(path: str) -> bytes:
    """The bytes of a prompt file. A regular file is read as it is; a pipe (`--prompt-file <(...)`, a FIFO) is read
    once, to its end, for at most PIPE_TIMEOUT seconds (a FIFO that no program writes would block forever), and
    kept for the process's life."""
    import select
    import stat

    if stat.S_ISREG(os.stat(path).st_mode):
        return Path(path).read_bytes()
    if path in _PIPES:
        return _PIPES[path]
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file or a pipe", path) if Path(path).is_dir() else \
            OSError(errno.EINVAL, "not a regular file or a pipe", path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without a writer would block at open
    chunks, deadline = [], time.monotonic() + PIPE_TIMEOUT
    try:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"prompt file {path!r} is a pipe that gave no end of file within {PIPE_TIMEOUT:g} s (no program "
                     f"writes it?); give a regular file, or a pipe whose writer finishes")
            if not poll.poll(left * 1000):
                continue
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    _PIPES[path] = b"".join(chunks)
    return _PIPES[path]


def load_prompts(name: str, prompt_file: Optional[str] = None) -> list:
    """A built-in prompt set, or one prompt per non-empty line of `prompt_file` (which wins)."""
    if prompt_file is None and name not in prompt_sets():
        fail(f"unknown prompt set {name!r}; choose one of {', '.join(prompt_sets())} or pass --prompt-file")
    path = prompt_file if prompt_file is not None else PROMPTS_DIR / f"{name}.txt"
    try:
        lines = _prompt_file_bytes(str(path)).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read prompt file {str(path)!r} ({type(e).__name__}); give a UTF-8 text file, one prompt per line")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        fail(f"prompt file {str(path)!r} holds no prompts; write one prompt per line")
    return prompts


# ----------------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun), logging, images, progress
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# How long a process waits in a collective for the others (a stopped or wedged process, a stuck reward server) before
# the whole torchrun job ends, every process with one line: DIFFUSION_RL_TIMEOUT seconds in the environment, 600 by
# default (torch's own are 30 minutes on gloo and 10 on NCCL, and end the job with a traceback). An epoch's longest
# wait is the main process's evaluation, image grids and checkpoint: well under a minute for SD 1.5 on a GPU.
TIMEOUT_VARIABLE = "DIFFUSION_RL_TIMEOUT"


def collective_timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE, "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        fail(f"{TIMEOUT_VARIABLE}={value}: must be a finite number of seconds > 0")
    return seconds


def setup_distributed(device: Optional[str] = None) -> Dist:
    """One process per device under `torchrun` (NCCL on GPU, gloo on CPU); a plain run is world size 1. A process
    that waits longer than `collective_timeout()` for the others ends the job (see TIMEOUT_VARIABLE)."""
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
                                timeout=datetime.timedelta(seconds=collective_timeout()))
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

            self.wandb = wandb.init(project=project, name=run_dir.name, config=config, sync_tensorboard=True, dir=str(run_dir))
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


def image_grid(images: torch.Tensor, captions: Sequence[str] = (), ncols: int = 8, size: int = 128, lines: int = 3) -> Image.Image:
    """Tile images (B, 3, H, W) in [0, 1] into a grid, each with its caption under it (wrapped to `lines` lines)."""
    import textwrap

    pils = [im.resize((size, size), Image.NEAREST if im.width < size else Image.BICUBIC) for im in to_uint8(images)]
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
