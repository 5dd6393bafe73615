"""The HTTP routes a replica serves, one module per protocol."""
