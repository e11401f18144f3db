"""A stand-in for Kaggle's public API and its notebook runner, on 127.0.0.1:7777.

kagglesdk's KaggleClient talks to http://localhost:7777/api/v1/<service>/<Rpc> when
KAGGLE_API_ENVIRONMENT=TEST (kagglesdk/kaggle_env.py, kaggle_http_client.py): POST, a JSON
body in the camelCase field names of kagglesdk's types, HTTP Basic auth with username and
API key (or a Bearer token). `server.KaggleStandIn` answers the kernel RPCs the chain uses
(GetKernel, SaveKernel, GetKernelSessionStatus, ListKernelSessionOutput,
GetAcceleratorQuotaStatistics) and "runs" each pushed version: it executes the notebook
headlessly (nbclient, `execute.py`) in a Kaggle-like environment, one run at a time.
`site/kaggle_secrets.py` is a minimal stand-in of Kaggle's secrets client for those runs.
"""
