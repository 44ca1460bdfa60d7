"""Install groma-px: the ``groma_px`` framework and the standalone ``region_proposer`` package."""

from pathlib import Path

from setuptools import find_packages, setup

# Core pins: the versions measured to install and work together (see docs/ENV.md).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
    "timm==1.0.31",
    "mmengine==0.10.7",
    "pycocotools==2.0.11",
    "scipy==1.17.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "wandb==0.31.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "pycocoevalcap==1.2",  # only its Bleu and Cider scorers (no Java tokenizer)
    "optuna==5.0.0",  # tools/sweep.py: method "optuna" (TPE)
    "pyyaml",
    "tqdm",
]

EXTRAS_REQUIRE = {
    "dev": ["pytest==9.2.0", "hypothesis==6.170.15", "pytest-timeout==2.4.0", "ruff==0.17.6"],
    # flash-attn builds only on CUDA machines with the toolkit; the code falls back to SDPA.
    "flash": ["flash-attn"],
}

setup(
    name="groma-px",
    version="0.1.0",
    description="Grounded multimodal LLMs with decoupled perception (Groma and relatives)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["groma_px", "groma_px.*", "region_proposer", "region_proposer.*"]
    ),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
