#!/usr/bin/env bash
# Create or refresh .venv-bench: our package plus Kronfluence 1.0.1, for bench/ only.
# Idempotent: a second run with nothing changed takes ~1 s.
#
# Kronfluence is never a runtime dependency, and it is installed with --no-deps: its metadata
# asks for torchvision, and PyPI's torchvision does not import beside the torch 2.13.0 CPU wheel
# (and once broken it also breaks `from transformers import ...`). Kronfluence itself never
# imports torchvision, so we install its other requirements by hand and leave torchvision out.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BENCH_VENV:-$root/.venv-bench}"
python="${PYTHON:-python3}"

pip_install() { "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }

# Kronfluence 1.0.1's requirements, less torchvision (and torch, pinned first).
KRONFLUENCE_DEPS=(
  "accelerate>=0.31.0"
  "einops>=0.8.0"
  "einconv>=0.1.0"
  "opt-einsum>=3.3.0"
  "safetensors>=0.4.2"
  "tqdm>=4.66.4"
  "scikit-learn>=1.4.0"
)

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$(cat "$root/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip_install --upgrade pip
  # torch first and exactly pinned (a CPU wheel lies on disk), so nothing later resolves a CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e "$root[system]"
  pip_install "${KRONFLUENCE_DEPS[@]}"
  pip_install --no-deps "kronfluence==1.0.1"
  pip_install "gguf>=0.10"   # bench/real_model.py reads the SmolLM2 GGUF file through transformers
  if "$venv/bin/python" -m pip show torchvision >/dev/null 2>&1; then
    echo "setup.sh: torchvision got installed; removing it (it breaks transformers imports here)" >&2
    "$venv/bin/python" -m pip uninstall -y -q torchvision
  fi
  # Fail now, not mid-benchmark, if the stack does not import.
  HF_HUB_OFFLINE=1 "$venv/bin/python" -c "
import torch, kronfluence, transformers
from transformers import GPT2Config, LlamaConfig
from kronfluence.analyzer import Analyzer
assert torch.__version__.startswith('2.13.0'), torch.__version__
print('bench venv ok: torch', torch.__version__, '| kronfluence', kronfluence.__version__, '| transformers', transformers.__version__)
"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
