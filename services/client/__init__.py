"""`InfluenceClient`: the Python client of a running system (or of the embedded one).

    client = InfluenceClient("localhost:50051")
    dataset = client.register_dataset("model_dir", "train.jsonl")
    factors = client.fit_factors("model_dir", dataset.name)
    result = client.compute_scores("model_dir", factors.name, dataset.name, queries)
    client.download_result(result.name, "out_dir")   # scores.safetensors + results.json

Every create call sends a request_id, so retrying it after UNAVAILABLE is safe; only what the
error table calls retryable (UNAVAILABLE) is retried, long enough to outlast a server restart.
`wait` waits on the Operations service and reports progress; `wait_for(name)` reattaches to an
operation started earlier.

Against a server started with --auth-tokens, give `token=` (default: INFLUENCE_TOKEN): it goes
with every call as `authorization: Bearer TOKEN`. TLS: `tls_ca=` the CA that signed the server's
certificate (INFLUENCE_TLS_CA), and for mutual TLS `tls_cert=`/`tls_key=` the client's own
(INFLUENCE_TLS_CERT, INFLUENCE_TLS_KEY): PEM file paths.

    channel.py      channels, TLS credentials, the token, the one retry policy
    transfers.py    uploads in chunks, downloads resumed across broken streams
    connection.py   stubs, calls under the retry policy, operations (create, wait, list, cancel)
    resources.py    InfluenceClient: datasets, factor sets, indexes, score results

No torch and no server-side module is imported here (tests/services/test_layering.py checks it).
"""

from .connection import operation_metadata
from .resources import InfluenceClient, model_spec

__all__ = ["InfluenceClient", "model_spec", "operation_metadata"]
