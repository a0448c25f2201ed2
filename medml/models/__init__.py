"""Encoders: a registered MONAI backbone (``backbones``) + projection head + L2 normalisation
(``encoder``); embedding datasets and catalog scans (``inference``)."""
