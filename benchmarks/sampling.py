"""Our sampler (with per-step log-probs) against diffusers' StableDiffusionPipeline.__call__.

Same model, steps, batch, CFG scale and eta; both decode to images. Prints the median wall time of each
and their ratio (ours / diffusers; the aim is <= 1.05).

    python benchmarks/sampling.py                                   # tiny model, CPU
    python benchmarks/sampling.py --model sd15-random --batch 8     # SD 1.5's shapes, random weights (GPU)
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@dataclass
class Args:
    model: str = "tiny"
    """hub id, local folder, `tiny` or `sd15-random`"""
    batch: int = 8
    """images per call"""
    num_steps: int = 20
    """DDIM steps"""
    guidance: float = 5.0
    """classifier-free guidance scale"""
    eta: float = 1.0
    """DDIM eta"""
    mixed_precision: str = "auto"
    """no, fp16, bf16, or auto (fp16 on GPU, no on CPU: common.resolve_precision)"""
    repeats: int = 5
    """timed calls of each (after one warm-up call)"""


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common.exit_in_one_line(lambda: "nothing was written; run it again")  # Ctrl-C: one line
    precision = common.resolve_precision(args.mixed_precision, device)
    common.speed_flags(device)
    pipe = common.load_pipeline(args.model, device=device, mixed_precision=precision, lora_rank=0)
    pipe.unet.requires_grad_(False)
    if precision != "no":  # inference only: the UNet may be in the low precision too, as diffusers runs it
        pipe.unet.to(common.DTYPES[precision])
    prompts = ["a photo of a cat"] * args.batch
    embeds = common.encode_prompts(pipe, prompts)
    neg = common.encode_prompts(pipe, [""])
    shape = (args.batch, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator(device).manual_seed(0), device=device)

    def ours():
        with common.autocast(device, precision):
            common.sample(pipe, embeds, neg, num_steps=args.num_steps, guidance=args.guidance, eta=args.eta,
                          generator=torch.Generator(device).manual_seed(0), latents=latents)

    def theirs():
        with torch.no_grad(), common.autocast(device, precision):
            pipe(prompt_embeds=embeds, negative_prompt_embeds=neg.expand(args.batch, -1, -1), latents=latents,
                 num_inference_steps=args.num_steps, guidance_scale=args.guidance, eta=args.eta,
                 generator=torch.Generator(device).manual_seed(0), output_type="pt")

    times = {"ours": [], "diffusers": []}
    for name, fn in (("ours", ours), ("diffusers", theirs)):
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        times["ours"].append(timed(ours, device))
        times["diffusers"].append(timed(theirs, device))
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"model={args.model} device={device} precision={precision} batch={args.batch} steps={args.num_steps} "
          f"cfg={args.guidance} eta={args.eta}")
    print(f"ours (with log-probs): {ours_s:.3f} s   diffusers pipeline: {theirs_s:.3f} s   ratio: {ours_s / theirs_s:.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
