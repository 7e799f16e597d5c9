-- MLflow's tracking database beside Dagster's.
CREATE DATABASE mlflow OWNER cxr;
