"""The model registry side: packaging a trained encoder as an MLflow model, registering
versions with new prototypes, and champion/challenger promotion."""
