"""Evaluation of a trained encoder on the catalog: the contract's metrics, and run figures."""
