"""The seed's Flask server, as the seed wrote it, serving a model file from the store.

Only the model path and port come from the command line (the seed hard-coded
"iris_model.pkl" and port 5000); the route, the predict call and Flask's own server
(`app.run`, threaded) are the seed's:

    python -m serve_app.ops.baselines.flask_app --model models/iris/1/model.skops --port 5000
"""

import argparse

from flask import Flask, jsonify, request

from serve_app.model import formats as artefacts

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a stored model file (.skops or .joblib)")
parser.add_argument("--port", type=int, default=5000)
args = parser.parse_args()

app = Flask(__name__)
# The seed's joblib.load; skops files need the allow-listed loader instead.
model = artefacts.load(args.model, "skops" if args.model.endswith(".skops") else "joblib")


@app.route("/predict", methods=["POST"])
def predict():
    data = request.json["features"]
    prediction = model.predict([data])
    return jsonify({"prediction": int(prediction[0])})


app.run(host="127.0.0.1", port=args.port)
