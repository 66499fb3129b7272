"""SAM model construction, checkpoint conversion and the UNETR head."""
