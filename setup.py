"""Installs the ``cnn_mellin`` package, its ``conf/`` files and the ``cnn-mellin`` command."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(
    r'__version__ = "([^"]+)"', Path("cnn_mellin/__init__.py").read_text()
).group(1)

setup(
    name="cnn-mellin",
    version=version,
    description="Hyperparameter search for CTC acoustic models with linear or Mellin "
    "correlation layers, on shared Optuna studies",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cnn_mellin", "cnn_mellin.*"]) + ["cnn_mellin._conf"],
    package_dir={"cnn_mellin._conf": "conf"},
    package_data={
        "cnn_mellin._conf": ["feats/*.json", "optim/*.ini"],
        "cnn_mellin.data": ["timit/*"],
        "cnn_mellin.optim.report": ["template.html"],
    },
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "optuna>=5,<6",
        "sqlalchemy>=2,<3",
        "pymysql",
        "psycopg2-binary",
        # grpc://HOST:PORT, Optuna's storage proxy for hundreds of workers (optim serve); a
        # dependency, not an extra: every worker of a pool must have it (README)
        "grpcio>=1.68.1",
        "protobuf>=5.28.1",
        "h5py",
        "numpy",
        "scipy",
        "pandas",
        "plotly",
        "kaleido>=1,<2",  # PNG export of plotly figures through a Chrome/Chromium on the machine
        "tqdm",
        "scikit-learn",
        "soundfile",
        "safetensors",  # the attack's reconstructions: a safe, framework-neutral tensor file
    ],
    # selenium drives Debian's chromium/chromedriver in the browser tests; optuna-dashboard is
    # tested on our studies
    extras_require={"dev": ["pytest", "ruff", "selenium", "optuna-dashboard"]},
    entry_points={"console_scripts": ["cnn-mellin = cnn_mellin.cli:main"]},
)
