"""A Colab session with a T4 GPU (the free tier), as its processes see it.

Sources (googlecolab/colabtools):
- COLAB_RELEASE_TAG: read by google/colab/_serverextension/_handlers.py; its form follows the
  runtime image tags (`release-colab_…`, Kaggle/kagglehub tests: "release-colab-20230531-060125-RC00").
- TBE_RUNTIME_ADDR: google/colab/runtime.py POSTs `http://$TBE_RUNTIME_ADDR/unassign`;
  TBE_CREDS_ADDR / TBE_EPHEM_CREDS_ADDR: google/colab/drive.py reads them to mount Drive.
- CLOUDSDK_CONFIG: google/colab/auth.py reads it; gcloud's folder on Colab is /content/.config.
- /var/colab/hostname: google/colab/drive.py refuses to mount without it ("unsupported in this
  environment"); /content is the working folder.
- COLAB_GPU ("1" on a GPU runtime): set by Colab's runtime and checked by libraries that detect Colab;
  no colabtools file reads it. The TBE_* addresses are the values Colab environment dumps show;
  no test connects to them.
- GPU: one Tesla T4 (sm_75, 15 GiB) in nvidia-smi's CSV query format; torch as on Kaggle (cu128).
None of Kaggle's variables: Colab's image carries nothing of Kaggle's.
"""

from tests.platforms import HERE, PlatformEnv
from tests.platforms.torch_builds import CU128, PLATFORM_TORCH

ENV = PlatformEnv(
    name="colab-t4",
    platform="colab",
    environ={
        "COLAB_RELEASE_TAG": "release-colab-external-images_20260514-060047_RC00",
        "COLAB_GPU": "1",
        "TBE_RUNTIME_ADDR": "172.28.0.1:8011",
        "TBE_CREDS_ADDR": "172.28.0.1:8008",
        "TBE_EPHEM_CREDS_ADDR": "172.28.0.1:8009",
        "CLOUDSDK_CONFIG": "/content/.config",
    },
    paths=frozenset({"/content", "/content/.config", "/var/colab", "/var/colab/hostname"}),
    nvidia_smi="Tesla T4, 15360, 15095, 7.5\n",
    arch_list=CU128,
    torch_version=PLATFORM_TORCH,
    stand_ins=(HERE / "colab",),
    source=__doc__ or "",
)
