"""Bytes <-> numpy for each wire format. No Ray, no Starlette."""
