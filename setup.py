"""emim: self-supervised representation learning by mutual-information maximisation."""

from setuptools import find_packages, setup

setup(
    name="emim",
    version="0.1.0",
    description="Explicit mutual-information maximisation for self-supervised learning, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["emim", "emim.*"]),
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=[
        # Lower bounds only: the accelerator machines run newer jax/flax than CPU CI.
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tensorflow-datasets imports it without declaring it
        "ml-collections>=1.1",
        "clu>=0.0.12",
        "etils[epath]",  # one path type for local and gs:// work directories
        "grain>=0.2.18",
        "numpy",
        "scipy",  # digamma for the debiased Gaussian MI, logsumexp for the mixture's exact MI
        "pillow",
        "safetensors",  # the PyTorch export
    ],
    extras_require={
        # TensorFlow only for preparing TFDS datasets and writing TensorBoard events;
        # the train and eval programs run without it.
        "tf": ["tensorflow-cpu", "tensorboard"],
        # TensorBoard event files need only the tensorboard package, not TensorFlow.
        "tensorboard": ["tensorboard"],
        # gs:// work directories: etils.epath reads and writes them through gcsfs (Orbax's
        # checkpoint arrays go through TensorStore, which speaks GCS itself).
        "gcs": ["gcsfs"],
        # libtpu (about 680 MB), for a Cloud TPU VM, and on any machine for compiling emim's
        # programs ahead of time for TPU slices (python -m emim.aot, the TPU compile
        # tests). jax's own tpu extra pins the libtpu built for the installed jax.
        "tpu": ["jax[tpu]"],
        # jax's CUDA plugin and NVIDIA's libraries (about 5 GB), for a GPU machine, and on any
        # machine for compiling emim's programs ahead of time for GPU hosts (python -m emim.aot
        # --target=h100:8; docs/aot.md). Best in its own virtual environment: on a machine
        # without a GPU, a JAX process that does not set JAX_PLATFORMS=cpu (emim.aot does) prints
        # the plugin's failure to find one before it falls back to the CPU.
        "cuda-aot": ["jax[cuda12]"],
        # Every metric to Weights & Biases as well (config.train.wandb_project).
        "wandb": ["wandb"],
        # The documentation site (mkdocs.yml): mkdocs build --strict, as CI runs it.
        "docs": ["mkdocs>=1.6", "mkdocs-material"],
        # python -m emim.plots and the experiments' figures.
        "plots": ["matplotlib"],
        # The GCS emulator lets the tests run a gs:// work directory without the network.
        # setuptools: the wheel test; matplotlib and the Jupyter packages: the figures and the
        # notebook, executed top to bottom.
        # pytest-xdist: the suite runs in two processes (pytest.ini).
        # wandb: the W&B writer's test, in its offline mode.
        # timm: the ViT export's test loads it into timm's VisionTransformer. timm needs torch and
        # torchvision: install PyTorch's CPU build first with its own torchvision (.ci/run does),
        # or pip takes the newest torchvision and with it a newer torch, a CUDA build on Linux.
        "test": ["pytest", "pytest-xdist", "tensorboard", "gcsfs", "gcp-storage-emulator", "setuptools>=70.1",
                 "matplotlib", "jupytext", "nbclient", "nbformat", "ipykernel", "wandb", "timm"],
    },
)
