"""What runs inside a replica: the deployment, its versions, batching, the request ledger, HTTP."""
