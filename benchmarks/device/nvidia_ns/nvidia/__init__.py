"""``nvidia`` as one package over every ``nvidia/`` directory on ``sys.path`` (the GPU check's DALI, installed
with ``pip --target`` into its own directory, beside the image's CUDA wheels).

NVIDIA's CUDA runtime wheels ship a regular ``nvidia/__init__.py``; a regular package found anywhere on the path
wins over namespace portions, so DALI's ``nvidia/dali`` in another directory would never be seen. This directory
goes FIRST on ``PYTHONPATH`` (``benchmarks/gpu_check.sh``, ``benchmarks/device/receive_part.sh``): its regular
``nvidia`` is the one imported, and ``extend_path`` adds every other ``nvidia/`` directory on ``sys.path`` (the
image's, DALI's), in path order, whether they are regular packages or namespace portions.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
