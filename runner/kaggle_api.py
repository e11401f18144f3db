"""The Kaggle API as the chain uses it: the user's credentials, and one notebook's pull and push.

Owns: `KaggleCredentials` (never shown: the key is left out of repr and messages), the
`KaggleApi` protocol the chain calls, and `SdkKaggleApi`, which speaks it through kagglesdk's
KernelsApiService (GetKernel, SaveKernel, GetAcceleratorQuotaStatistics) the way `kaggle kernels
pull/push` and `kaggle quota` do; `accelerator_for` picks the successor's machine. The API facts,
with their sources, are in docs/chain.md.

Must not: decide anything (runner/chain.py does), read secrets or files itself, or import
kagglesdk at module level (it is an optional extra, imported when a request is due).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from runner.errors import CredentialsError, RelayError, UsageError

log = logging.getLogger(__name__)

USER_AGENT = "relay-chain kagglesdk"
"""kagglesdk's KaggleClient sends an empty User-Agent unless given one (kaggle_client.py `user_agent=''`)."""
DEFAULT_ACCELERATOR = "NvidiaTeslaT4"  # Kaggle's "GPU T4 x2" (kaggle-cli docs/kernels.md)
# GPU name fragment → Kaggle accelerator id (kaggle-cli docs/kernels.md, "Accelerators available").
# A P100 becomes a T4: current Kaggle torch builds have no sm_60 kernels (kaggle-cli #1151).
ACCELERATORS = (("T4", "NvidiaTeslaT4"), ("L4", "NvidiaL4"), ("A100", "NvidiaTeslaA100"), ("H100", "NvidiaH100"))


class KaggleApiError(RelayError):
    """The Kaggle API refused or failed a request. The message never holds the key."""


@dataclass(frozen=True)
class KaggleCredentials:
    """The user's own Kaggle API credentials: username + key (kaggle.json), or an API token."""

    username: str
    key: str = dataclasses.field(default="", repr=False)
    token: str = dataclasses.field(default="", repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> KaggleCredentials:
        """KAGGLE_API_TOKEN (the token kaggle.com → Settings → API → "Generate New Token" issues), else
        KAGGLE_USERNAME + KAGGLE_KEY (a legacy kaggle.json key). Never the notebook's own session token
        (the file named by KAGGLE_API_V1_TOKEN): see `SdkKaggleApi`."""
        username, key, token = (
            environ.get(n, "").strip() for n in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")
        )
        if token or (username and key):
            return cls(username, "" if token else key, token)
        raise CredentialsError(
            "no Kaggle API credentials for the chain (KAGGLE_API_TOKEN, or KAGGLE_USERNAME with KAGGLE_KEY)",
            hint="add them as Kaggle secrets of the notebook (Add-ons → Secrets), or turn the chain off",
        )

    @property
    def kind(self) -> str:
        """Which credential the chain sends (for messages; never the value)."""
        return "your API token (KAGGLE_API_TOKEN)" if self.token else f"the API key of {self.username} (KAGGLE_KEY)"

    @classmethod
    def from_kaggle_json(cls, text: str, source: str = "kaggle.json") -> KaggleCredentials:
        try:
            data = json.loads(text)
            return cls(str(data["username"]), str(data["key"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CredentialsError(
                f'{source}: not a kaggle.json ({{"username": …, "key": …}})',
                hint="paste the whole kaggle.json from kaggle.com → Settings → API as the secret's value",
            ) from None


def _send_only(client, credentials: KaggleCredentials) -> None:
    """Make kagglesdk send `credentials` and nothing else.

    kagglesdk (kaggle_http_client.py `_try_fill_auth`) uses an api_token argument as given; without one
    it looks for a token first (kaggle_env.py `get_access_token_from_env`): inside a Kaggle notebook
    (KAGGLE_KERNEL_RUN_TYPE and KAGGLE_DATA_PROXY_URL set) the notebook's session token in the file named
    by KAGGLE_API_V1_TOKEN, then KAGGLE_API_TOKEN, then ~/.kaggle/access_token, and only then username
    and key. So a user's legacy key would never be sent from a notebook. The session is set up now,
    and its auth replaced by the user's own credential."""
    if credentials.token:
        return  # an api_token argument is used as given
    http = client._http_client
    http._init_session()
    http._session.auth = (credentials.username, credentials.key)


class KaggleApi(Protocol):
    def get_kernel(self, ref: str) -> tuple[dict, str]:
        """(metadata as the API names it, source) of notebook USER/SLUG."""

    def save_kernel(self, ref: str, metadata: dict, source: str, accelerator: str) -> int:
        """Push a new version (which starts a run); its version number."""

    def gpu_quota_left_h(self) -> float | None:
        """Weekly GPU hours left, where the API tells; None where it does not."""


class SdkKaggleApi:
    """KaggleApi over kagglesdk's KernelsApiService (the client `kaggle kernels push/pull` uses).

    kagglesdk picks its endpoint from KAGGLE_API_ENVIRONMENT (unset: api.kaggle.com; TEST:
    http://localhost:7777, which the tests' stand-in serves)."""

    def __init__(self, credentials: KaggleCredentials) -> None:
        try:
            from kagglesdk import KaggleClient
        except ImportError:
            raise UsageError(
                "the Kaggle chain needs kagglesdk",
                hint="pip install 'relay-runner[kaggle]' (or: pip install kagglesdk)",
            ) from None
        self._client = KaggleClient(username=credentials.username or None, password=credentials.key or None,
                                    api_token=credentials.token or None, user_agent=USER_AGENT)  # fmt: skip
        _send_only(self._client, credentials)
        self.quota_note = ""

    def _call(self, what: str, fn, request):
        try:
            return fn(request)
        except Exception as exc:  # requests' HTTPError and connection errors; the message names no secret
            status = getattr(getattr(exc, "response", None), "status_code", None)
            raise KaggleApiError(f"Kaggle API {what} failed ({status or type(exc).__name__}): {exc}") from None

    def get_kernel(self, ref: str) -> tuple[dict, str]:
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

        user, slug = ref.split("/")
        req = ApiGetKernelRequest()
        req.user_name, req.kernel_slug = user, slug
        resp = self._call("GetKernel", self._client.kernels.kernels_api_client.get_kernel, req)
        meta = type(resp.metadata).to_dict(resp.metadata) if resp.metadata else {}
        return meta, (resp.blob.source if resp.blob else "") or ""

    def save_kernel(self, ref: str, metadata: dict, source: str, accelerator: str) -> int:
        from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelRequest

        req = ApiSaveKernelRequest()  # built as kaggle-cli's kernels_push builds it
        req.slug, req.text = ref, notebook_text(source)
        if metadata.get("title"):
            req.new_title = str(metadata["title"])
        req.language, req.kernel_type = metadata.get("language") or "python", metadata.get("kernelType") or "notebook"
        req.is_private = metadata.get("isPrivate", True)
        req.enable_gpu, req.enable_internet, req.machine_shape = True, True, accelerator
        req.dataset_data_sources = list(metadata.get("datasetDataSources") or [])
        req.kernel_data_sources = list(metadata.get("kernelDataSources") or [])
        req.competition_data_sources = list(metadata.get("competitionDataSources") or [])
        req.model_data_sources = list(metadata.get("modelDataSources") or [])
        if metadata.get("dockerImage"):
            req.docker_image = metadata["dockerImage"]
        resp = self._call("SaveKernel", self._client.kernels.kernels_api_client.save_kernel, req)
        if resp.error:
            raise KaggleApiError(f"Kaggle refused the push of {ref}: {resp.error}")
        return int(resp.version_number or 0)

    def gpu_quota_left_h(self) -> float | None:
        """Weekly GPU hours left: allowed − used − reserved, as GetAcceleratorQuotaStatistics reports them
        (`kaggle quota`, kaggle-cli PR #1029), counted as the API counts them (no factor for two GPUs).
        None where the answer is missing; `quota_note` then says why."""
        try:
            from kagglesdk.kernels.types.kernels_api_service import ApiGetAcceleratorQuotaStatisticsRequest

            call = self._client.kernels.kernels_api_client.get_accelerator_quota_statistics
        except (ImportError, AttributeError):
            self.quota_note = (f"this kagglesdk ({_sdk_version()}) has no GetAcceleratorQuotaStatistics "
                               "(pip install -U kagglesdk)")  # fmt: skip
            return None
        try:
            resp = self._call("GetAcceleratorQuotaStatistics", call, ApiGetAcceleratorQuotaStatisticsRequest())
        except KaggleApiError as exc:  # older servers: fall back to the run's own session records
            self.quota_note = f"Kaggle did not tell the quota ({exc})"
            return None
        quota = resp.gpu_quota
        if quota is None or quota.total_time_allowed is None:
            self.quota_note = "Kaggle's answer had no GPU quota"
            return None
        used = sum(((t.total_seconds() if t else 0.0) for t in (quota.time_used, quota.time_reserved)), 0.0)
        return max(0.0, (quota.total_time_allowed.total_seconds() - used) / 3600.0)


def _sdk_version() -> str:
    try:
        from importlib.metadata import version

        return "kagglesdk " + version("kagglesdk")
    except Exception:  # noqa: BLE001 - only for the message
        return "kagglesdk"


def accelerator_for(gpu_names: Sequence[str], metadata: dict) -> str:
    """The machine the successor asks for: the GPUs this session has (T4 ×2 → NvidiaTeslaT4), whatever
    GetKernel says of the notebook's last saved version, which may be stale (a P100 chosen once, say).
    The notebook's machineShape counts only where this session saw no GPU, and a P100 never: current
    Kaggle torch builds have no sm_60 kernels (kaggle-cli #1151)."""
    for name in gpu_names:
        for fragment, accelerator in ACCELERATORS:
            if fragment in name:
                return accelerator
    shape = str(metadata.get("machineShape") or "")
    return shape if shape and "P100" not in shape else DEFAULT_ACCELERATOR


def notebook_text(source: str) -> str:
    """The notebook as `kaggle kernels push` sends it (kaggle-cli kaggle_api_extended.py kernels_push): every
    code cell's outputs cleared, and each cell's source one string, since the server expects just one."""
    try:
        nb = json.loads(source)
    except ValueError:
        return source  # a script, not a notebook
    for cell in nb.get("cells", []) if isinstance(nb, dict) else []:
        if cell.get("cell_type") == "code" and "outputs" in cell:
            cell["outputs"] = []
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    return json.dumps(nb)
