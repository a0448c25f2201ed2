"""Inference: the MLflow pyfunc model and batch prediction over new scans."""
