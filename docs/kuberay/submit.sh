#!/bin/bash
# Screen on a Ray cluster that is already running (a KubeRay RayCluster, or any cluster whose head runs
# ray[default]): `ray job submit` sends the driver to the head; runtime_env adds phanes to the job's Python
# environment when the image lacks it. Port 8265 is the head's job server (kubectl port-forward svc/HEAD 8265).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 bash docs/kuberay/submit.sh
set -euo pipefail
ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --runtime-env-json '{"pip": ["phanes[onnx]==0.1.0"], "env_vars": {"OMP_NUM_THREADS": "1"}}' \
    -- phanes screen /data/cohort --out /data/screened --address auto --device cuda --gpus-per-actor 0.5 \
    --max-in-flight 32 --log-jsonl /data/screened/events.jsonl
