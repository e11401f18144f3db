"""`torch.cuda.get_arch_list()` of the torch wheels the platforms ship.

Source: pytorch/pytorch .ci/manywheel/build_cuda.sh (torch 2.8-2.10): the base list is
TORCH_CUDA_ARCH_LIST="7.0;7.5;8.0;8.6;9.0"; CUDA 12.6 prepends 5.0;6.0 (the last build with Pascal);
CUDA 12.8 appends 10.0;12.0; CUDA 13.0 is "7.5;8.0;8.6;9.0;10.0;12.0+PTX". No "+PTX" means no
compute_XX entry. Kaggle's default image ships a cu128 torch with no sm_60 kernels
(Kaggle/kaggle-cli #1151, 2026-07); Colab's runtime image is the base of Kaggle's
(Kaggle/docker-python PR #1444), so the same build serves both.
"""

CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU128 = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
PLATFORM_TORCH = "2.9.0+cu128"
"""A cu128 build, as on Kaggle and Colab in 2026 (the exact version changes with each image)."""
