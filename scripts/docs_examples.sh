#!/bin/sh
# Runs every command shown in docs/format.md and docs/geometries.md in a scratch folder and prints
# what it prints, so the pasted output can be regenerated after a change:
#   sh scripts/docs_examples.sh > /tmp/docs_examples.txt
# Needs the project venv (make venv). Takes about a minute on 2 CPU cores.
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PATH="$ROOT/.venv/bin:$PATH"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
export HF_DATASETS_CACHE="$WORK/hf_cache" HF_HUB_DISABLE_PROGRESS_BARS=1
unset CALOFM_GEOMETRY_DIR || true

# print a command, its output and its exit code if not 0; progress bars (tqdm lines) are left out
run() {
    echo; echo "\$ $*"
    rc=0; "$@" > "$WORK/.out" 2> "$WORK/.err" || rc=$?
    cat "$WORK/.out"; tr '\r' '\n' < "$WORK/.err" | grep -v -e '%|' -e 'examples \[' -e '^$' || true
    [ "$rc" = 0 ] || echo "(exit code $rc)"
}

echo "## geometries"
run calofm geometries
run calofm geometries --sections

echo; echo "## a native file"
run calofm simulate --geometry par04_siw --samples 1000 --energy 1:100 --seed 1 --out par04_siw_1k.h5
run python "$ROOT/scripts/h5_layout.py" par04_siw_1k.h5
run calofm validate par04_siw_1k.h5

echo; echo "## a file written by another tool (LEMURS layout, no calofm attributes)"
python - <<'PY'
import h5py
with h5py.File("par04_siw_1k.h5") as src, h5py.File("LEMURS_like.h5", "w") as dst:
    for key in ("showers", "incident_energy", "incident_phi", "incident_theta"):
        dst.create_dataset(key, data=src[key][:100], compression="gzip", compression_opts=9)
PY
run calofm validate LEMURS_like.h5
run calofm validate LEMURS_like.h5 --geometry par04_siw
run calofm validate par04_siw_1k.h5 --geometry odd

echo; echo "## writing, interruption and resume"
cat > write_resume.py <<'PY'
import numpy as np

from calofm.data import FileAttrs, ShowerFile, ShowerWriter, read_showers

src = read_showers("par04_siw_1k.h5")  # any source of showers
rows = lambda a, b: [src[k][a:b] for k in ("showers", "incident_energy", "incident_phi", "incident_theta")]
attrs = FileAttrs(geometry="par04_siw", particle="gamma", generator="my-producer", seed=7)

try:
    with ShowerWriter("out.h5", attrs=attrs) as w:  # writes out.h5.partial
        for start in range(0, 1000, 100):
            if start == 300:
                raise KeyboardInterrupt  # the job is killed here
            w.append(*rows(start, start + 100))
except KeyboardInterrupt:
    pass

import os
print("after the crash:", sorted(f for f in os.listdir(".") if f.startswith("out.h5")))
with ShowerWriter("out.h5", attrs=attrs, resume=True) as w:  # same settings: continue
    print("resuming at row", w.n_written)
    for start in range(w.n_written, 1000, 100):
        w.append(*rows(start, start + 100))
print("after the resumed run:", sorted(f for f in os.listdir(".") if f.startswith("out.h5")))
with ShowerFile("out.h5") as f:
    same = all(np.array_equal(f.load()[k], src[k]) for k in src)
    print(len(f), "showers, identical to the source:", same)
PY
run python write_resume.py

echo; echo "## bad files"
head -c 200000 par04_siw_1k.h5 > truncated.h5
run calofm validate truncated.h5
python - <<'PY'
import h5py, numpy as np
with h5py.File("degrees.h5", "w") as f:
    f["showers"] = np.zeros((3, 9, 16, 45), "f4")
    f["incident_energy"] = np.full(3, 1000.0, "f4")
    f["incident_phi"] = np.zeros(3, "f4")
    f["incident_theta"] = np.array([1.5, 90.0, 1.5], "f4")
PY
run calofm validate degrees.h5

echo; echo "## CaloChallenge"
run calofm convert par04_siw_1k.h5 par04_siw_1k_ds2.hdf5 --to calochallenge --scale 30.303
run python "$ROOT/scripts/h5_layout.py" par04_siw_1k_ds2.hdf5
run calofm validate par04_siw_1k_ds2.hdf5
run calofm convert par04_siw_1k_ds2.hdf5 from_ds2.h5 --to calofm
run calofm validate from_ds2.h5
run calofm convert par04_siw_1k.h5 par04_siw_1k_ds3.hdf5 --to calochallenge --dataset 3 --scale 30.303
run calofm convert par04_siw_1k_ds3.hdf5 from_ds3.h5 --to calofm
python - <<'PY'
import numpy as np
from calofm.data import read_showers
a = read_showers("par04_siw_1k.h5")["showers"] * np.float32(30.303)
b = read_showers("from_ds2.h5")["showers"]
c = read_showers("from_ds3.h5")["showers"].astype(np.float64)
print("\n$ python: the round trips against the original (x 30.303)")
print("DS2: max |difference| per cell:", np.abs(b - a).max())
a = a.astype(np.float64)
print("DS3: energy per (layer, ring), max relative difference %.1e" % (np.abs(c.sum(2) - a.sum(2)).max() / a.sum(2).max()))
print("DS3: energy per cell, max difference / max cell %.2f (phi bins shared by overlap)" % (np.abs(c - a).max() / a.max()))
PY

echo; echo "## Parquet"
run calofm convert par04_siw_1k.h5 par04_siw_1k_parquet --to parquet
run ls par04_siw_1k_parquet
run cat par04_siw_1k_parquet/calofm.json
cat > load_pq.py <<'PY'
from calofm.data.convert import load_parquet_dataset

ds = load_parquet_dataset("par04_siw_1k_parquet")
print(ds)
print(ds.features["showers"])
row = ds.with_format("numpy")[0]
print(row["showers"].shape, row["showers"].reshape(9, 16, 45).sum(), row["incident_energy"])
PY
run python load_pq.py
cat > load_hf.py <<'PY'
from datasets import load_dataset

ds = load_dataset("parquet", data_files="par04_siw_1k_parquet/*.parquet", split="train")
print(len(ds), ds.features["showers"])
PY
run python load_hf.py
run calofm convert par04_siw_1k_parquet from_parquet.h5 --to calofm
run calofm validate from_parquet.h5

echo; echo "## a new detector"
mkdir cards
cat > cards/siw_proto.yaml <<'YAML'
# A hypothetical Si-W test-beam prototype, the worked example of docs/geometries.md.
name: siw_proto
title: Si-W prototype (30 x 3.5 mm W + 0.5 mm Si)
slot: 6                    # a spare one-hot slot (0-5 are the built-in detectors)
particle: e-
materials:
  W:  {Z: 74, A: 183.84, density: 19.30, X0: 6.76, Ec: 7.97, R_M: 9.327, dedx: 1.145}
  Si: {Z: 14, A: 28.09, density: 2.329, X0: 21.82, Ec: 40.19, R_M: 49.44, dedx: 1.664}
stack:
  - name: W-Si
    repeat: 30
    slices:
      - {material: W, thickness: 3.5}
      - {material: Si, thickness: 0.5, active: true}
resolution: {stochastic: 0.20, constant: 0.01}
threshold: 0.05
energy: [1.0, 100.0]
spectrum: log-uniform
theta: [1.4, 1.75]
phi: [-3.141592653589793, 3.141592653589793]
mesh: {n_r: 9, n_phi: 16, n_z: 45, dr: 4.65, dz: 3.4}   # provisional: Par04's cells
YAML
run calofm geometries --geometry-dir cards --sections
cat > grid.py <<'PY'
from calofm.geometry import load_geometry

new, ref = load_geometry("siw_proto", ["cards"]), load_geometry("par04_siw")
print(f"dr = 4.65 mm x {new.R_M_eff:.2f} / {ref.R_M_eff:.2f} = {4.65 * new.R_M_eff / ref.R_M_eff:.2f} mm")
print(f"dz = 3.40 mm x {new.X0_eff:.3f} / {ref.X0_eff:.3f} = {3.4 * new.X0_eff / ref.X0_eff:.2f} mm")
PY
run python grid.py
cat > api.py <<'PY'
from calofm.geometry import load_geometry

g = load_geometry("siw_proto", ["cards"])  # or $CALOFM_GEOMETRY_DIR, or a path to the .yaml
print(g.name, g.slot, g.source)
print(f"depth {g.depth:.1f} mm = {g.depth_x0:.2f} X0, X0_eff {g.X0_eff:.3f} mm, R_M_eff {g.R_M_eff:.2f} mm")
print(f"f_samp {g.sampling_fraction:.4f}, e/mip {g.e_mip:.3f}, F_S {g.F_S:.2f}, Z_eff {g.Z_eff:.1f}")
s = g.sections[0]
print(f"section {s.name}: cell {s.cell} mm, f_mip {s.f_mip:.4f} x e/mip {s.e_mip:.3f} = f_em {s.f_em:.4f}")
print("r edges (mm):", g.r_edges.round(2).tolist())
PY
sed -i 's/^mesh: .*/mesh: {n_r: 9, n_phi: 16, n_z: 45, dr: 4.43, dz: 3.21}   # universal grid from Par04 Si-W/' \
    cards/siw_proto.yaml
run calofm geometries --geometry-dir cards
run python api.py
export CALOFM_GEOMETRY_DIR="$WORK/cards"
run calofm simulate --geometry siw_proto --samples 200 --seed 2 --out proto.h5
run calofm validate proto.h5 --geometry siw_proto
unset CALOFM_GEOMETRY_DIR
sed -e 's/^name: siw_proto/name: siw_bad/' -e 's/    repeat: 30/    repeat: 0/' cards/siw_proto.yaml > cards/siw_bad.yaml
run calofm geometries --geometry-dir cards
sed -e 's/^name: siw_proto/name: proto2/' cards/siw_proto.yaml > cards/siw_proto2.yaml
rm cards/siw_bad.yaml
run calofm geometries --geometry-dir cards
