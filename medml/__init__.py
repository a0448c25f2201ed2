"""medml: from raw CT/MRI exports to few-shot predictions on new scans."""

__version__ = "0.1.0"
