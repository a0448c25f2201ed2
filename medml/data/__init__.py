"""Data: MONAI transform chains, cached datasets over the catalog, splits and samplers."""
