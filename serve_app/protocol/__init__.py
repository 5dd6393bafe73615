"""Bytes <-> numpy for each wire format. No Ray, no Starlette.

`predict_api` (`/predict`), `kserve_v1`, `oip_v2` (Open Inference Protocol V2, JSON and
binary) and `ndjson` (`/predict/stream`) each decode a request into a numeric array (finite
when it came from JSON); `json` holds what the JSON formats share. Shape, row count and
finiteness against the model are `Predictor.validate`'s, for every caller.
"""
