"""The code file of every classifier's MLflow model (MLflow "models from code": no pickle).

MLflow copies this file into the model and runs it when the model loads; the class lives in
``cxr_pipeline.vision.serving`` so the package must be installed where the model is used.
"""

import mlflow.models

from cxr_pipeline.vision.serving import CxrClassifier

mlflow.models.set_model(CxrClassifier())
