"""A Kaggle notebook session with the "GPU T4 x2" accelerator, as its processes see it.

Sources:
- Kaggle's own variables: Kaggle/docker-python patches/kaggle_web_client.py (KAGGLE_URL_BASE,
  default https://www.kaggle.com; KAGGLE_USER_SECRETS_TOKEN, the JWT the secrets service wants;
  KAGGLE_IAP_TOKEN), patches/kaggle_gcp.py and sitecustomize.py (KAGGLE_DATA_PROXY_URL,
  KAGGLE_DATA_PROXY_TOKEN, KAGGLE_DATA_PROXY_PROJECT, KAGGLE_KERNEL_INTEGRATIONS), the `test`
  script's docker run (the same set, with test values); Kaggle/kagglehub src/kagglehub/env.py
  (KAGGLE_KERNEL_RUN_TYPE marks a notebook: "Interactive" in the editor, "Batch" for a saved
  version; tests/test_kaggle_api_client.py uses KAGGLE_DATA_PROXY_URL=https://dp.kaggle.net).
- Colab's variables on Kaggle: since Kaggle/docker-python PR #1444 (2024-11) the image is
  `FROM us-docker.pkg.dev/colab-images/public/runtime:release-colab-external-images_…`
  (Dockerfile.tmpl), so COLAB_RELEASE_TAG is set on Kaggle (Kaggle/kagglehub PR #230 stopped
  using it to detect Colab for that reason) and google.colab imports.
- Paths: /kaggle/working (the saved output), /kaggle/input (attached data).
- GPUs: two Tesla T4 (sm_75, 15 GiB each) in nvidia-smi's CSV query format.
Token values are fakes; the secrets service behind KAGGLE_URL_BASE is tests/platforms/kaggle_service.py.
"""

from tests.platforms import HERE, PlatformEnv
from tests.platforms.torch_builds import CU128, PLATFORM_TORCH

KAGGLE_VARS = {
    "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
    "KAGGLE_URL_BASE": "https://www.kaggle.com",
    "KAGGLE_USER_SECRETS_TOKEN": "fake-kaggle-user-secrets-jwt",
    "KAGGLE_DATA_PROXY_URL": "https://dp.kaggle.net",
    "KAGGLE_DATA_PROXY_TOKEN": "fake-kaggle-data-proxy-jwt",
    "KAGGLE_DATA_PROXY_PROJECT": "kaggle-data-proxy",
    "KAGGLE_KERNEL_INTEGRATIONS": "",
    "KAGGLE_GRPC_DATA_PROXY_URL": "dp.kaggle.net:443",
    # The notebook's own API token file, which kagglesdk prefers inside a notebook (kagglesdk kaggle_env.py
    # get_access_token_from_env: used when KAGGLE_KERNEL_RUN_TYPE and KAGGLE_DATA_PROXY_URL are set). The
    # variable's name is kagglesdk's; the path is a stand-in (Kaggle does not publish it).
    "KAGGLE_API_V1_TOKEN": "/kaggle/standin/api-v1-token",
}
COLAB_IMAGE_VARS = {"COLAB_RELEASE_TAG": "release-colab-external-images_20260514-060047_RC00"}
"""What Kaggle inherits from Colab's image (the tag matches the FROM line of Dockerfile.tmpl)."""
KAGGLE_PATHS = frozenset({"/kaggle/working", "/kaggle/input"})
T4 = "Tesla T4, 15360, 15095, 7.5"

ENV = PlatformEnv(
    name="kaggle-t4x2",
    platform="kaggle",
    environ={**COLAB_IMAGE_VARS, **KAGGLE_VARS},
    paths=KAGGLE_PATHS,
    nvidia_smi=f"{T4}\n{T4}\n",
    arch_list=CU128,
    torch_version=PLATFORM_TORCH,
    stand_ins=(HERE / "kaggle", HERE / "colab"),
    source=__doc__ or "",
)
