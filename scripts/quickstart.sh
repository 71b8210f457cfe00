#!/usr/bin/env bash
# The reference document's flow on the embedded KMS, on a fresh machine: install kmsenv into
# .venv, create a CMK and the alias alias/Apollo/WorkKey, envelope-encrypt data/sales.csv,
# decrypt it, and check the result is byte-identical. Everything lands in ./demo (recreated).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e . >/dev/null
export PATH="$PWD/.venv/bin:$PATH"

rm -rf demo && mkdir -p demo/data
export KMSENV_HOME="$PWD/demo/kms-home"
cd demo

echo "== sample data: data/sales.csv"
python - <<'PY'
import csv, random
rng = random.Random(2019)
with open("data/sales.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["order_id", "region", "product", "quantity", "unit_price"])
    for i in range(20000):
        w.writerow([f"SO-{i:06d}", rng.choice(["east", "west", "north", "south"]),
                    rng.choice(["widget", "gadget", "gizmo"]), rng.randint(1, 50), f"{rng.uniform(1, 99):.2f}"])
PY
ls -l data/sales.csv

echo "== kmsenv kms CreateKey"
kmsenv kms CreateKey --Description "Apollo work key" | tee key.json
KEY_ID=$(python -c 'import json; print(json.load(open("key.json"))["KeyMetadata"]["KeyId"])')

echo "== kmsenv kms CreateAlias --AliasName alias/Apollo/WorkKey --KeyId $KEY_ID"
kmsenv kms CreateAlias --AliasName alias/Apollo/WorkKey --KeyId "$KEY_ID"

echo "== kmsenv encrypt --key-id alias/Apollo/WorkKey --context project=apollo data/sales.csv"
kmsenv encrypt --key-id alias/Apollo/WorkKey --context project=apollo data/sales.csv
ls -l data/sales.csv.cipher

echo "== kmsenv inspect data/sales.csv.cipher (no KMS call, no key)"
kmsenv inspect data/sales.csv.cipher

echo "== kmsenv decrypt data/sales.csv.cipher -o data/decrypted_sales.csv"
kmsenv decrypt --context project=apollo data/sales.csv.cipher -o data/decrypted_sales.csv

cmp data/sales.csv data/decrypted_sales.csv
echo "OK: data/decrypted_sales.csv is identical to data/sales.csv"
