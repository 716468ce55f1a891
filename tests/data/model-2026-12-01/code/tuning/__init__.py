"""Ray Tune stages over `fer_model`: the study's grid, an Optuna search, a final retrain, MLflow tracking."""
