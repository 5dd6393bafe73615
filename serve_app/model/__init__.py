"""Model store and predictor: versions, manifests, safe formats, signatures, training. No Ray, no HTTP."""
