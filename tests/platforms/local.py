"""A local machine without a GPU: no platform variables, no platform paths, no nvidia-smi, a CPU-only
torch (`torch.cuda.get_arch_list()` is empty there). No stand-ins: kaggle_secrets and google.colab
do not import."""

from tests.platforms import PlatformEnv

ENV = PlatformEnv(name="local", platform="local", environ={}, source=__doc__ or "")
