"""Installs micle_tf (models, training, evaluation, export) and data_pipelines (records)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("micle_tf").joinpath("__init__.py").read_text()).group(1)

setup(
    name="micle-tf",
    version=VERSION,
    description="SimCLR and MICLe (Multi-Instance Contrastive Learning) in Keras 3 / TensorFlow "
                "for medical image classification",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["micle_tf", "micle_tf.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=[
        "tensorflow-cpu==2.21.*; platform_machine=='x86_64' or platform_machine=='AMD64'",
        "tensorflow==2.21.*; platform_machine!='x86_64' and platform_machine!='AMD64'",
        "keras>=3.12,<4",
        "tensorflow-datasets==4.9.10",
        "importlib_resources>=6",  # tfds imports it but does not declare it on Python >= 3.9
        "absl-py>=2.1",
        "tensorboard>=2.20",  # tf.summary needs it; tensorflow-cpu 2.21 no longer pulls it in
        "scikit-learn>=1.4",
        "numpy>=1.26,<3",
        "pillow>=10",
        "matplotlib>=3.8",
        "openpyxl>=3.1",
    ],
    extras_require={
        # Replaces the CPU wheel: install with `pip uninstall -y tensorflow-cpu` first (never both).
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        "dicom": ["pydicom>=3.0", "pydicom-data==1.0.0"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10",
                "ipykernel>=6.29", "pydicom>=3.0", "pydicom-data==1.0.0"],
    },
    entry_points={
        "console_scripts": [
            "micle-data=data_pipelines.cli:run",
            "micle-pretrain=micle_tf.cli.pretrain:run",
            "micle-finetune=micle_tf.cli.finetune:run",
            "micle-evaluate=micle_tf.cli.evaluate:run",
            "micle-export=micle_tf.cli.export:run",
            "micle-demo=micle_tf.cli.demo:run",
        ]
    },
)
