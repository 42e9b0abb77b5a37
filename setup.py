"""dit-jax: DiT (Peebles & Xie, 2023) and DDT in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="dit-jax",
    version="0.1.0",
    description="Paper-exact DiT and DDT in JAX/Flax NNX, from a laptop CPU to a TPU pod.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dit_jax", "dit_jax.*", "configs"]),
    package_data={"configs": ["*.py"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "numpy>=2.0",
        "pillow>=10",
        "matplotlib>=3.8",  # the loss chart (dit_jax.train.chart), Agg canvas
        "safetensors>=0.4",
        "tqdm>=4.60",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "array-record>=0.8",
        "tensorboardX>=2.6",
        "scikit-learn>=1.5",
        "scipy>=1.11",  # FID: scipy.linalg.sqrtm, as the ADM evaluator
    ],
    extras_require={
        # reading official .pt checkpoints; the CPU build (a newer torch pulls a CUDA build)
        "torch": ["torch==2.13.0"],
        "test": ["torch==2.13.0", "diffusers==0.42.1", "pytest==9.2.0"],
    },
    entry_points={"console_scripts": ["dit-jax=dit_jax.cli:main"]},
)
