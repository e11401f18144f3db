"""A Kaggle notebook session with the "GPU P100" accelerator: Kaggle's variables (kaggle_t4x2), one
Tesla P100 (sm_60, 16 GiB) and the same cu128 torch, which ships no sm_60 kernels, so every CUDA
op fails with "no kernel image is available for execution on the device" (Kaggle/kaggle-cli #1151;
Kaggle/docker-python #1546). Kaggle's answer in #1151: use T4 or L4.
"""

from dataclasses import replace

from tests.platforms.kaggle_t4x2 import ENV as T4X2

ENV = replace(T4X2, name="kaggle-p100", nvidia_smi="Tesla P100-PCIE-16GB, 16384, 16269, 6.0\n", source=__doc__ or "")
