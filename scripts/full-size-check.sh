#!/usr/bin/env bash
# Full-size check (#13, #16): the published blip2-opt-2.7b architecture with random weights, through
# export -> build int8 -> parity fp32 -> run int8 -> build int4, printing each step's time and peak RSS,
# and for each precision its files, load time, load peak RSS, first-token latency and decode rate.
#
# Not in CI (the full size needs ~16 GB RAM, ~35 GB disk and hours on 2 cores). Layer counts default to
# the published ones (39 vision / 12 Q-Former / 32 OPT); smaller counts give a run at the published
# widths that fits a smaller box:
#
#   scripts/full-size-check.sh                       # blip2-opt-2.7b: 39 / 12 / 32 layers
#   VISION_LAYERS=4 QFORMER_LAYERS=4 LLM_LAYERS=4 scripts/full-size-check.sh
#
# WORK (default /tmp/blip2-full-size) receives the checkpoint and the bundle; KEEP=1 keeps them
# (they are deleted at the end otherwise). The table goes to stdout and to $WORK.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/blip2-full-size}"
VISION_LAYERS="${VISION_LAYERS:-39}"
QFORMER_LAYERS="${QFORMER_LAYERS:-12}"
LLM_LAYERS="${LLM_LAYERS:-32}"
VOCAB="${VOCAB:-50272}"          # OPT-2.7b's padded vocabulary (embedding table and LM head)
NEW_TOKENS="${NEW_TOKENS:-8}"
INT4_METHOD="${INT4_METHOD:-rtn}"  # the CLI's default is gptq; rtn is what docs/real-models.md measured
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "error: $TIME (GNU time) is needed for peak RSS; apt-get install time" >&2; exit 1; }

CKPT="$WORK/checkpoint"
BUNDLE="$WORK/bundle"
IMAGES="$WORK/images"
rm -rf "$WORK"
mkdir -p "$WORK" "$IMAGES"
ROWS="$WORK/rows.tsv"
: > "$ROWS"

step() {  # step NAME CMD...: run CMD under GNU time, record seconds and peak RSS (kB)
  local name="$1"; shift
  echo "== $name: $*" >&2
  "$TIME" -f "%e %M" -o "$WORK/time.txt" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
    echo "error: step $name failed; last lines of its output:" >&2
    tail -20 "$WORK/$name.err" >&2
    exit 1
  }
  read -r secs kb < "$WORK/time.txt"
  printf '%s\t%s\t%s\n' "$name" "$secs" "$kb" >> "$ROWS"
}

"$PY" - "$IMAGES" <<'EOF'
import sys
import numpy as np
from PIL import Image
for i in range(2):  # two images for parity and calibration
    rng = np.random.default_rng(i)
    Image.fromarray((rng.random((240, 320, 3)) * 255).astype("uint8")).save(f"{sys.argv[1]}/{i}.png")
EOF

step checkpoint "$PY" -c "
from blip2_export.modelzoo import write_random_checkpoint
write_random_checkpoint('$CKPT', 'published', seed=0, vision_layers=$VISION_LAYERS,
                        qformer_layers=$QFORMER_LAYERS, llm_layers=$LLM_LAYERS, vocab_size=$VOCAB)"
step export "$PY" -m blip2_export.cli export "$CKPT" -o "$BUNDLE" --force
step build_int8 "$PY" -m blip2_export.cli build "$BUNDLE" --precision int8 --calib-images "$IMAGES"
step parity_fp32 "$PY" -m blip2_export.cli parity "$CKPT" "$BUNDLE" --images "$IMAGES" \
  --max-new-tokens "$NEW_TOKENS" --report "$WORK/parity.json"
step run_int8 "$PY" -m blip2_export.cli run "$BUNDLE" --precision int8 -i "$IMAGES/0.png" --json
step build_int4 "$PY" -m blip2_export.cli build "$BUNDLE" --precision int4 --int4-method "$INT4_METHOD" \
  --calib-images "$IMAGES"
for prec in fp32 int8 int4; do  # load time and peak, first-token latency and decode speed, one process each
  step "speed_$prec" "$PY" - "$BUNDLE" "$prec" "$IMAGES/0.png" "$WORK/speed_$prec.json" <<'EOF2'
import json
import sys
import time

from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime
from runtime.preprocess import load_image
from runtime.text import table_role

bundle, prec, image, out = sys.argv[1:5]


def hwm():  # this process's peak RSS so far (bytes)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


import onnxruntime  # noqa: E402,F401  (the libraries are in the baseline, not in the load)
base = hwm()
t0 = time.perf_counter()
rt = Blip2Runtime(bundle, precision=prec)
files = {rt.manifest.files[r].file for r in ("tokenizer", table_role(rt.manifest, prec))}  # what loading reads
for name in rt.manifest.required_graphs():
    runner, rec = rt.graph(GraphName(name)), rt.manifest.graph(name, prec)
    if runner.facts.engine:
        files |= {runner.facts.engine, *rec.notes["ort_engine"]["external_data"]}
    else:
        files |= {rec.file, *(x.file for x in rec.external_data)}
load = time.perf_counter() - t0
load_peak = hwm() - base
read = sum((rt.bundle / f).stat().st_size for f in files)
img = load_image(image)
stamps = []
t1 = time.perf_counter()
rt.generate(images=[img], max_new_tokens=32, min_new_tokens=32, stream=lambda step, toks: stamps.append(time.perf_counter()))
first = stamps[0] - t1
rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
json.dump({"load_s": load, "first_token_s": first, "tokens_per_s": rate, "files_read": read,
           "load_peak": load_peak}, open(out, "w"))
EOF2
done

"$PY" - "$CKPT" "$BUNDLE" "$ROWS" "$WORK" "$VISION_LAYERS" "$QFORMER_LAYERS" "$LLM_LAYERS" <<'EOF'
import json
import sys
from pathlib import Path

ckpt, bundle, rows, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
layers = "/".join(sys.argv[5:8])
ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
index = json.loads((ckpt / "model.safetensors.index.json").read_text())
params = index["metadata"]["total_size"] // 4
m = json.loads((bundle / "manifest.json").read_text())


def files_of(prec):
    out = set()
    for g in m["graphs"][prec].values():
        out.add(g["file"])
        out.update(e["file"] for e in g.get("external_data", []))
        out.update(e["file"] for e in g.get("engines", []))
    own_table = m["files"].get(f"embed_tokens.{prec}")  # e.g. int4's float16 table
    if own_table:
        out.add(own_table["file"])
    return out


def gb(n):
    return f"{n / 1e9:.2f}"


prec_bytes = {p: sum((bundle / f).stat().st_size for f in files_of(p)) for p in m["graphs"]}
parity = json.loads((work / "parity.json").read_text())
agree = parity.get("token_agreement", parity.get("summary", {}).get("token_agreement"))
lines = [f"model: blip2-opt-2.7b architecture, random weights, {layers} vision/Q-Former/OPT layers, "
         f"{params / 1e9:.2f} B parameters, fp32 checkpoint {gb(ckpt_bytes)} GB",
         "", "| step | time (s) | peak RSS (GB) | peak / fp32 checkpoint |", "|---|---|---|---|"]
for line in rows.read_text().splitlines():
    name, secs, kb = line.split("\t")
    rss = int(kb) * 1024
    lines.append(f"| {name} | {float(secs):.0f} | {gb(rss)} | {rss / ckpt_bytes:.2f} |")
lines += ["", "| precision | its files (GB) | / fp32 checkpoint | files read at load (GB) | load (s) | "
          "load peak RSS over the baseline (GB) | / files read | first token (s) | tokens/s |",
          "|---|---|---|---|---|---|---|---|---|"]
for p, n in prec_bytes.items():
    sp = work / f"speed_{p}.json"
    v = json.loads(sp.read_text()) if sp.is_file() else {}
    cells = [gb(v["files_read"]) if "files_read" in v else "-", f"{v['load_s']:.1f}" if v else "-",
             gb(v["load_peak"]) if v else "-", f"{v['load_peak'] / v['files_read']:.2f}" if v else "-",
             f"{v['first_token_s']:.2f}" if v else "-", f"{v['tokens_per_s']:.1f}" if v else "-"]
    lines.append(f"| {p} | {gb(n)} | {n / ckpt_bytes:.2f} | " + " | ".join(cells) + " |")
total = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
lines += ["", f"whole bundle on disk: {gb(total)} GB; parity fp32 token agreement: {agree}"]
text = "\n".join(lines)
print(text)
Path(str(work) + ".md").write_text(text + "\n")
EOF
cat "$WORK/run_int8.out" >&2 || true
[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
