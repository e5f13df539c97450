import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Nothing in the suite may touch the network: make the hub libraries fail fast instead of trying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The offline tiny Stable Diffusion with LoRA rank 4 (adapters zero-initialised)."""
    return common.load_pipeline("tiny", lora_rank=4, seed=0)


@pytest.fixture(scope="session")
def embeds(tiny):
    prompts = ["a red image", "a blue image", "a green image"]
    return prompts, common.encode_prompts(tiny, prompts), common.encode_prompts(tiny, [""])


def perturb_lora(unet, seed=0, scale=0.05):
    """Give the (zero-initialised) LoRA B matrices random values so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.grad = None  # and leave no gradients behind for the next test
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
