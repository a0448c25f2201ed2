"""MLflow "models from code" entry point: MLflow runs this file to obtain the model object.

Logging from code (instead of pickling an instance) means loading a medml model never
unpickles anything; weights are read with ``torch.load(weights_only=True)``.
"""

from mlflow.models import set_model

from medml.predict.pyfunc import MedmlModel

set_model(MedmlModel())
