"""Renders the ferrymq-operator chart as `helm install` would and prints JSON on stdout:
{"objects": [every rendered object], "notes": "NOTES.txt as rendered"}.

    python3 charts/render.py RELEASE NAMESPACE '{"values": "as JSON"}'

The operator's tests against a real API server (operator/tests/kube_operator.rs) apply these
objects and run the operator with the rendered Deployment's args and env. Needs helm-python-sdk
(pip install helm-python-sdk), the same as charts/test_chart.py; exits 3 when it is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

try:
    import helm_python as helm
except ImportError:
    print("helm-python-sdk is not installed (pip install helm-python-sdk)", file=sys.stderr)
    sys.exit(3)

CHART_DIR = Path(__file__).resolve().parent / "ferrymq-operator"


def main() -> None:
    release, namespace, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    out = helm.Chart.load(str(CHART_DIR)).render(values, name=release, namespace=namespace)
    objects, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    json.dump({"objects": objects, "notes": notes}, sys.stdout)


if __name__ == "__main__":
    main()
